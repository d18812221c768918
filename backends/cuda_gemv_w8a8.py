"""cuda.w8a8.gemv: omniq's NVRTC-compiled GEMV for fp8 / int8 W8A8 at decode-size M (1..16),
dynamic per-token activations (code in omniq.kernels.cuda_w8a8_gemv). It shares the
"triton.w8a8.v1" layout, so a layer switches between it and the GEMMs per M with one weight copy.
"""
from __future__ import annotations

import torch

from omniq.dispatch import Kernel, register_kernel
from omniq.kernels import cuda_w8a8_gemv as gemv
from omniq.kernels import triton_w8a8 as w8a8
from omniq.kernels.nvrtc import nvrtc_reason

MIN_CAPABILITY = (8, 0)       # mma.sync m16n8k32 s8 / m16n8k16 f16
FP8_CAPABILITY = (8, 9)       # cvt.rn.f16x2.e4m3x2
_HALF = (torch.bfloat16, torch.float16)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
        return torch.cuda.get_device_capability(device)
    return None


@register_kernel
class CudaW8A8Gemv(Kernel):
    """Decode-size fp8 / int8 W8A8: 16-byte weight loads straight into mma.sync fragments, split-K."""
    name = "cuda.w8a8.gemv"
    backend = "cuda"
    schemes = ("fp8", "int8")
    priority = 30           # above triton.w8a8.splitk (20) and the cuBLASLt kernels (15) for M <= 16
    layout = w8a8.LAYOUT

    def available(self, device):
        why = nvrtc_reason(device)
        if why:
            return why
        cap = _capability(device)
        if cap is not None and cap < MIN_CAPABILITY:
            return f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (mma.sync), this GPU is " \
                   f"{cap[0]}.{cap[1]}"
        return None

    def can_implement(self, pr):
        sch = pr.scheme
        if sch.activation != "dynamic_token":
            what = "weight-only" if sch.activation is None else f"{sch.activation} activations"
            return f"{what}: cuda.w8a8.gemv takes dynamic per-token activations (static / per-tensor / block run " \
                   f"on triton.w8a8)"
        if sch.name == "fp8" and sch.weight_granularity == "block":
            return "128x128 block weight scales run on triton.w8a8 (cuda.w8a8.gemv takes per-channel / per-tensor)"
        if sch.name == "int8" and not sch.act_symmetric:
            return "asymmetric int8 activations (zero points) run on triton.w8a8 / cuda.int8.int_mm"
        if pr.m > gemv.MAX_M:
            return f"M={pr.m} > {gemv.MAX_M}: cuda.w8a8.gemv is for decode-size M; the GEMMs serve larger M"
        if pr.act_dtype not in _HALF:
            return f"activations must be bf16 or fp16, not {pr.act_dtype}"
        if pr.out_dtype not in (None, pr.act_dtype):
            return f"writes y in the activation dtype ({pr.act_dtype}), not {pr.out_dtype}"
        if pr.k % gemv.K_ALIGN:
            return f"K={pr.k} must be a multiple of {gemv.K_ALIGN} (16-byte weight loads)"
        if sch.name == "int8" and pr.k > gemv.INT8_MAX_K:
            return f"K={pr.k} > {gemv.INT8_MAX_K}: the int32 accumulator could overflow"
        cap = _capability(pr.device)
        if sch.name == "fp8" and cap is not None and cap < FP8_CAPABILITY:
            return f"fp8 conversion (cvt e4m3x2) needs compute capability 8.9+, this GPU is {cap[0]}.{cap[1]}"
        return None

    def run(self, x, p, bias):
        return gemv.run_gemv(x, p, bias)
