"""A toy scheme and toy kernels for testing the dispatcher on its own, independent of the real
schemes and backends. Registered by the `toy` fixture and removed afterwards."""
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from omniq.dispatch import Kernel, Layout
from omniq.schemes.base import QuantizedWeight, QuantScheme, TensorSpec


@dataclass(frozen=True)
class ToyScheme(QuantScheme):
    """Symmetric per-channel int8, weight-only."""

    name: ClassVar[str] = "toy"

    def tensor_specs(self, n, k):
        return {"weight": TensorSpec((n, k), torch.int8, in_dim=1, out_dim=0),
                "weight_scale": TensorSpec((n, 1), torch.float32, out_dim=0)}

    def scale(self, w):
        return {"weight_scale": (w.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)}

    def pack(self, w, scales):
        q = torch.round(w.float() / scales["weight_scale"]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(self, tuple(w.shape), {"weight": q, **scales})

    def unpack(self, qw):
        return qw.tensors["weight"].to(torch.int32)

    def dequantize(self, qw):
        return qw.tensors["weight"].float() * qw.tensors["weight_scale"]


def _transposed(qw, device):
    # a second layout: the weight stored [K, N], as some GEMMs want it
    return {"wt": qw.tensors["weight"].t().contiguous().to(device), "s": qw.tensors["weight_scale"].to(device)}


TRANSPOSED = Layout("test.toy.transposed", _transposed)


class ToyFast(Kernel):
    name = "test.toy.fast"
    backend = "test"
    schemes = ("toy",)
    priority = 10

    def run(self, x, qw, bias):
        return qw.scheme.matmul(x, qw, bias)


class ToySlow(Kernel):
    """Valid everywhere, slower by construction (sleeps)."""

    name = "test.toy.slow"
    backend = "test"
    schemes = ("toy",)
    priority = 5

    def run(self, x, qw, bias):
        time.sleep(0.03)
        return qw.scheme.matmul(x, qw, bias)


class ToyLargeM(Kernel):
    """Only for M > 16, on its own layout."""

    name = "test.toy.large_m"
    backend = "test"
    schemes = ("toy",)
    priority = 20
    layout = TRANSPOSED

    def can_implement(self, problem):
        return None if problem.m > 16 else f"needs M > 16, got M={problem.m}"

    def run(self, x, prepared, bias):
        y = (x.float() @ prepared["wt"].float()) * prepared["s"].t()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


TOY_KERNELS = (ToyFast, ToySlow, ToyLargeM)
