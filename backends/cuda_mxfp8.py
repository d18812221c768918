"""cuda.mxfp8.gemv: omniq's NVRTC-compiled MXFP8 GEMV for decode-size M (1..16), W8A8 and W8A16
(code in omniq.kernels.cuda_mxfp8_gemv). It reads the "triton.mxfp8.v1" layout in place, so a
layer switches between it and the Triton mxfp8 kernels per M with one weight copy.
"""
from __future__ import annotations

from omniq.backends.cuda import NvrtcCudaKernel
from omniq.dispatch import register_kernel
from omniq.kernels import cuda_mxfp8_gemv as mx8
from omniq.kernels import triton_mx as tm


@register_kernel
class CudaMXFP8Gemv(NvrtcCudaKernel):
    """Decode-size MXFP8: 16-byte e4m3 weight loads decoded exactly into bf16 mma.sync fragments
    with the group's power of two folded in; W8A8 quantizes x first (one exact Triton pass)."""
    name = "cuda.mxfp8.gemv"
    schemes = ("mxfp8",)
    priority = 30           # above triton.mxfp8.splitk (20) for M <= 16
    layout = tm.MXFP8
    max_m = mx8.MAX_M

    def can_implement(self, pr):
        sch = pr.scheme
        if sch.name not in self.schemes:
            return f"{sch.name}: cuda.mxfp8.gemv serves mxfp8 only"
        why = self.decode_reason(pr) or mx8.activation_reason(sch, pr.act_dtype)
        if why:
            return why
        if pr.k % 16:
            return f"K={pr.k}: needs K % 16 == 0 (16-byte loads); triton.mxfp8.splitk serves ragged K"
        if sch.activation is not None and tm.triton is None:
            return "W8A8 quantizes x with omniq's Triton pass first; Triton is not installed"
        return None

    def run(self, x, p, bias):
        return mx8.run(x, p, bias)
