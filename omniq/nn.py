"""Plain PyTorch / diffusers integration: QuantLinear and quantize_(model, spec).

    omniq.quantize_(model, "int8")                                   # every nn.Linear
    omniq.quantize_(model, {"scheme": "gptq", "bits": 4, "group_size": 128},
                    ignore=["proj_out", "*adaLN*"])

Quantize after moving the model to the device it will run on: each layer prepares its one
weight layout for that device, and releases the checkpoint-format tensors when the kernel's
layout differs from them (so quantizing saves the memory it promises).
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from omniq.errors import OmniqError
from omniq.linear import PreparedLinear, linear, prepare
from omniq.schemes import QuantScheme, get_scheme


def as_scheme(spec) -> QuantScheme:
    """A scheme from a name ("fp8"), a dict ({"scheme": "gptq", "bits": 4}) or a QuantScheme."""
    if isinstance(spec, QuantScheme):
        return spec
    if isinstance(spec, str):
        return get_scheme(spec)
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("scheme", None) or params.pop("method", None)
        if name is None:
            raise OmniqError(f"scheme spec {spec!r} needs a 'scheme' key, e.g. {{'scheme': 'int8'}}")
        return get_scheme(name, **params)
    raise OmniqError(f"cannot build a scheme from {type(spec).__name__}; pass a name, a dict or a QuantScheme")


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight; forward calls omniq.linear (the dispatcher)."""

    def __init__(self, prepared: PreparedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        self.prepared = prepared
        self.in_features, self.out_features = prepared.k, prepared.n
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, scheme: QuantScheme, name: str | None = None) -> "QuantLinear":
        qw = scheme.quantize(layer.weight.detach(), name=name)
        p = prepare(qw, layer.weight.device, act_dtype=layer.weight.dtype)
        return cls(p, layer.bias)

    @property
    def scheme(self) -> QuantScheme:
        return self.prepared.qw.scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.prepared.device:
            raise OmniqError(f"layer {self.prepared.qw.name!r}: input is on {x.device} but the weight was "
                             f"prepared for {self.prepared.device}; move the model before omniq.quantize_()")
        return linear(x, self.prepared, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.key}, layout={self.prepared.layout}")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.endswith("." + p) for p in patterns)


def quantize_(model: nn.Module, spec, ignore=(), verbose: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear, except `ignore`d ones.

    `ignore` entries are module names, name suffixes ("proj_out") or glob patterns ("*.adaLN*").
    Layers whose K does not fit the scheme's block are left in full precision with a warning
    listing them, rather than failing the whole model.
    """
    scheme = as_scheme(spec)
    skipped = []
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _matches(n, ignore)]
    for i, (name, layer) in enumerate(targets):
        if scheme.k_multiple > 1 and layer.in_features % scheme.k_multiple:
            skipped.append(name)
            continue
        q = QuantLinear.from_linear(layer, scheme, name=name)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, q)
        if verbose:
            print(f"[omniq] {i + 1}/{len(targets)} {name}: {scheme.key} layout={q.prepared.layout}")
    if skipped:
        import warnings
        warnings.warn(f"omniq.quantize_: left {len(skipped)} layer(s) unquantized because K is not a multiple "
                      f"of {scheme.k_multiple}: {skipped}")
    return model
