"""The kernel registry. Backends fill it when `omniq.backends` is imported (lazily, on first
dispatch); other packages add kernels through the entry-point group `omniq.kernels`, whose
entries are callables that register kernels (or modules that do so on import)."""
from __future__ import annotations

import logging
import threading
from importlib import import_module, metadata

from omniq.dispatch.kernel import Kernel

log = logging.getLogger("omniq")

_KERNELS: dict[str, Kernel] = {}
_LOADED = False
_LOCK = threading.Lock()
ENTRY_POINT_GROUP = "omniq.kernels"


def register_kernel(kernel: Kernel | type) -> Kernel:
    """Add a kernel (instance or class, usable as a decorator). Names must be unique."""
    k = kernel() if isinstance(kernel, type) else kernel
    if not k.name or not k.backend:
        raise ValueError(f"kernel {k!r} must set `name` and `backend`")
    if k.name in _KERNELS and type(_KERNELS[k.name]) is not type(k):
        raise ValueError(f"kernel name {k.name!r} is already registered by {type(_KERNELS[k.name]).__name__}")
    _KERNELS[k.name] = k
    return kernel


def _load() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        import_module("omniq.backends")
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, type):
                    obj()
            except Exception as e:  # a broken plugin must not break omniq; say so
                log.warning("omniq: kernel plugin %r failed to load: %s", ep.name, e)


def all_kernels() -> list[Kernel]:
    """Every registered kernel, loading the backends and plugins on first use."""
    if not _LOADED:
        _load()
    return list(_KERNELS.values())


def get_kernel(name: str) -> Kernel:
    kernels = {k.name: k for k in all_kernels()}
    if name not in kernels:
        from omniq.errors import KernelError
        raise KernelError(f"unknown kernel {name!r}; registered kernels: {sorted(kernels)}")
    return kernels[name]
