"""One omniq call under Nsight Compute: where a chosen kernel's time goes (DRAM throughput, issue
slots, stall reasons, occupancy), the profile behind the gaps in benchmarks/results/.

    python benchmarks/profile_ncu.py --list
    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section SchedulerStats --section LaunchStats \\
        python benchmarks/profile_ncu.py --case int4_m1

A case pins one kernel (omniq.use_kernel), warms it up (compiles, first-call setup), then runs one
call between cudaProfilerStart / Stop, so ncu sees exactly the kernels of that call (an
activation quantizer and a GEMV, a dequantize and cuBLAS ...). ncu flushes the caches before each
profiled kernel by default, so the weight streams from DRAM, as in a model.
"""
from __future__ import annotations

import argparse

import torch

# name: (scheme, params, N, K, M, kernel or None for bf16 F.linear)
CASES = {
    "bf16_m1": ("", {}, 8192, 8192, 1, None),
    "bf16_m16": ("", {}, 8192, 8192, 16, None),
    "int4_m1": ("gptq", dict(bits=4, group_size=128, sym=False), 8192, 8192, 1, "cuda.affine.mma_gemv"),
    "int4_m1_tinygemm": ("gptq", dict(bits=4, group_size=128, sym=False), 8192, 8192, 1, "cuda.int4.tinygemm"),
    # the GEMV at M = 8 (one 8-row MMA tile) and 16 (two): 21.3 against 43.6 us on the H200
    "int4_m8_gemv": ("gptq", dict(bits=4, group_size=128, sym=False), 8192, 8192, 8, "cuda.affine.mma_gemv"),
    "int4_m16_gemv": ("gptq", dict(bits=4, group_size=128, sym=False), 8192, 8192, 16, "cuda.affine.mma_gemv"),
    "int4_m16": ("gptq", dict(bits=4, group_size=128, sym=False), 8192, 8192, 16, "triton.affine.splitk"),
    "int4_m64": ("gptq", dict(bits=4, group_size=128, sym=False), 8192, 8192, 64, "triton.affine.splitk"),
    "int4_m512": ("gptq", dict(bits=4, group_size=128, sym=False), 8192, 8192, 512, "triton.affine.dequant_mm"),
    "mxfp4_m1": ("mxfp4", dict(activation=None), 8192, 8192, 1, "cuda.fp4.mma_gemv"),
    "mxfp4_m64": ("mxfp4", dict(activation=None), 8192, 8192, 64, "triton.fp4.gemm"),
    "nvfp4_m1": ("nvfp4", dict(activation=None), 8192, 8192, 1, "cuda.fp4.mma_gemv"),
    "nvfp4_m64": ("nvfp4", dict(activation=None), 8192, 8192, 64, "triton.fp4.gemm"),
    "fp8_m1": ("fp8", {}, 8192, 8192, 1, "cuda.w8a8.gemv"),
    "fp8_m64": ("fp8", {}, 8192, 8192, 64, "triton.w8a8.splitk"),
    "fp8_m512": ("fp8", {}, 8192, 8192, 512, "triton.w8a8.gemm"),
    "int8_m16": ("int8", {}, 8192, 8192, 16, "cuda.w8a8.gemv"),
    "int8_m64": ("int8", {}, 8192, 8192, 64, "cuda.int8.int_mm"),
    "mxfp8_m1": ("mxfp8", {}, 8192, 8192, 1, "cuda.mxfp8.gemv"),
    "mxfp8_m64": ("mxfp8", {}, 8192, 8192, 64, "triton.mxfp8.gemm"),
    "q4k_m1": ("gguf", dict(type="q4_k"), 8192, 8192, 1, "triton.gguf.splitk"),
    "q8_0_m64": ("gguf", dict(type="q8_0"), 8192, 8192, 64, "triton.gguf.splitk"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list or not args.case:
        for name, (sch, params, n, k, m, kern) in CASES.items():
            print(f"{name:18s} {sch or 'bf16'} {params} {n}x{k} M={m} {kern or 'F.linear'}")
        return
    import omniq
    sch_name, params, n, k, m, kern = CASES[args.case]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    if kern is None:
        wb = w.to(dev, torch.bfloat16)
        call = lambda: torch.nn.functional.linear(x, wb)  # noqa: E731
    else:
        qw = omniq.get_scheme(sch_name, **params).quantize(w, name=f"ncu.{args.case}")
        with omniq.use_kernel(kern):
            p = omniq.prepare(qw, dev, x.dtype)
        def call():
            with omniq.use_kernel(kern):
                return omniq.linear(x, p, None)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{args.case}: profiled one call of {kern or 'F.linear'}")


if __name__ == "__main__":
    main()
