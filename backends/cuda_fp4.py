"""cuda.fp4.mma_gemv: omniq's NVRTC-compiled MXFP4 / NVFP4 weight-only GEMV for decode-size M
(1..16), E2M1 decoded straight into mma.sync fragments (code in omniq.kernels.cuda_fp4_mma). It
reads the "triton.fp4.v1" layout in place, so a layer switches between it and the Triton fp4
kernels per M with one weight copy.
"""
from __future__ import annotations

import torch

from omniq.dispatch import Kernel, register_kernel
from omniq.kernels import cuda_fp4_mma as fp4
from omniq.kernels import triton_mx as tm
from omniq.kernels.nvrtc import nvrtc_reason

MIN_CAPABILITY = (8, 0)       # bf16 / fp16 mma.sync m16n8k16, bf16x2 fma
_HALF = (torch.bfloat16, torch.float16)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
        return torch.cuda.get_device_capability(device)
    return None


@register_kernel
class CudaFP4MmaGemv(Kernel):
    """Decode-size MXFP4 / NVFP4 weight-only: 16-byte weight loads decoded into mma.sync fragments
    with the group factor folded in exactly, split-K over CTAs."""
    name = "cuda.fp4.mma_gemv"
    backend = "cuda"
    schemes = ("mxfp4", "nvfp4")
    priority = 30           # above triton.fp4.splitk for M <= 16
    layout = tm.FP4

    def available(self, device):
        why = nvrtc_reason(device)
        if why:
            return why
        cap = _capability(device)
        if cap is not None and cap < MIN_CAPABILITY:
            return f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (bf16 mma.sync), this GPU " \
                   f"is {cap[0]}.{cap[1]}"
        return None

    def can_implement(self, pr):
        sch = pr.scheme
        if sch.name not in self.schemes:
            return f"{sch.name}: cuda.fp4.mma_gemv serves mxfp4 / nvfp4 (dualscale runs on triton.fp4)"
        if getattr(sch, "activation", None) is not None:
            return f"activation={sch.activation!r}: cuda.fp4.mma_gemv is weight-only (activation=None); " \
                   f"quantized activations run on triton.fp4"
        if pr.m > fp4.MAX_M:
            return f"M={pr.m} > {fp4.MAX_M}: cuda.fp4.mma_gemv is for decode-size M; the fp4 GEMMs serve larger M"
        if pr.act_dtype not in _HALF:
            return f"activations must be bf16 or fp16 (the MMA's input types), not {pr.act_dtype}"
        if pr.out_dtype not in (None, pr.act_dtype):
            return f"writes y in the activation dtype ({pr.act_dtype}), not {pr.out_dtype}"
        why = tm.check_fp4_problem(sch, pr.n, pr.k, pr.act_dtype)
        if why:
            return why
        if pr.k % 16:
            return f"K={pr.k}: needs K % 16 == 0"
        return None

    def run(self, x, p, bias):
        return fp4.run(x, p, bias)
