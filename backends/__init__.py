"""Backends: one module per platform; importing this package registers their kernels.

Each module imports its vendor library lazily and reports its absence through
`Kernel.available()`, so every kernel is registered (and explained) on every machine.
"""
from importlib import import_module

BACKENDS = ("reference", "cpu", "triton", "cuda", "npu", "xpu")

for _name in BACKENDS:
    import_module(f"omniq.backends.{_name}")
import_module("omniq.backends.cuda_gemv_w8a8")  # noqa: E402  cuda.w8a8.gemv (NVRTC)
import_module("omniq.backends.cuda_fp4")  # noqa: E402  cuda.fp4.mma_gemv (NVRTC)
import_module("omniq.backends.cuda_mxfp8")  # noqa: E402  cuda.mxfp8.gemv (NVRTC)
