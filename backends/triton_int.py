"""Triton kernels for the integer and W8A8 families (registrations only; code in omniq.kernels).

triton.affine.{gemv,splitk,gemm,dequant_mm}
                                   grouped integer weight-only (GPTQ incl. act-order, AWQ,
                                   AutoRound, int8 weight-only) and msModelSlim W4A8 dynamic
                                   (splitk / gemm), over one layout "triton.affine.v1"
triton.w8a8.{splitk,gemm}          fp8 / int8 W8A8 (fused activation quantization, scales in the
                                   epilogue), fp8 and int8 weight-only, msModelSlim W8A8 static
                                   and dynamic, over one layout "triton.w8a8.v1"
"""
from __future__ import annotations

import torch

from omniq.dispatch import register_kernel
from omniq.kernels import triton_affine as affine
from omniq.kernels import triton_w8a8 as w8a8
from omniq.kernels._common import TritonKernel as _TritonKernel

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
        return torch.cuda.get_device_capability(device)
    return None


# ---- grouped integer weight-only -------------------------------------------------------------
AFFINE_SCHEMES = ("gptq", "awq", "int8", "w4a8_dynamic")


class _Affine(_TritonKernel):
    schemes = AFFINE_SCHEMES
    layout = affine.LAYOUT
    max_m: int | None = None
    mode = "gemm"   # run_dot's config kind (gemv and dequant_mm run their own kernels)
    a8 = True  # also serves W4A8 (int8 activations)

    def serves(self, scheme):
        why = super().serves(scheme)
        if why:
            return why
        if scheme.name == "w4a8_dynamic" and not self.a8:
            return "W4A8 (int8 activations) runs on triton.affine.splitk / .gemm only"
        if scheme.name != "w4a8_dynamic" and scheme.activation_quantized:
            return f"{scheme.name} with quantized activations runs on the triton.w8a8 kernels"
        return None

    def can_implement(self, pr):
        if pr.act_dtype not in _ACT_DTYPES:
            return f"activations must be fp16, bf16 or fp32, not {pr.act_dtype}"
        if self.max_m is not None and pr.m > self.max_m:
            return f"M={pr.m} > {self.max_m}: use triton.affine.gemm for larger M"
        bits = getattr(pr.scheme, "bits", 8 if pr.scheme.name == "int8" else 4)
        if bits not in affine.SUPPORTED_BITS:
            return f"{bits}-bit codes are not supported (bits must be one of {affine.SUPPORTED_BITS})"
        if pr.scheme.name == "w4a8_dynamic":
            g = pr.k if pr.scheme.packed else pr.scheme.group
            if g < pr.k and g % 16:
                return f"group_size={g} is not a multiple of 16 (int8 K tiles must stay inside one group)"
        return None

    def run(self, x, p, bias):
        return affine.run_dot(x, p, bias, self.mode, act_int8=p.act_int8)


@register_kernel
class AffineGemv(_Affine):
    """FMA GEMV (no tensor cores) with split-K, for a few rows."""
    name = "triton.affine.gemv"
    priority = 15
    max_m = affine.GEMV_MAX_M
    a8 = False

    def run(self, x, p, bias):
        return affine.run_gemv(x, p, bias)


@register_kernel
class AffineSplitK(_Affine):
    """Tensor-core dot on small tiles with split-K to fill the GPU at small M."""
    name = "triton.affine.splitk"
    priority = 20
    max_m = affine.SPLITK_MAX_M
    mode = "splitk"


@register_kernel
class AffineGemm(_Affine):
    """Tensor-core GEMM for large M (dequantized weight as the MMA's register operand)."""
    name = "triton.affine.gemm"
    priority = 10
    mode = "gemm"


@register_kernel
class AffineDequantMM(_Affine):
    """Large M: one Triton pass dequantizes W (transient, in N chunks), the vendor BLAS multiplies."""
    name = "triton.affine.dequant_mm"
    priority = 12
    a8 = False

    def can_implement(self, pr):
        if pr.m < affine.DEQUANT_MM_MIN_M:
            return f"M={pr.m} < {affine.DEQUANT_MM_MIN_M}: dequantizing W costs more than it saves at small M"
        return super().can_implement(pr)

    def run(self, x, p, bias):
        return affine.run_dequant_mm(x, p, bias)


# ---- W8A8 (and 8-bit weight-only) -------------------------------------------------------------
W8A8_SCHEMES = ("fp8", "int8", "w8a8", "w8a8_dynamic")


class _W8A8(_TritonKernel):
    schemes = W8A8_SCHEMES
    layout = w8a8.LAYOUT
    max_m: int | None = None
    mode = "gemm"   # run_dot's config kind

    def can_implement(self, pr):
        sch = pr.scheme
        if pr.act_dtype not in _ACT_DTYPES:
            return f"activations must be fp16, bf16 or fp32, not {pr.act_dtype}"
        if self.max_m is not None and pr.m > self.max_m:
            return f"M={pr.m} > {self.max_m}: use triton.w8a8.gemm for larger M"
        if sch.name == "fp8":
            wblock, ablock = sch.weight_granularity == "block", sch.activation == "block"
            if wblock and not ablock:
                return (f"block-scaled fp8 weights need activation='block' (1 x 128 groups) here, "
                        f"not {sch.activation!r}")
            if ablock and not wblock:
                return "activation='block' needs block-scaled (128 x 128) fp8 weights here"
            cap = _capability(pr.device)
            if sch.activation is not None and cap is not None and cap < (8, 9):
                return f"fp8 tensor cores need compute capability 8.9+, this GPU is {cap[0]}.{cap[1]}"
        if sch.name == "w8a8_dynamic" and 0 < sch.group_size < pr.k and sch.group_size % w8a8.MIN_BLOCK_K:
            return (f"group_size={sch.group_size} is not a multiple of {w8a8.MIN_BLOCK_K} (8-bit K tiles must stay "
                    f"inside one group)")
        return None

    def run(self, x, p, bias):
        return w8a8.run_dot(x, p, bias, self.mode)


@register_kernel
class W8A8SplitK(_W8A8):
    """Small-M GEMM with split-K (last CTA reduces), activation quantized by one fused kernel."""
    name = "triton.w8a8.splitk"
    priority = 20
    max_m = w8a8.SPLITK_MAX_M
    mode = "splitk"


@register_kernel
class W8A8Gemm(_W8A8):
    """Large-M fp8 / int8 tensor-core GEMM with per-token x per-channel scales in the epilogue."""
    name = "triton.w8a8.gemm"
    priority = 10
    mode = "gemm"
