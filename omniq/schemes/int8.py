"""INT8 weights (symmetric, per output channel) with W8A8 or weight-only activations
(formats.md §2, the compressed-tensors `int-quantized` format as vLLM runs it).

Storage: `weight` int8 [N, K], `weight_scale` fp32 [N, 1]; static activations add
`input_scale` (1,) and, when asymmetric, `input_zero_point` int32 (1,) (int8 accepted).
Activation quantization copies vLLM's kernels operation by operation, because the tie
and division details decide the last code: true division for static symmetric, a
multiplication by the reciprocal otherwise, and for asymmetric (azp) the rint to int32
first, then the zero point added, then the saturation to int8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.errors import OmniqError
from omniq.schemes.base import AffineView, QuantizedWeight, QuantScheme, TensorSpec, check_choice, div_const
from omniq.schemes.fp8 import check_input_scale
from omniq.schemes.registry import scheme

ACTIVATIONS = ("dynamic_token", "static_tensor", None)
QMIN, QMAX = -128, 127
_TINY = torch.finfo(torch.float32).tiny
_SCALE_DTYPES = (torch.bfloat16, torch.float16)


def _sat_s8(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(QMIN, QMAX)


def int8_azp_codes(x: torch.Tensor, s: torch.Tensor, azp: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 codes sat_s8(rint(x * (1 / s)) + azp), float64 (the integer steps exact, as
    in vLLM's int32 arithmetic)."""
    return _sat_s8(torch.round(x * (1.0 / s)).double() + azp.double())


def _azp_fake_quant(x: torch.Tensor, s: torch.Tensor, azp: torch.Tensor) -> torch.Tensor:
    """(int8_azp_codes - azp) * s."""
    return (int8_azp_codes(x, s, azp) - azp.double()).float() * s


def int8_token_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale [M, 1]) of symmetric per-token int8 quantization of x (fp32 [M, K]), codes as
    fp32 integers: x times 127 / amax (one rounding: a tensor numerator, as torch computes
    `127 / t` as reciprocal(t) * 127), rounded half to even and saturated; scale amax / 127."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, QMAX) / amax, torch.zeros_like(amax))
    return _sat_s8(torch.round(x * inv)), div_const(amax, QMAX)


def int8_token_asym_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) [M, 1] of asymmetric per-token int8 quantization of x (fp32 [M, K]):
    (max - min) / 255, and round(-128 - min / scale) clamped to int32 as vLLM's cvt.rni.sat.s32
    does for tiny scales."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    s = div_const(hi - lo, 255.0)
    s = torch.where(s > 0, s, div_const(hi.abs(), QMAX).clamp(min=_TINY))
    return s, torch.round(-128.0 - lo / s).clamp(-2.0**31, 2.0**31 - 1)


@scheme("int8", aliases=("w8a8_int8",))
@dataclass(frozen=True)
class Int8Scheme(QuantScheme):
    """Symmetric per-channel int8 weights: s[n] = amax(W[n, :])/127, W_q = clamp(rne(W/s), -128, 127).

    activation (x fake-quantized exactly as vLLM's kernels do; rint = round half to even):
      "dynamic_token", act_symmetric=True:  s[m] = amax/127; x_q = sat(rint(x * (127/amax))), 0 if amax = 0
      "dynamic_token", act_symmetric=False: s[m] = (max-min)/255; azp[m] = rint(-128 - min/s);
                                            x_q = sat(rint(x * (1/s)) + azp)   (azp is int32, per token).
                                            A constant row (max = min, where vLLM divides by zero) uses
                                            s = max(|x|/127, tiny), so it comes back exactly.
      "static_tensor", act_symmetric=True:  x_q = sat(rint(x / input_scale))   (true division)
      "static_tensor", act_symmetric=False: x_q = sat(rint(x * (1/input_scale)) + input_zero_point)
      None: weight-only (W8A16).
    The activation is then (x_q - azp) * s.

    input_scale / input_zero_point: static only. `quantize(w)` stores them (1.0 and 0 when not
        given, placeholders); `calibrate(qw, x)` sets them from sample activations: symmetric
        input_scale = amax(x)/127; asymmetric over [min(x, 0), max(x, 0)]:
        input_scale = (max - min)/255, input_zero_point = clamp(rint(-128 - min/input_scale), -128, 127).
    """

    activation: str | None = "dynamic_token"
    act_symmetric: bool = True
    input_scale: float | None = None
    input_zero_point: int | None = None

    def __post_init__(self):
        check_choice("int8", "activation", self.activation, ACTIVATIONS)
        check_choice("int8", "act_symmetric", self.act_symmetric, (True, False))
        check_input_scale("int8", self.activation, self.input_scale)
        if self.input_zero_point is not None:
            if self.activation != "static_tensor" or self.act_symmetric:
                raise OmniqError("int8: input_zero_point is only used with activation='static_tensor' and "
                                 f"act_symmetric=False (got activation={self.activation!r}, "
                                 f"act_symmetric={self.act_symmetric}); drop it")
            if isinstance(self.input_zero_point, bool) or not isinstance(self.input_zero_point, int) \
                    or not QMIN <= self.input_zero_point <= QMAX:
                raise OmniqError(f"int8: invalid input_zero_point={self.input_zero_point!r}; it must be an "
                                 f"integer in [{QMIN}, {QMAX}]")

    # ---- description -------------------------------------------------------------------
    @property
    def activation_quantized(self) -> bool:
        return self.activation is not None

    @property
    def _static_asym(self) -> bool:
        return self.activation == "static_tensor" and not self.act_symmetric

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        specs = {"weight": TensorSpec((n, k), torch.int8, in_dim=1, out_dim=0),
                 "weight_scale": TensorSpec((n, 1), torch.float32, out_dim=0, also_accepts=_SCALE_DTYPES)}
        if self.activation == "static_tensor":
            specs["input_scale"] = TensorSpec((1,), torch.float32, per_tensor=True, also_accepts=_SCALE_DTYPES)
        if self._static_asym:
            specs["input_zero_point"] = TensorSpec((1,), torch.int32, per_tensor=True, also_accepts=(torch.int8,))
        return specs

    # ---- the three verbs -----------------------------------------------------------------
    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        amax = w.float().abs().amax(dim=1, keepdim=True)
        out = {"weight_scale": div_const(amax, QMAX).clamp(min=_TINY)}
        if self.activation == "static_tensor":
            s = 1.0 if self.input_scale is None else float(self.input_scale)
            out["input_scale"] = torch.tensor([s], dtype=torch.float32, device=w.device)
        if self._static_asym:
            z = 0 if self.input_zero_point is None else self.input_zero_point
            out["input_zero_point"] = torch.tensor([z], dtype=torch.int32, device=w.device)
        return out

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        s = scales["weight_scale"].float().reshape(n, 1)
        tensors = {"weight": _sat_s8(torch.round(w.float() / s)).to(torch.int8), "weight_scale": s}
        for t in ("input_scale", "input_zero_point"):
            if t in scales:
                tensors[t] = scales[t].reshape(1)
        return QuantizedWeight(self, (n, k), tensors)

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """The signed int8 weight codes as int32 [N, K]."""
        return qw.tensors["weight"].to(torch.int32)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        n, _ = qw.shape
        return qw.tensors["weight"].float() * qw.tensors["weight_scale"].float().reshape(n, 1)

    def affine_view(self, qw: QuantizedWeight) -> AffineView:
        n, k = qw.shape
        return AffineView(codes=self.unpack(qw), scales=qw.tensors["weight_scale"].float().reshape(n, 1),
                          offsets=None, group_size=k, bits=8, signed=True)

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        x = x.float()
        if self.activation is None:
            return x
        if self.activation == "static_tensor":
            s = qw.tensors["input_scale"].float().reshape(())
            if self.act_symmetric:
                return _sat_s8(torch.round(x / s)) * s
            return _azp_fake_quant(x, s, qw.tensors["input_zero_point"].reshape(()))
        if self.act_symmetric:
            q, s = int8_token_codes(x)
            return q * s
        s, azp = int8_token_asym_params(x)
        return _azp_fake_quant(x, s, azp)

    def calibrate(self, qw: QuantizedWeight, x: torch.Tensor) -> QuantizedWeight:
        """static_tensor: input_scale (and input_zero_point) from sample activations `x` [..., K]."""
        if self.activation != "static_tensor":
            return qw
        x = self.check_input(x, qw)
        tensors = dict(qw.tensors)
        if self.act_symmetric:
            tensors["input_scale"] = div_const(x.abs().amax(), QMAX).clamp(min=_TINY).reshape(1)
        else:
            lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
            s = div_const(hi - lo, 255.0).clamp(min=_TINY)
            tensors["input_scale"] = s.reshape(1)
            zp = torch.round(-128.0 - lo / s).clamp(QMIN, QMAX).to(torch.int32)
            tensors["input_zero_point"] = zp.reshape(1)
        return QuantizedWeight(self, qw.shape, tensors, name=qw.name)
