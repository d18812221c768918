"""Compile omniq's NVRTC kernels for sm_90 WITHOUT a GPU: syntax errors, registers / spills, and
a hash of each variant's SASS (so a refactor can be shown to leave the machine code unchanged).

Needs libnvrtc (any machine, no driver): e.g.
    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 -d /tmp/nvrtc nvidia-cuda-nvrtc
    (cd /tmp/nvrtc && unzip -q -o *.whl)
and cuobjdump (Triton's wheel carries one). Then:
    NVRTC_LIB=/tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13 python tools/nvrtc_offline.py \
        cuda_affine_mma cuda_fp4_mma [--hashes out.json]
Each module named must define all_variants() -> [NvrtcKernel].
Modules: cuda_affine_mma, cuda_fp4_mma, cuda_mxfp8_gemv (W8A16 / W8A8 with the Triton quantizer
first, and QX 1: the in-kernel quantizer, one variant per scale rule).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile


def _lib():
    path = os.environ.get("NVRTC_LIB") or next(iter(glob.glob("/tmp/nvrtc/**/libnvrtc.so*", recursive=True)), None)
    if not path:
        sys.exit("set NVRTC_LIB to a libnvrtc.so (see the module docstring)")
    return ctypes.CDLL(path)


def compile_cubin(lib, source: str, name: str, arch: str = "sm_90") -> bytes:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    lib.nvrtcAddNameExpression(prog, name.encode())
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if res:
        raise RuntimeError(f"{name}: compile failed\n{log.value.decode()}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump's text for a cubin (`-sass`, `-res-usage`)."""
    with tempfile.TemporaryDirectory() as tmp:
        cub = os.path.join(tmp, "k.cubin")
        with open(cub, "wb") as f:
            f.write(cubin)
        return subprocess.run([_cuobjdump(), flag, cub], capture_output=True, text=True).stdout


def cubin_report(cubin: bytes) -> dict:
    """Registers / stack (spills) / local / shared memory of a cubin's kernel, its SASS
    instruction and spill (STL / LDL) counts, a hash of that SASS, and the SASS text ('sass')."""
    res, sass = cuobjdump(cubin, "-res-usage"), cuobjdump(cubin, "-sass")
    code = sass_code(sass)
    # STACK too: spilled registers live in the stack frame while LOCAL (local arrays) stays 0, so
    # LOCAL alone reads "no spills" for a kernel that spills; STL / LDL count the spill traffic
    usage = " ".join(w for w in res.split() if w.startswith(("REG:", "STACK:", "LOCAL:", "SHARED:")))
    ops = sass_opcodes(code)
    # (each instruction's encoding line leaves an empty entry: kept in the hash, as before)
    return {"usage": usage, "instructions": len(ops),
            "spill_stores": sum(o.startswith("STL") for o in ops), "spill_loads": sum(o.startswith("LDL") for o in ops),
            "hash": hashlib.md5("\n".join(code).encode()).hexdigest()[:12], "sass": sass}


def sass_code(sass: str) -> list:
    """The text after each /*address*/ of cuobjdump -sass output (empty for encoding lines)."""
    return [ln.split("*/", 1)[1].strip() for ln in sass.splitlines() if ln.strip().startswith("/*") and "*/" in ln]


def sass_opcodes(code: list) -> list:
    """Each instruction's opcode with its suffixes, the predicate guard (@P0, @!UP1) removed."""
    return [re.sub(r"^@!?U?P\w+\s+", "", c).split()[0] for c in code if c]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="+", help="module names under omniq.kernels")
    ap.add_argument("--hashes", help="write {variant: SASS hash} here")
    args = ap.parse_args()
    lib, hashes = _lib(), {}
    for mod in args.modules:
        for k in importlib.import_module(f"omniq.kernels.{mod}").all_variants():
            rep = cubin_report(compile_cubin(lib, k.source, k.name))
            defines = ";".join(ln[8:] for ln in k.source.splitlines() if ln.startswith("#define") and len(ln) < 40)
            key = f"{mod}|{k.name}|{defines}"
            hashes[key] = rep["hash"]
            print(f"{key}: {rep['usage']} spills {rep['spill_stores']}/{rep['spill_loads']} sass {hashes[key]}")
    if args.hashes:
        with open(args.hashes, "w") as f:
            json.dump(hashes, f, indent=0, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
