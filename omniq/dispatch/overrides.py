"""User overrides: force one kernel or disable some, from the environment or from Python.

OMNIQ_KERNEL=<name>            force a kernel (an error, never a fallback, if it cannot run)
OMNIQ_DISABLE_KERNELS=a,b      remove kernels from consideration
with omniq.use_kernel(name):   the same as OMNIQ_KERNEL, for a block of code
with omniq.disable_kernels(*names):
"""
from __future__ import annotations

import contextlib
import os
import threading

_state = threading.local()
# Bumped whenever the overrides change, so cached decisions made under other overrides expire.
_generation = [0]


def _stack(attr: str) -> list:
    if not hasattr(_state, attr):
        setattr(_state, attr, [])
    return getattr(_state, attr)


# os.environ's live store on POSIX (bytes keys, kept in step by os.environ's own setters):
# reading it skips _Environ's per-call key encoding, most of generation()'s cost, and
# generation() runs on every omniq.linear call.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_FORCE_KEY, _DISABLE_KEY = b"OMNIQ_KERNEL", b"OMNIQ_DISABLE_KERNELS"


def generation() -> tuple:
    if _ENV_DATA is not None:
        return (_generation[0], _ENV_DATA.get(_FORCE_KEY), _ENV_DATA.get(_DISABLE_KEY))
    return (_generation[0], os.environ.get("OMNIQ_KERNEL", ""), os.environ.get("OMNIQ_DISABLE_KERNELS", ""))


def forced_kernel() -> str | None:
    forced = _stack("forced")
    if forced:
        return forced[-1]
    return os.environ.get("OMNIQ_KERNEL") or None


def disabled_kernels() -> set[str]:
    names = {n.strip() for n in os.environ.get("OMNIQ_DISABLE_KERNELS", "").split(",") if n.strip()}
    for group in _stack("disabled"):
        names |= group
    return names


@contextlib.contextmanager
def use_kernel(name: str):
    """Force kernel `name` for omniq.linear calls inside the block."""
    from omniq.dispatch.registry import get_kernel
    get_kernel(name)  # an unknown name is an error now, not at the first call
    _stack("forced").append(name)
    _generation[0] += 1
    try:
        yield
    finally:
        _stack("forced").pop()
        _generation[0] += 1


@contextlib.contextmanager
def disable_kernels(*names: str):
    """Remove kernels from consideration inside the block."""
    _stack("disabled").append(set(names))
    _generation[0] += 1
    try:
        yield
    finally:
        _stack("disabled").pop()
        _generation[0] += 1
