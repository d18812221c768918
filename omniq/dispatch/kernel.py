"""The Kernel protocol: what a backend declares about one way of computing scheme.matmul."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from omniq.schemes.base import QuantizedWeight, QuantScheme

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (the largest for bigger m): decisions are cached per bucket."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


@dataclass(frozen=True)
class Problem:
    """One linear problem: y[M, N] = x[M, K] @ W^T for a scheme, on a device."""

    scheme: QuantScheme
    n: int
    k: int
    m: int
    act_dtype: torch.dtype
    device: torch.device
    out_dtype: torch.dtype | None = None  # None: same as act_dtype

    @property
    def bucket(self) -> int:
        return m_bucket(self.m)

    def key(self) -> str:
        """Tuning-table key: the decision depends on the scheme, shape, M bucket and dtype."""
        return f"{self.scheme.key}|n={self.n}|k={self.k}|m={self.bucket}|{str(self.act_dtype).replace('torch.', '')}"


@dataclass(frozen=True)
class Layout:
    """A storage layout and how to build it once from a QuantizedWeight (after loading).

    Kernels naming the same layout share one prepared copy of the weight, so a layer can
    switch kernels per M without a second copy.
    """

    name: str
    prepare: Callable[[QuantizedWeight, torch.device], Any]


def _checkpoint_layout(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    return qw.to(device)


# The checkpoint tensors as they are, moved to the device.
CHECKPOINT = Layout("checkpoint", _checkpoint_layout)


class Kernel:
    """Base class. A kernel sets the class attributes and overrides the methods it needs.

    Reasons are short sentences a user can act on; None means "fine".
    """

    name: str = ""
    backend: str = ""            # cuda, triton, npu, xpu, cpu, reference
    schemes: tuple[str, ...] = ()  # scheme names served ("*" = every scheme)
    priority: int = 0            # static order when nothing was measured: higher first
    layout: Layout = CHECKPOINT

    def static_rank(self, problem: Problem) -> int:
        """The static order for `problem` (higher first): `priority`, unless a kernel that
        measured slower or faster than its neighbours over part of its range (an M range, a
        scheme) says otherwise."""
        return self.priority

    def serves(self, scheme: QuantScheme) -> str | None:
        """None when this kernel computes `scheme` (name and parameters), else the reason."""
        if "*" in self.schemes or scheme.name in self.schemes:
            return None
        return f"serves {', '.join(self.schemes)}, not {scheme.name}"

    def available(self, device: torch.device) -> str | None:
        """None when the kernel can run on `device` here (library importable, device type,
        capability), else the reason."""
        return None

    def can_implement(self, problem: Problem) -> str | None:
        """None when the kernel handles this shape/dtype, else the reason."""
        return None

    def run(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """y[M, N] in x.dtype for a 2-D x[M, K] and the prepared weight."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"
