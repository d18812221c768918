"""QuantScheme: one quantization method, defined by three verbs (scale, pack, matmul).

A scheme is pure tensor math with no device logic. Its `matmul` is the reference that every
kernel on every backend is tested against.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from omniq.errors import OmniqError, where


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and sharding facts of one storage tensor of a scheme.

    `in_dim` / `out_dim` name the tensor dimension that runs along the input (K) / output (N)
    features, and `in_step` / `out_step` how many logical features one index there covers
    (8 for int4 packed in int32, the group size for group scales). vLLM's loaders use them
    to shard the tensor under tensor parallelism. `per_tensor` marks a scalar that fused
    layers (qkv, gate/up) keep once per shard. `rank0_only` marks a per-output-channel term
    computed over the full K (msModelSlim's `quant_bias`): a row-parallel layer, whose ranks
    each sum part of K, adds it on one rank only (zeros elsewhere).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    in_dim: int | None = None
    in_step: int = 1
    out_dim: int | None = None
    out_step: int = 1
    optional: bool = False
    per_tensor: bool = False
    also_accepts: tuple[torch.dtype, ...] = ()
    rank0_only: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class AffineView:
    """Integer weight in one common form: W[n, k] = codes[n, k] * scales[n, g] + offsets[n, g].

    g = g_idx[k] when g_idx is given (GPTQ act-order), else k // group_size. Integer schemes
    (GPTQ, AWQ, int8, msModelSlim, GGUF legacy blocks) provide this so that one kernel family
    serves all of them. `codes` hold the stored integers (unsigned or signed, per `signed`).
    """

    codes: torch.Tensor          # int32 [N, K]
    scales: torch.Tensor         # float32 [N, G]
    offsets: torch.Tensor | None  # float32 [N, G], None when zero
    group_size: int
    bits: int
    signed: bool
    g_idx: torch.Tensor | None = None


class QuantizedWeight:
    """A quantized weight: its scheme, logical shape (N, K) and named storage tensors.

    Tensor names and dtypes follow the method's public checkpoint format (GPTQ `qweight`,
    ModelOpt `weight_scale_2`, ...). Construction validates them against the scheme.
    """

    def __init__(self, scheme: "QuantScheme", shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                 name: str | None = None, validate: bool = True):
        self.scheme = scheme
        self.shape = (int(shape[0]), int(shape[1]))
        self.tensors = dict(tensors)
        self.name = name
        if validate:
            scheme.validate(self)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.scheme, self.shape, {k: v.to(device) for k, v in self.tensors.items()},
                               name=self.name, validate=False)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
                          for k, v in self.tensors.items())
        return f"QuantizedWeight({self.scheme!r}, shape={self.shape}, {parts})"


@dataclass(frozen=True)
class QuantScheme:
    """Base class of every method. Subclasses are frozen dataclasses whose fields are the
    method's parameters; they set `name` and implement the abstract verbs below."""

    name: ClassVar[str] = ""
    # Granularity of K a scheme needs (MX: 32, NVFP4: 16, K-quants: 256); 1 = any K.
    k_multiple: ClassVar[int] = 1

    # ---- description -------------------------------------------------------------------
    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        """The storage tensors of an N x K weight, by checkpoint name."""
        raise NotImplementedError

    @property
    def activation_quantized(self) -> bool:
        """True when the method quantizes activations (W8A8, W4A4...), False for weight-only."""
        return False

    @property
    def key(self) -> str:
        """Stable text naming the scheme and its parameters (tuning tables, explain)."""
        fields = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})"

    def nominal_nbytes(self, n: int, k: int) -> int:
        """Bytes the format promises for an N x K weight (required tensors only)."""
        return sum(s.nbytes for s in self.tensor_specs(n, k).values() if not s.optional)

    # ---- the three verbs -----------------------------------------------------------------
    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantization parameters for weight `w` [N, K] (scales, zero points, exponents)."""
        raise NotImplementedError

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Quantize `w` with `scales` and bit-pack into the format's storage tensors."""
        raise NotImplementedError

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """The integer codes [N, K] held in the packed storage (exact inverse of the packing)."""
        raise NotImplementedError

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """float32 [N, K] weight the format represents."""
        raise NotImplementedError

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        """Fake-quantize a float32 [M, K] activation as the method's kernels do (identity for
        weight-only methods)."""
        return x

    def affine_view(self, qw: QuantizedWeight) -> AffineView | None:
        """The weight as AffineView when it is integer codes with group scales, else None."""
        return None

    def calibrate(self, qw: QuantizedWeight, x: torch.Tensor) -> QuantizedWeight:
        """Fit static activation parameters (e.g. `input_scale`) to sample activations `x`
        [..., K]; returns a new QuantizedWeight. Methods without static activation
        parameters return `qw` unchanged."""
        return qw

    def quantize(self, w: torch.Tensor, name: str | None = None) -> QuantizedWeight:
        self.check_weight(w, name)
        qw = self.pack(w, self.scale(w))
        qw.name = name
        return qw

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Reference: y = fakequant(x) @ dequantize(qw)^T + bias, in fp32, returned in x.dtype."""
        n, k = qw.shape
        x2 = self.check_input(x, qw)
        y = self.quantize_activation(x2, qw) @ self.dequantize(qw).T
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    # ---- checks --------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        k = qw.shape[1]
        if x.shape[-1] != k:
            raise OmniqError(f"{where(qw.name)}activation has {x.shape[-1]} input features, the weight "
                             f"expects K={k}; pass x of shape [..., {k}]")
        return x.reshape(-1, k).float()

    def check_weight(self, w: torch.Tensor, name: str | None = None) -> None:
        """Reject what no method can quantize: not 2-D, not floating point, NaN/Inf, bad K."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise OmniqError(f"{where(name)}{self.name}: weight must be a 2-D tensor [N, K] "
                             f"(out_features, in_features); got {shape}")
        if not w.is_floating_point():
            raise OmniqError(f"{where(name)}{self.name}: weight must be floating point to quantize; got "
                             f"{w.dtype}. Pre-quantized tensors go in QuantizedWeight(...) directly")
        bad = ~torch.isfinite(w)
        if bad.any():
            idx = bad.nonzero()[:5].tolist()
            raise OmniqError(f"{where(name)}{self.name}: weight has {int(bad.sum())} NaN/Inf values "
                             f"(first at [n, k] = {idx}); fix the checkpoint before quantizing")
        k = w.shape[1]
        if self.k_multiple > 1 and k % self.k_multiple:
            raise OmniqError(f"{where(name)}{self.name}: K={k} input features is not a multiple of the "
                             f"block size {self.k_multiple}; pad the layer or leave it unquantized")

    def validate(self, qw: QuantizedWeight) -> None:
        """Check that `qw` holds every required tensor with the shape and dtype of the format."""
        n, k = qw.shape
        specs = self.tensor_specs(n, k)
        missing = [t for t, s in specs.items() if not s.optional and t not in qw.tensors]
        if missing:
            raise OmniqError(f"{where(qw.name)}{self.name}: missing tensor(s) {missing}; a {n}x{k} weight "
                             f"needs {sorted(t for t, s in specs.items() if not s.optional)}")
        unknown = [t for t in qw.tensors if t not in specs]
        if unknown:
            raise OmniqError(f"{where(qw.name)}{self.name}: unexpected tensor(s) {unknown}; "
                             f"this format stores {sorted(specs)}")
        for t, tensor in qw.tensors.items():
            s = specs[t]
            if tensor.dtype != s.dtype and tensor.dtype not in s.also_accepts:
                allowed = [str(d) for d in (s.dtype, *s.also_accepts)]
                raise OmniqError(f"{where(qw.name)}{self.name}: tensor {t!r} has dtype {tensor.dtype}, "
                                 f"expected {' or '.join(allowed)}")
            if tuple(tensor.shape) != tuple(s.shape) and not (s.per_tensor and tensor.numel() == 1):
                raise OmniqError(f"{where(qw.name)}{self.name}: tensor {t!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(s.shape)} for a {n}x{k} weight")


def div_const(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c rounded once on every device. On CUDA torch turns a division by a Python number into
    a multiplication by its reciprocal (two roundings), so `amax / 448` there can differ by an ulp
    from the kernels' (and the CPU's) correctly rounded quotient, and with it every code of a row."""
    return t / torch.full_like(t, c)


def check_choice(scheme: str, param: str, value, allowed) -> None:
    """Raise a clear error when a scheme parameter is not one of `allowed`."""
    if value not in allowed:
        raise OmniqError(f"{scheme}: invalid {param}={value!r}; allowed: {list(allowed)}")
