"""Backends: one module per platform; importing this package registers their kernels.

Each module imports its vendor library lazily and reports its absence through
`Kernel.available()`, so every kernel is registered (and explained) on every machine.
"""
from importlib import import_module

BACKENDS = ("reference", "cpu", "triton", "cuda", "npu", "xpu")

for _name in BACKENDS:
    import_module(f"omniq.backends.{_name}")
