"""Compile one of omniq's Triton kernels for sm_90 WITHOUT a GPU: compile errors, registers /
spills, SASS instruction count and hash, and counts of chosen PTX instructions. It is the Triton
counterpart of tools/nvrtc_offline.py, for checking a kernel change before device time is spent on
it. It uses Triton's own compiler and its bundled ptxas / cuobjdump; there is no driver and no
device, and nothing runs.

    python tools/triton_offline.py omniq.kernels.triton_w8a8:_quant_act_kernel \\
        --sig '{"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "azp_ptr": "*fp32",
                "in_s_ptr": "*fp32", "in_z_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                "stride_qm": "i32", "n_kb": "i32"}' \\
        --const '{"ACT": 0, "FP8": true, "SYM": true, "BLOCK_K": 4096, "ONE_PASS": true}' \\
        --warps 8 --count div.rn.f32,fma.rn.f32

--sig gives every runtime argument's Triton type: "*bf16", "*fp32", "*i8", "*fp8e4nv", "i32",
"fp32" and so on. --const gives the constexpr arguments; one left out keeps its default.

A launch specializes the runtime arguments too, and the kernel compiled here should match it:
an integer argument equal to 1 becomes a constant (give it in --const, e.g. "M": 1 at decode),
and pointers (torch allocations are 256-byte aligned) and integers that are multiples of 16 are
compiled as divisible by 16 (--div16 names them; "all" = every pointer and integer argument of
--sig). Alignment decides how wide the global loads are, so leaving it out measures a different
kernel. --loads prints how many PTX global loads of each form (width, cache modifier) there are;
--loops the SASS loops (a main K loop's body size and its LDG / LDGSTS by width); --ptx FILE
writes the PTX. A dtype constexpr is given by name: "DOT": "tl.bfloat16".
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_offline import cubin_report, sass_opcodes  # noqa: E402


def sass_loops(sass: str) -> list:
    """The loops of cuobjdump -sass text (each backward branch and its target), largest first:
    {'instructions': SASS instructions in the body, 'loads': {global load opcode: count}
    (LDG.* with its width suffix, LDGSTS.* = cp.async copies global -> shared), 'ops': {opcode
    without suffixes: count}}."""
    code = []   # (address, instruction text)
    for ln in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", ln)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, ins in code:
        b = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if b and int(b.group(1), 16) <= addr:
            ops = Counter(sass_opcodes([i for a, i in code if int(b.group(1), 16) <= a <= addr]))
            base = Counter()
            for k, v in ops.items():
                base[k.split(".")[0]] += v
            loops.append({"instructions": sum(ops.values()),
                          "loads": dict(sorted((k, v) for k, v in ops.items() if k.startswith(("LDG", "LDGSTS")))),
                          "ops": dict(base.most_common())})
    return sorted(loops, key=lambda d: -d["instructions"])


def compile_report(fn, signature: dict, constants: dict, num_warps: int = 4, num_stages: int = 3,
                   arch: int = 90, count: tuple = (), div16: tuple = (), **options) -> dict:
    """Compile the @triton.jit function `fn` for sm_<arch>: cubin_report's fields, plus 'ptx'
    ({instruction: occurrences} for each name in `count`), 'loads' ({PTX global load form:
    occurrences}), 'loops' (sass_loops) and 'ptx_text'. `div16`: the runtime arguments a launch would mark divisible by
    16 (tt.divisibility, as Triton's JIT does for aligned pointers and multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    params = inspect.signature(fn.fn).parameters
    unknown = sorted((set(signature) | set(constants)) - set(params))
    if unknown:
        raise ValueError(f"{fn.fn.__name__} has no argument(s) {unknown}; its arguments are {list(params)}")
    missing = [p for p in params if p not in signature and p not in constants
               and params[p].default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"{fn.fn.__name__}: give a type (--sig) or a value (--const) for {missing}")
    # a constexpr left out takes its default
    consts = {p: (constants[p] if p in constants else params[p].default) for p in params if p not in signature}
    sig = {p: signature.get(p, "constexpr") for p in params}
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{fn.fn.__name__} is {type(fn).__name__}, not a JITFunction: unset TRITON_INTERPRET "
                           f"(the interpreter's kernels do not compile)")
    bad = sorted(set(div16) - set(signature))
    if bad:
        raise ValueError(f"--div16 names {bad}, which are not runtime arguments in --sig")
    names = list(params)
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in div16}
    src = ASTSource(fn, sig, consts, attrs)
    kern = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    rep = cubin_report(kern.asm["cubin"])
    ptx = kern.asm["ptx"]
    rep["ptx"] = {c: ptx.count(c) for c in count}
    rep["loads"] = dict(sorted(Counter(re.findall(r"\bld\.global[.\w]*", ptx)).items()))
    rep["ptx_text"] = ptx
    rep["loops"] = sass_loops(rep.pop("sass"))
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel", help="module:function, e.g. omniq.kernels.triton_w8a8:_quant_act_kernel")
    ap.add_argument("--sig", required=True, help="JSON {argument: Triton type} for the runtime arguments")
    ap.add_argument("--const", default="{}", help="JSON {argument: value} for the constexpr arguments")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--count", default="", help="comma-separated PTX instructions to count")
    ap.add_argument("--div16", default="", help="comma-separated runtime arguments compiled as divisible "
                    "by 16, as a launch specializes them; 'all': every pointer and integer of --sig")
    ap.add_argument("--loads", action="store_true", help="print the PTX global loads by form")
    ap.add_argument("--loops", action="store_true", help="print the SASS loops: body size and global loads")
    ap.add_argument("--ops", action="store_true", help="with --loops: the largest loop's opcodes by count")
    ap.add_argument("--ptx", help="write the PTX to this file")
    ap.add_argument("--no-fp-fusion", action="store_true", help="as kernels launched with enable_fp_fusion=False")
    a = ap.parse_args()
    mod, _, name = a.kernel.partition(":")
    fn = getattr(importlib.import_module(mod), name)
    opts = {"enable_fp_fusion": False} if a.no_fp_fusion else {}
    sig = json.loads(a.sig)
    if a.div16 == "all":
        div16 = tuple(p for p, t in sig.items() if t.startswith("*") or t in ("i32", "i64", "u32", "u64"))
    else:
        div16 = tuple(c for c in a.div16.split(",") if c)
    import triton.language as tl
    const = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
             for k, v in json.loads(a.const).items()}
    rep = compile_report(fn, sig, const, a.warps, a.stages, a.arch,
                         tuple(c for c in a.count.split(",") if c), div16, **opts)
    print(f"{a.kernel} sm_{a.arch} warps {a.warps}: {rep['usage']} spill STL/LDL {rep['spill_stores']}/"
          f"{rep['spill_loads']} sass {rep['instructions']} instructions "
          f"{rep['hash']}" + "".join(f" | {k} x{v}" for k, v in rep["ptx"].items()))
    if a.loads:
        print("PTX global loads: " + ", ".join(f"{k} x{v}" for k, v in rep["loads"].items()))
    if a.loops:
        for i, lp in enumerate(rep["loops"]):
            print(f"SASS loop {i}: {lp['instructions']} instructions, loads: "
                  + (", ".join(f"{k} x{v}" for k, v in lp["loads"].items()) or "none"))
        if a.ops and rep["loops"]:
            print("SASS loop 0 opcodes: " + ", ".join(f"{k} x{v}" for k, v in rep["loops"][0]["ops"].items()))
    if a.ptx:
        with open(a.ptx, "w") as f:
            f.write(rep["ptx_text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
