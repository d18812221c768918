"""Rotating copies of a prepared weight, for timing a kernel as it runs in a model: a layer's
weight is read once per forward pass, cold, so a timing loop that reads one copy again and again
(from L2 when it fits there) favours kernels that do more work per byte. The tuner
(`python -m omniq tune`), benchmarks/run.py and the probes rotate over copies made here.

The copies are clones: re-running a layout's `prepare` is not a copy when the layout adopts a
device tensor as it is (`w.contiguous().to(dev)` returns `w`), and the "copies" then share one
weight that sits in L2 (measured: fp8 12288x3072 timed 12.5 us that way, 20.6 us with clones;
benchmarks/results/h200-2026-11-29d/tunecheck2.txt).
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import types

import torch


def _is_leaf(obj) -> bool:
    """Values clone_prepared shares as they are (nothing inside them is a tensor we should copy)."""
    return (obj is None or isinstance(obj, (str, bytes, int, float, complex, bool, torch.dtype, torch.device,
                                            type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                                            types.MethodType, enum.Enum, range, slice))
            or callable(obj) and not hasattr(obj, "__dict__") and not dataclasses.is_dataclass(obj))


def _fields(obj) -> dict:
    """The attributes of a dataclass / plain object, including dataclass slots."""
    out = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.name not in out and hasattr(obj, f.name):
                out[f.name] = getattr(obj, f.name)
    return out


def _clone(obj, memo: dict, depth: int):
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:  # one tensor held twice stays one tensor in the copy
            c = obj.detach().clone()
            if isinstance(obj, torch.nn.Parameter):
                c = torch.nn.Parameter(c, requires_grad=obj.requires_grad)
            memo[id(obj)] = c
        return memo[id(obj)]
    if depth <= 0 or _is_leaf(obj):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = obj  # a cycle back to obj shares it rather than recursing forever
    if isinstance(obj, (list, tuple)):
        items = [_clone(v, memo, depth - 1) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            out = obj
        elif isinstance(obj, list):
            out = type(obj)(items) if type(obj) is not list else items
        elif hasattr(obj, "_fields"):  # a namedtuple
            out = type(obj)(*items)
        else:
            out = type(obj)(items)
    elif isinstance(obj, dict):
        items = {k: _clone(v, memo, depth - 1) for k, v in obj.items()}
        if all(items[k] is obj[k] for k in obj):
            out = obj
        else:
            out = copy.copy(obj)
            out.update(items)
    else:
        attrs = _fields(obj)
        new = {k: _clone(v, memo, depth - 1) for k, v in attrs.items()}
        changed = {k: v for k, v in new.items() if v is not attrs[k]}
        if not changed:
            out = obj
        else:
            out = copy.copy(obj)
            for k, v in changed.items():
                object.__setattr__(out, k, v)  # frozen dataclasses too
    memo[id(obj)] = out
    return out


def clone_prepared(obj, max_depth: int = 8):
    """A copy of a prepared layout object in which every torch.Tensor reachable through dataclass
    fields, __dict__, tuples, lists and dicts is a fresh `.clone()`; other values (ints, schemes,
    dtypes, functions) are shared, and an object holding no tensor is returned as it is. Cloning
    is how --graph makes the rotating copies of a kernel's weight: faster than re-preparing."""
    return _clone(obj, {}, max_depth)


def prepared_tensors(obj, max_depth: int = 8) -> list:
    """The distinct tensors clone_prepared would copy (reached the same way)."""
    seen: dict[int, torch.Tensor] = {}
    visited: set[int] = set()

    def walk(o, depth):
        if isinstance(o, torch.Tensor):
            seen.setdefault(id(o), o)
            return
        if depth <= 0 or _is_leaf(o) or id(o) in visited:
            return
        visited.add(id(o))
        if isinstance(o, (list, tuple)):
            vals = o
        elif isinstance(o, dict):
            vals = o.values()
        else:
            vals = _fields(o).values()
        for v in vals:
            walk(v, depth - 1)

    walk(obj, max_depth)
    return list(seen.values())


def prepared_nbytes(obj) -> int:
    """Bytes of the tensors in a prepared object (what one rotating copy adds)."""
    return sum(t.numel() * t.element_size() for t in prepared_tensors(obj))


MAX_COPIES = 8


def copies_for(nbytes: int, l2_bytes: int, cap: int = MAX_COPIES) -> int:
    """How many copies of a weight of `nbytes` make their rotation overflow an L2 of `l2_bytes`
    3x: at least 1, at most `cap`."""
    return max(1, min(cap, -(-3 * l2_bytes // max(int(nbytes), 1))))


def rotation_copies(nbytes: int, device: torch.device, cap: int = MAX_COPIES) -> int:
    """copies_for this device's L2 (1 off CUDA, or for an object with no tensor bytes)."""
    if device.type != "cuda" or nbytes <= 0:
        return 1
    return copies_for(nbytes, torch.cuda.get_device_properties(device).L2_cache_size, cap)


def rotating_copies(prepared, device: torch.device, cap: int = MAX_COPIES) -> list:
    """[prepared, clone, ...]: enough independent copies to keep each one out of L2 by the time
    it is read again (one off CUDA, or when the object holds no tensor to copy)."""
    n = rotation_copies(prepared_nbytes(prepared), device, cap)
    return [prepared] + [clone_prepared(prepared) for _ in range(n - 1)]
