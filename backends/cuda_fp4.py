"""cuda.fp4.mma_gemv: omniq's NVRTC-compiled MXFP4 / NVFP4 weight-only GEMV for decode-size M
(1..16), E2M1 decoded straight into mma.sync fragments (code in omniq.kernels.cuda_fp4_mma). It
reads the "triton.fp4.v1" layout in place, so a layer switches between it and the Triton fp4
kernels per M with one weight copy.
"""
from __future__ import annotations

from omniq.backends.cuda import NvrtcCudaKernel
from omniq.dispatch import register_kernel
from omniq.kernels import cuda_fp4_mma as fp4
from omniq.kernels import triton_mx as tm

@register_kernel
class CudaFP4MmaGemv(NvrtcCudaKernel):
    """Decode-size MXFP4 / NVFP4 weight-only: 16-byte weight loads decoded into mma.sync fragments
    with the group factor folded in exactly, split-K over CTAs."""
    name = "cuda.fp4.mma_gemv"
    schemes = ("mxfp4", "nvfp4")
    priority = 30           # above triton.fp4.splitk for M <= 16
    layout = tm.FP4
    max_m = fp4.MAX_M

    def can_implement(self, pr):
        sch = pr.scheme
        if sch.name not in self.schemes:
            return f"{sch.name}: cuda.fp4.mma_gemv serves mxfp4 / nvfp4 (dualscale runs on triton.fp4)"
        if getattr(sch, "activation", None) is not None:
            return f"activation={sch.activation!r}: cuda.fp4.mma_gemv is weight-only (activation=None); " \
                   f"quantized activations run on triton.fp4"
        why = self.decode_reason(pr)
        if why:
            return why
        why = tm.check_fp4_problem(sch, pr.n, pr.k, pr.act_dtype)
        if why:
            return why
        if pr.k % 16:
            return f"K={pr.k}: needs K % 16 == 0"
        return None

    def run(self, x, p, bias):
        return fp4.run(x, p, bias)
