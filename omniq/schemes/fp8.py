"""FP8 (E4M3FN) weights, with W8A8 or weight-only (W8A16) activations (formats.md §1).

Storage follows the public checkpoints: `weight` float8_e4m3fn [N, K] and `weight_scale`
fp32 (per tensor or per output channel), or DeepSeek-style 128x128 blocks with
`weight_scale_inv` [ceil(N/128), ceil(K/128)]; static activations add `input_scale`.
Every stored scale multiplies to dequantize, `weight_scale_inv` included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.formats.fp8 import E4M3_MAX, saturating_cast
from omniq.errors import OmniqError
from omniq.schemes.base import QuantizedWeight, QuantScheme, TensorSpec, check_choice, div_const
from omniq.schemes.registry import scheme

WEIGHT_GRANULARITIES = ("tensor", "channel", "block")
ACTIVATIONS = ("dynamic_token", "dynamic_tensor", "static_tensor", "block", None)
BLOCK = 128                                  # DeepSeek-V3 weight block and activation group
TOKEN_SCALE_MIN = 1.0 / (E4M3_MAX * 512.0)  # vLLM's floor on per-token scales
GROUP_EPS = 1e-10                            # vLLM's per-token-group amax floor
_TINY = torch.finfo(torch.float32).tiny      # keeps weight/static scales > 0 (no 0/0)
_SCALE_DTYPES = (torch.bfloat16, torch.float16)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_input_scale(scheme_name: str, activation, input_scale) -> None:
    """`input_scale=` is a positive finite number, and only for static activations."""
    if input_scale is None:
        return
    if activation != "static_tensor":
        raise OmniqError(f"{scheme_name}: input_scale={input_scale!r} is only used with "
                         f"activation='static_tensor' (got activation={activation!r}); drop it")
    ok = isinstance(input_scale, (int, float)) and not isinstance(input_scale, bool)
    if not ok or not 0 < float(input_scale) < float("inf"):
        raise OmniqError(f"{scheme_name}: invalid input_scale={input_scale!r}; it must be a positive finite "
                         f"float (or None to calibrate it from sample activations)")


def fp8_activation_codes(x: torch.Tensor, activation: str, input_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes e4m3, scale) of x (fp32 [M, K]) for a dynamic_token / dynamic_tensor / static_tensor
    activation: what FP8Scheme.quantize_activation fake-quantizes with, and what a kernel that
    needs codes and scales computes. scale: [M, 1] per token, else a 0-dim tensor."""
    if activation == "dynamic_token":
        s = div_const(x.abs().amax(dim=-1, keepdim=True), E4M3_MAX).clamp(min=TOKEN_SCALE_MIN)
        return saturating_cast(x / s), s
    if activation == "dynamic_tensor":
        s = div_const(x.abs().amax(), E4M3_MAX)
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        return saturating_cast(x * inv), s
    if activation == "static_tensor":
        s = input_scale.float().reshape(())
        return saturating_cast(x * (1.0 / s)), s
    raise ValueError(f"fp8 activation {activation!r}: no per-token or per-tensor codes (block groups are 1 x 128)")


def _block_amax(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """amax of |t| over (rows x cols) tiles, partial edge tiles included."""
    n, k = t.shape
    nb, kb = _ceil_div(n, rows), _ceil_div(k, cols)
    padded = torch.zeros(nb * rows, kb * cols, dtype=torch.float32, device=t.device)
    padded[:n, :k] = t.abs()  # zero padding never raises an amax
    return padded.reshape(nb, rows, kb, cols).amax(dim=(1, 3))


@scheme("fp8", aliases=("w8a8_fp8",))
@dataclass(frozen=True)
class FP8Scheme(QuantScheme):
    """FP8 E4M3 weights with optional FP8 activations.

    weight_granularity: "tensor" (`weight_scale` (1,)), "channel" (`weight_scale` [N, 1]) or
        "block" (128x128 tiles, `weight_scale_inv` [ceil(N/128), ceil(K/128)], edge tiles partial).
    activation: how the kernels quantize x, exactly as vLLM does:
        "dynamic_token"  s[m] = max(amax(x[m])/448, 1/(448*512)); x_q = sat(x / s[m])
        "dynamic_tensor" s = amax(x)/448 (no floor; x == 0 gives 0); x_q = sat(x * (1/s))
        "static_tensor"  s = input_scale (stored); x_q = sat(x * (1/s))
        "block"          1 x 128 token groups: s = max(amax, 1e-10) * (1/448); x_q = sat(x / s)
        None             weight-only (W8A16): x is used as is.
    input_scale: for "static_tensor" only. `quantize(w)` stores it as `input_scale`; when it is
        None, `quantize` stores 1.0, a placeholder: call `calibrate(qw, x)` with sample
        activations to set input_scale = amax(x)/448, or pass `input_scale=`.
    """

    weight_granularity: str = "channel"
    activation: str | None = "dynamic_token"
    input_scale: float | None = None

    def __post_init__(self):
        check_choice("fp8", "weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        check_choice("fp8", "activation", self.activation, ACTIVATIONS)
        check_input_scale("fp8", self.activation, self.input_scale)

    # ---- description -------------------------------------------------------------------
    @property
    def activation_quantized(self) -> bool:
        return self.activation is not None

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        specs = {"weight": TensorSpec((n, k), torch.float8_e4m3fn, in_dim=1, out_dim=0)}
        if self.weight_granularity == "tensor":
            specs["weight_scale"] = TensorSpec((1,), torch.float32, per_tensor=True, also_accepts=_SCALE_DTYPES)
        elif self.weight_granularity == "channel":
            specs["weight_scale"] = TensorSpec((n, 1), torch.float32, out_dim=0, also_accepts=_SCALE_DTYPES)
        else:
            specs["weight_scale_inv"] = TensorSpec((_ceil_div(n, BLOCK), _ceil_div(k, BLOCK)), torch.float32,
                                                   in_dim=1, in_step=BLOCK, out_dim=0, out_step=BLOCK,
                                                   also_accepts=_SCALE_DTYPES)
        if self.activation == "static_tensor":
            specs["input_scale"] = TensorSpec((1,), torch.float32, per_tensor=True, also_accepts=_SCALE_DTYPES)
        return specs

    @property
    def _scale_name(self) -> str:
        return "weight_scale_inv" if self.weight_granularity == "block" else "weight_scale"

    # ---- the three verbs -----------------------------------------------------------------
    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.float()
        if self.weight_granularity == "tensor":
            amax = w.abs().amax().reshape(1)
        elif self.weight_granularity == "channel":
            amax = w.abs().amax(dim=1, keepdim=True)
        else:
            amax = _block_amax(w, BLOCK, BLOCK)
        out = {self._scale_name: div_const(amax, E4M3_MAX).clamp(min=_TINY)}
        if self.activation == "static_tensor":
            s = 1.0 if self.input_scale is None else float(self.input_scale)
            out["input_scale"] = torch.tensor([s], dtype=torch.float32, device=w.device)
        return out

    def _expand(self, s: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """A stored weight scale broadcast to [N, K] (or a broadcastable shape)."""
        s = s.float()
        if self.weight_granularity == "tensor":
            return s.reshape(1, 1)
        if self.weight_granularity == "channel":
            return s.reshape(n, 1)
        return s.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        s = self._expand(scales[self._scale_name], n, k)
        tensors = {"weight": saturating_cast(w.float() / s),
                   self._scale_name: scales[self._scale_name].float()}
        if self.activation == "static_tensor":
            tensors["input_scale"] = scales["input_scale"].float().reshape(1)
        return QuantizedWeight(self, (n, k), tensors)

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """The E4M3 bit patterns of `weight`, as int32 [N, K] (0..255)."""
        return qw.tensors["weight"].view(torch.uint8).to(torch.int32)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        n, k = qw.shape
        return qw.tensors["weight"].float() * self._expand(qw.tensors[self._scale_name], n, k)

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        x = x.float()
        if self.activation is None:
            return x
        if self.activation != "block":
            q, s = fp8_activation_codes(x, self.activation, qw.tensors.get("input_scale"))
            return q.float() * s
        # "block": 1 x 128 groups along K; the last group may be partial
        m, k = x.shape
        g = _ceil_div(k, BLOCK)
        xp = torch.zeros(m, g * BLOCK, dtype=torch.float32, device=x.device)
        xp[:, :k] = x
        xp = xp.reshape(m, g, BLOCK)
        inv_max = torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32)  # the Triton kernel's amax * (1/448)
        s = xp.abs().amax(dim=-1, keepdim=True).clamp(min=GROUP_EPS) * inv_max
        return (saturating_cast(xp / s).float() * s).reshape(m, g * BLOCK)[:, :k]

    def calibrate(self, qw: QuantizedWeight, x: torch.Tensor) -> QuantizedWeight:
        """static_tensor: input_scale = amax(x)/448 over the sample activations `x` [..., K]."""
        if self.activation != "static_tensor":
            return qw
        x = self.check_input(x, qw)
        s = div_const(x.abs().amax(), E4M3_MAX).clamp(min=_TINY).reshape(1)
        return QuantizedWeight(self, qw.shape, {**qw.tensors, "input_scale": s}, name=qw.name)
