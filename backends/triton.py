"""Portable Triton kernels (valid wherever Triton compiles: CUDA, ROCm, XPU).

On a CPU device they run only under the Triton interpreter (TRITON_INTERPRET=1) and only
when forced (omniq.use_kernel): that mode exists for tests, not for speed.
"""
from omniq.backends import triton_int, triton_fp  # noqa: F401  (each registers its kernels)
