"""cuda.w8a8.gemv: omniq's NVRTC-compiled GEMV for fp8 / int8 W8A8 at decode-size M (1..16),
dynamic per-token activations (code in omniq.kernels.cuda_w8a8_gemv). It shares the
"triton.w8a8.v1" layout, so a layer switches between it and the GEMMs per M with one weight copy.
Each call is two launches: the CUDA activation quantizer, then the GEMV with Programmatic
Dependent Launch on sm_90+ (a plain launch elsewhere, the reason logged once).
"""
from __future__ import annotations

import torch

from omniq.backends.cuda import NvrtcCudaKernel
from omniq.dispatch import register_kernel
from omniq.kernels import cuda_w8a8_gemv as gemv
from omniq.kernels import triton_w8a8 as w8a8

FP8_CAPABILITY = (8, 9)       # cvt.rn.f16x2.e4m3x2


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
        return torch.cuda.get_device_capability(device)
    return None


@register_kernel
class CudaW8A8Gemv(NvrtcCudaKernel):
    """Decode-size fp8 / int8 W8A8: 16-byte weight loads straight into mma.sync fragments, split-K."""
    name = "cuda.w8a8.gemv"
    capability_why = "mma.sync m16n8k32 s8 / m16n8k16 f16"
    schemes = ("fp8", "int8")
    priority = 30           # above triton.w8a8.splitk (20) and the cuBLASLt kernels (15) for M <= 16
    layout = w8a8.LAYOUT
    max_m = gemv.MAX_M

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
        why = self.decode_reason(pr)
        if why:
            return why
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
