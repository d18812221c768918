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
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_offline import cubin_report  # noqa: E402


def compile_report(fn, signature: dict, constants: dict, num_warps: int = 4, num_stages: int = 3,
                   arch: int = 90, count: tuple = (), **options) -> dict:
    """Compile the @triton.jit function `fn` for sm_<arch>: cubin_report's fields, plus 'ptx'
    ({instruction: occurrences} for each name in `count`)."""
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
    src = ASTSource(fn, sig, consts)
    kern = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    rep = cubin_report(kern.asm["cubin"])
    rep["ptx"] = {c: kern.asm["ptx"].count(c) for c in count}
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
    ap.add_argument("--no-fp-fusion", action="store_true", help="as kernels launched with enable_fp_fusion=False")
    a = ap.parse_args()
    mod, _, name = a.kernel.partition(":")
    fn = getattr(importlib.import_module(mod), name)
    opts = {"enable_fp_fusion": False} if a.no_fp_fusion else {}
    rep = compile_report(fn, json.loads(a.sig), json.loads(a.const), a.warps, a.stages, a.arch,
                         tuple(c for c in a.count.split(",") if c), **opts)
    print(f"{a.kernel} sm_{a.arch} warps {a.warps}: {rep['usage']} sass {rep['instructions']} instructions "
          f"{rep['hash']}" + "".join(f" | {k} x{v}" for k, v in rep["ptx"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
