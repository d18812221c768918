"""Triton kernels for the floating-point microscaled families (MXFP4, NVFP4, mxfp4_dualscale,
MXFP8) and for GGUF blocks, registered as Kernel objects.

Each family has one layout and three kernels over it: a split-K kernel for M <= 64 (fills the
GPU when one tile row is all the work there is), a tiled GEMM for any M, and for M >= 128 a
dequantize-then-matmul (one Triton pass writes a transient dense copy of the weight, freed after
the call and never cached, then torch's dense matmul: cuBLAS on GPUs). Code lives in
omniq.kernels.triton_mx and omniq.kernels.triton_gguf.

On a CPU these kernels run only under the Triton interpreter (TRITON_INTERPRET=1) and only
when forced (omniq.use_kernel / OMNIQ_KERNEL): that mode is for tests and is never selected
on its own.
"""
from __future__ import annotations

import torch

from omniq.dispatch import CHECKPOINT, Problem, register_kernel
from omniq.kernels import triton_gguf as tg
from omniq.kernels import triton_mx as tm
from omniq.kernels._common import TritonKernel

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _TritonFP(TritonKernel):
    max_m: int | None = None
    min_m: int | None = None
    mode = "gemm"   # "splitk" | "gemm" | "dequant_mm"
    tiled = dequant_mm = None   # the family's run functions: tiled(x, p, bias, mode), dequant_mm(x, p, bias)

    def _check(self, problem: Problem) -> str | None:
        raise NotImplementedError

    def can_implement(self, problem: Problem) -> str | None:
        if problem.out_dtype is not None and problem.out_dtype != problem.act_dtype:
            return f"writes the activation dtype ({problem.act_dtype}), not {problem.out_dtype}"
        if problem.act_dtype not in _DTYPES:
            return f"activations must be bf16, fp16 or fp32, not {problem.act_dtype}"
        if self.max_m is not None and problem.m > self.max_m:
            return f"split-K kernel is for M <= {self.max_m} (M={problem.m}); the gemm kernel takes larger M"
        if self.min_m is not None and problem.m < self.min_m:
            return (f"dequantize-then-matmul pays a full pass over the weight, for M >= {self.min_m} only "
                    f"(M={problem.m})")
        return self._check(problem)

    def run(self, x, prepared, bias):
        if self.mode == "dequant_mm":
            return self.dequant_mm(x, prepared, bias)
        return self.tiled(x, prepared, bias, self.mode)


def _register_family(base: type, family: str, module, splitk: str, gemm: str, dequant_mm: str) -> tuple:
    """Register the family's three kernels over one layout, triton.<family>.{splitk,gemm,dequant_mm}
    (priorities 20 / 10 / 15; split-K for M <= module.SPLITK_MAX_M, dequant_mm for
    M >= module.DEQUANT_MIN_M), and return their classes."""
    stem = base.__name__.lstrip("_")
    made = []
    for mode, suffix, priority, doc, extra in (
            ("splitk", "SplitK", 20, splitk, {"max_m": getattr(base, "splitk_max_m", module.SPLITK_MAX_M)}),
            ("gemm", "Gemm", 10, gemm, {}),
            ("dequant_mm", "DequantMM", 15, dequant_mm, {"min_m": module.DEQUANT_MIN_M})):
        attrs = {"__doc__": doc, "__module__": __name__, "name": f"triton.{family}.{mode}",
                 "priority": priority, "mode": mode, **extra}
        made.append(register_kernel(type(stem + suffix, (base,), attrs)))
    return tuple(made)


class _FP4(_TritonFP):
    schemes = tm.FP4_SCHEMES
    layout = tm.FP4
    # the one-dot-per-K-tile GEMM beats split-K at M = 64 on the H200 (mxfp4: 38-54 us against
    # 64-96 us, results/h200-2026-11-29b/probe_mx_gemm.txt)
    splitk_max_m = 32
    tiled, dequant_mm = staticmethod(tm.run_fp4), staticmethod(tm.run_fp4_dequant_mm)

    def _check(self, problem):
        return tm.check_fp4_problem(problem.scheme, problem.n, problem.k, problem.act_dtype)

    def static_rank(self, problem):
        # weight-only MXFP4 at 8 < M <= 64: the GEMM measured fastest on every shape of the H200
        # table (M = 16: 1.35-1.54x over cuda.fp4.mma_gemv, which keeps M <= 8 and NVFP4, where
        # it won; benchmarks/results/h200-2026-11-29c), so it ranks above the GEMV (30) there
        sch = problem.scheme
        if (self.mode == "gemm" and sch.name == "mxfp4" and getattr(sch, "activation", None) is None
                and 8 < problem.m <= 64):
            return 31
        return self.priority


FP4SplitK, FP4Gemm, FP4DequantMM = _register_family(
    _FP4, "fp4", tm,
    splitk="MXFP4 / NVFP4 / dualscale, E2M1 decoded in registers, split-K over all SMs (M <= 64).",
    gemm="MXFP4 / NVFP4 / dualscale, E2M1 decoded in registers, tiled GEMM for any M.",
    dequant_mm="MXFP4 / NVFP4 / dualscale for large M: dequantize (one Triton pass, transient) + cuBLAS.")



class _MXFP8(_TritonFP):
    schemes = ("mxfp8",)
    layout = tm.MXFP8
    # H200, 8192 x 8192 (results/h200-2026-11-29/run1-all-kernels.txt): split-K 68 us vs GEMM 205 us at
    # M = 16, but 710 us vs 264 us at M = 64 (the per-32 rescale serialises its long K loop)
    splitk_max_m = 32
    tiled, dequant_mm = staticmethod(tm.run_mxfp8), staticmethod(tm.run_mxfp8_dequant_mm)

    def _check(self, problem):
        return None


MXFP8SplitK, MXFP8Gemm, MXFP8DequantMM = _register_family(
    _MXFP8, "mxfp8", tm,
    splitk="MXFP8: W8A8 on e4m3 tensor cores with per-32 scales in the K loop (fused activation "
           "quantization), or W8A16 with the weight decoded in registers; split-K (M <= 32).",
    gemm="MXFP8 W8A8 / W8A16, tiled GEMM for any M.",
    dequant_mm="MXFP8 for large M: fused activation fake-quantization and weight dequantization (exact in "
               "the activation dtype) + cuBLAS.")


class _GGUF(_TritonFP):
    schemes = ("gguf",)
    layout = CHECKPOINT   # the raw block bytes, decoded in the kernel
    tiled, dequant_mm = staticmethod(tg.run_gguf), staticmethod(tg.run_gguf_dequant_mm)

    def _check(self, problem):
        return tg.check_gguf_problem(problem.scheme, problem.n, problem.k, problem.act_dtype)


GGUFSplitK, GGUFGemm, GGUFDequantMM = _register_family(
    _GGUF, "gguf", tg,
    splitk="GGUF blocks (all ten types) decoded in-kernel from the file's bytes; split-K (M <= 64).",
    gemm="GGUF blocks decoded in-kernel; tiled GEMM for any M.",
    dequant_mm="GGUF for large M: raw blocks dequantized in one Triton pass (transient) + cuBLAS.")
