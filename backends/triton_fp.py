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

import os

import torch

from omniq.dispatch import CHECKPOINT, Kernel, Problem, register_kernel
from omniq.dispatch.overrides import forced_kernel
from omniq.kernels import triton_gguf as tg
from omniq.kernels import triton_mx as tm

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _TritonFP(Kernel):
    backend = "triton"
    max_m: int | None = None
    min_m: int | None = None

    def available(self, device: torch.device) -> str | None:
        if tm.triton is None:
            return "Triton is not installed (pip install triton)"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return "Triton does not compile for the CPU (TRITON_INTERPRET=1 runs it interpreted, for tests)"
            if forced_kernel() != self.name:
                return "interpreted Triton runs only when forced with omniq.use_kernel (tests), never by choice"
            return None
        if device.type in ("cuda", "xpu"):
            return None
        return f"Triton does not compile for {device.type} devices"

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


class _FP4(_TritonFP):
    schemes = tm.FP4_SCHEMES
    layout = tm.FP4

    def _check(self, problem):
        return tm.check_fp4_problem(problem.scheme, problem.n, problem.k, problem.act_dtype)


@register_kernel
class FP4SplitK(_FP4):
    """MXFP4 / NVFP4 / dualscale, E2M1 decoded in registers, split-K over all SMs (M <= 64)."""

    name = "triton.fp4.splitk"
    priority = 20
    max_m = tm.SPLITK_MAX_M

    def run(self, x, prepared, bias):
        return tm.run_fp4(x, prepared, bias, "splitk")


@register_kernel
class FP4Gemm(_FP4):
    """MXFP4 / NVFP4 / dualscale, E2M1 decoded in registers, tiled GEMM for any M."""

    name = "triton.fp4.gemm"
    priority = 10

    def run(self, x, prepared, bias):
        return tm.run_fp4(x, prepared, bias, "gemm")


@register_kernel
class FP4DequantMM(_FP4):
    """MXFP4 / NVFP4 / dualscale for large M: dequantize (one Triton pass, transient) + cuBLAS."""

    name = "triton.fp4.dequant_mm"
    priority = 15
    min_m = tm.DEQUANT_MIN_M

    def run(self, x, prepared, bias):
        return tm.run_fp4_dequant_mm(x, prepared, bias)


class _MXFP8(_TritonFP):
    schemes = ("mxfp8",)
    layout = tm.MXFP8

    def _check(self, problem):
        return None


@register_kernel
class MXFP8SplitK(_MXFP8):
    """MXFP8: W8A8 on e4m3 tensor cores with per-32 scales in the K loop (fused activation
    quantization), or W8A16 with the weight decoded in registers; split-K (M <= 64)."""

    name = "triton.mxfp8.splitk"
    priority = 20
    max_m = tm.SPLITK_MAX_M

    def run(self, x, prepared, bias):
        return tm.run_mxfp8(x, prepared, bias, "splitk")


@register_kernel
class MXFP8Gemm(_MXFP8):
    """MXFP8 W8A8 / W8A16, tiled GEMM for any M."""

    name = "triton.mxfp8.gemm"
    priority = 10

    def run(self, x, prepared, bias):
        return tm.run_mxfp8(x, prepared, bias, "gemm")


@register_kernel
class MXFP8DequantMM(_MXFP8):
    """MXFP8 for large M: fused activation fake-quantization and weight dequantization (exact in
    the activation dtype) + cuBLAS."""

    name = "triton.mxfp8.dequant_mm"
    priority = 15
    min_m = tm.DEQUANT_MIN_M

    def run(self, x, prepared, bias):
        return tm.run_mxfp8_dequant_mm(x, prepared, bias)


class _GGUF(_TritonFP):
    schemes = ("gguf",)
    layout = CHECKPOINT   # the raw block bytes, decoded in the kernel

    def _check(self, problem):
        return tg.check_gguf_problem(problem.scheme, problem.n, problem.k, problem.act_dtype)


@register_kernel
class GGUFSplitK(_GGUF):
    """GGUF blocks (all ten types) decoded in-kernel from the file's bytes; split-K (M <= 64)."""

    name = "triton.gguf.splitk"
    priority = 20
    max_m = tg.SPLITK_MAX_M

    def run(self, x, prepared, bias):
        return tg.run_gguf(x, prepared, bias, "splitk")


@register_kernel
class GGUFGemm(_GGUF):
    """GGUF blocks decoded in-kernel; tiled GEMM for any M."""

    name = "triton.gguf.gemm"
    priority = 10

    def run(self, x, prepared, bias):
        return tg.run_gguf(x, prepared, bias, "gemm")


@register_kernel
class GGUFDequantMM(_GGUF):
    """GGUF for large M: raw blocks dequantized in one Triton pass (transient) + cuBLAS."""

    name = "triton.gguf.dequant_mm"
    priority = 15
    min_m = tg.DEQUANT_MIN_M

    def run(self, x, prepared, bias):
        return tg.run_gguf_dequant_mm(x, prepared, bias)
