"""msModelSlim (Ascend) W8A8 static, W8A8 dynamic and W4A8 dynamic, as vLLM-Ascend consumes them.

Layouts and formulas: formats.md §6. Tensor names are msModelSlim's checkpoint names.

  "w8a8"          static per-tensor asymmetric int8 activations (`input_scale`, `input_offset`),
                  per-channel int8 weights; the kernel computes
                  (x_q @ W_q^T + quant_bias) * deq_scale, with `deq_scale` fp32 or int64 holding
                  the fp32 bits, and the activation offset folded into `quant_bias`.
  "w8a8_dynamic"  per-token symmetric dynamic int8 activations, per-channel (or per-group) int8
                  weights with `weight_scale` / `weight_offset`.
  "w4a8_dynamic"  per-token int8 activations, int4 weights: version "1.0.0" packs two int4 along
                  the OUTPUT dim into int8 [N/2, K] with a per-channel scale and a `scale_bias`
                  correction term; version "0" keeps int4 values in int8 [N, K] with a second,
                  per-group scale.

Rounding is torch.round (RNE) everywhere, as msModelSlim's fake quantizers and npu_quantize /
npu_dynamic_quant do (whether the NPU rounds ties to even is unverified; formats.md §6.1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.errors import OmniqError, where
from omniq.formats.packing import pack_nibbles, unpack_nibbles
from omniq.schemes.base import AffineView, QuantizedWeight, QuantScheme, TensorSpec, check_choice, div_const
from omniq.schemes.registry import scheme

INT8_MIN, INT8_MAX = -128, 127
INT4_MIN, INT4_MAX = -8, 7
DEQ_SCALE_DTYPES = ("float32", "int64")
W4A8_VERSIONS = ("1.0.0", "0")   # "1.0.0": packed along N, per-channel; "0": the older per-group format
W4A8_LEGACY_GROUP_SIZE = 256     # msModelSlim / vLLM-Ascend default for the old format
SCALE_BIAS_SLICES = 16           # row-parallel layers keep one scale_bias per 1/16 of K
# What quantize() stores when no input_scale is given, as the other static schemes do: a
# placeholder until calibrate(qw, x) fits it to sample activations.
PLACEHOLDER_INPUT_SCALE = 1.0

_FLOATS = (torch.float16, torch.bfloat16)


# ---- deq_scale: fp32, or int64 holding the fp32 bit pattern --------------------------------
def encode_deq_scale_int64(deq: torch.Tensor) -> torch.Tensor:
    """fp32 deq_scale -> int64 the msModelSlim way: the fp32 bits as int32, sign-extended
    (np.frombuffer(fp32.tobytes(), int32).astype(int64))."""
    return deq.float().contiguous().view(torch.int32).to(torch.int64)


def decode_deq_scale(deq: torch.Tensor) -> torch.Tensor:
    """deq_scale in either storage -> fp32. int64 values carry the fp32 bits in their low 32 bits."""
    if deq.dtype == torch.int64:
        low = deq & 0xFFFFFFFF
        low = torch.where(low >= 2**31, low - 2**32, low)
        return low.to(torch.int32).contiguous().view(torch.float32)
    return deq.float()


# ---- activations -----------------------------------------------------------------------------
def quantize_static_int8(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """x_q = sat_s8(round(x / input_scale + input_offset)), as float codes (formats.md §6.1)."""
    return torch.round(x.float() / input_scale.float() + input_offset.float()).clamp(INT8_MIN, INT8_MAX)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_quant: s_t = rowmax|x| / 127, x_q = round(x / s_t). Returns (codes, s_t [M, 1])."""
    x = x.float()
    s = div_const(x.abs().amax(dim=-1, keepdim=True), INT8_MAX)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(x / safe).clamp(INT8_MIN, INT8_MAX), s


def _scale_from_amax(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    # An all-zero row or group quantizes to zeros whatever its scale; 1.0 keeps divisions finite.
    s = amax.float() / qmax
    return torch.where(s == 0, torch.ones_like(s), s)


def _zero_offsets(qw: QuantizedWeight, names) -> bool:
    return all(t not in qw.tensors or not bool(qw.tensors[t].float().ne(0).any()) for t in names)


class _MsModelSlim(QuantScheme):
    """Shared by the three: int8 activations, checks, per-token or static fake quant."""

    @property
    def activation_quantized(self) -> bool:
        return True

    def _fail(self, qw_or_name, msg: str):
        name = qw_or_name.name if isinstance(qw_or_name, QuantizedWeight) else qw_or_name
        raise OmniqError(f"{where(name)}{self.name}: {msg}")


class _DynamicInt8Activations(_MsModelSlim):
    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        q, s = quantize_per_token_int8(x)
        return q * s

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(x_q @ W^T) * s_t with the integer product exact (float64), rounded once to fp32."""
        n, k = qw.shape
        x2 = self.check_input(x, qw)
        q, s = quantize_per_token_int8(x2)
        y = (q.double() @ self.dequantize(qw).double().T) * s.double()
        y = y.float()
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], n).to(x.dtype)


# =============================================================================================
@scheme("w8a8", aliases=("msmodelslim_w8a8",))
@dataclass(frozen=True)
class MsW8A8Static(_MsModelSlim):
    """msModelSlim W8A8 (static). `input_scale` / `input_offset`: the calibrated per-tensor
    activation parameters; None stores input_scale 1.0, a placeholder until `calibrate(qw, x)`.
    `deq_scale_dtype`: how quantize() stores deq_scale ("int64" is what msModelSlim writes for
    fp16 models); both are read regardless."""

    input_scale: float | None = None
    input_offset: float = 0.0
    deq_scale_dtype: str = "float32"

    def __post_init__(self):
        check_choice(self.name, "deq_scale_dtype", self.deq_scale_dtype, DEQ_SCALE_DTYPES)
        if self.input_scale is not None and not (float(self.input_scale) > 0 and
                                                 float(self.input_scale) < float("inf")):
            raise OmniqError(f"{self.name}: input_scale must be a positive finite number; got {self.input_scale!r}")
        o = float(self.input_offset)
        if o != round(o) or not INT8_MIN <= o <= INT8_MAX:
            raise OmniqError(f"{self.name}: input_offset must be an integer in [-128, 127] (it is an int8 "
                             f"zero point); got {self.input_offset!r}")

    # ---- description ----
    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        deq = (torch.int64, (torch.float32,)) if self.deq_scale_dtype == "int64" else (torch.float32, (torch.int64,))
        return {
            "weight": TensorSpec((n, k), torch.int8, in_dim=1, out_dim=0),
            # per output channel; quant_bias also carries the activation offset's correction over
            # the FULL K, so a row-parallel layer adds it on one rank only (vLLM-Ascend: tp_rank 0)
            "deq_scale": TensorSpec((n,), deq[0], out_dim=0, also_accepts=deq[1]),
            "quant_bias": TensorSpec((n,), torch.int32, out_dim=0, rank0_only=True),
            "input_scale": TensorSpec((1,), torch.float32, per_tensor=True, also_accepts=_FLOATS),
            "input_offset": TensorSpec((1,), torch.float32, per_tensor=True,
                                       also_accepts=(torch.int8, torch.int32) + _FLOATS),
            "weight_scale": TensorSpec((n, 1), torch.float32, out_dim=0, optional=True, also_accepts=_FLOATS),
            "weight_offset": TensorSpec((n, 1), torch.float32, out_dim=0, optional=True, also_accepts=_FLOATS),
            # the float bias msModelSlim folded into quant_bias; matmul never adds it again
            "bias": TensorSpec((n,), torch.float32, out_dim=0, optional=True, also_accepts=_FLOATS),
        }

    # ---- verbs ----
    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        s_in = PLACEHOLDER_INPUT_SCALE if self.input_scale is None else float(self.input_scale)
        return {"weight_scale": _scale_from_amax(w.float().abs().amax(dim=1, keepdim=True), INT8_MAX),
                "input_scale": torch.tensor([s_in], dtype=torch.float32, device=w.device),
                "input_offset": torch.tensor([float(self.input_offset)], dtype=torch.float32, device=w.device)}

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        """`scales` may also hold "bias" [N]: a float bias to fold into quant_bias, as msModelSlim does."""
        n, k = w.shape
        ws = scales["weight_scale"].float().reshape(n, 1)
        s_in = scales["input_scale"].float().reshape(1)
        o = scales["input_offset"].float().reshape(1)
        wq = torch.round(w.float() / ws).clamp(INT8_MIN, INT8_MAX).to(torch.int8)
        deq = (s_in * ws.reshape(n)).float()
        bias = scales.get("bias")
        tensors = {"weight": wq,
                   "deq_scale": deq,
                   "quant_bias": self._quant_bias(wq, deq, o, bias),
                   "input_scale": s_in.clone(), "input_offset": o.clone(),
                   "weight_scale": ws.clone(), "weight_offset": torch.zeros_like(ws)}
        if bias is not None:
            tensors["bias"] = bias.detach().float().reshape(n).clone()
        if self.deq_scale_dtype == "int64":
            tensors["deq_scale"] = encode_deq_scale_int64(deq)
        return QuantizedWeight(self, (n, k), tensors)

    @staticmethod
    def _quant_bias(wq: torch.Tensor, deq: torch.Tensor, o: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # quant_bias = round(bias/deq_scale - input_offset * sum_k W_q), the producer's formula
        corr = o.double() * wq.double().sum(dim=1)
        b = torch.zeros_like(corr) if bias is None else bias.double().reshape(-1) / deq.double()
        return torch.round(b - corr).clamp(-2**31, 2**31 - 1).to(torch.int32)

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.tensors["weight"].to(torch.int32)

    def _deq(self, qw: QuantizedWeight) -> torch.Tensor:
        return decode_deq_scale(qw.tensors["deq_scale"])

    def _weight_scale(self, qw: QuantizedWeight) -> torch.Tensor:
        # the effective per-channel weight scale is the one deq_scale implies
        return self._deq(qw) / qw.tensors["input_scale"].float().reshape(1)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.tensors["weight"].float() * self._weight_scale(qw)[:, None]

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        s_in, o = qw.tensors["input_scale"].float(), qw.tensors["input_offset"].float()
        return (quantize_static_int8(x, s_in, o) - o) * s_in

    def matmul(self, x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(x_q @ W_q^T + quant_bias) * deq_scale (+ bias), integer part exact, rounded once."""
        n, k = qw.shape
        x2 = self.check_input(x, qw)
        xq = quantize_static_int8(x2, qw.tensors["input_scale"], qw.tensors["input_offset"])
        acc = xq.double() @ qw.tensors["weight"].double().T + qw.tensors["quant_bias"].double()
        y = (acc * self._deq(qw).double()).float()
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    def affine_view(self, qw: QuantizedWeight) -> AffineView:
        n, k = qw.shape
        return AffineView(codes=self.unpack(qw), scales=self._weight_scale(qw)[:, None].contiguous(), offsets=None,
                          group_size=k, bits=8, signed=True)

    def calibrate(self, qw: QuantizedWeight, x: torch.Tensor) -> QuantizedWeight:
        """New weight whose input_scale / input_offset cover the range of the sample activations
        `x` [..., K] (asymmetric min/max onto [-128, 127]); deq_scale and quant_bias follow,
        keeping any bias already folded into quant_bias."""
        n, k = qw.shape
        xs = self.check_input(x, qw)
        lo = min(float(xs.min()), 0.0)
        hi = max(float(xs.max()), 0.0)
        s_new = (hi - lo) / (INT8_MAX - INT8_MIN) if hi > lo else 1.0
        o_new = float(min(max(round(INT8_MIN - lo / s_new), INT8_MIN), INT8_MAX))
        t = qw.tensors
        wq = t["weight"]
        deq_old = self._deq(qw)
        if "bias" in t:
            folded = t["bias"].double()
        else:  # recover it: quant_bias + o * rowsum is bias/deq_scale (up to its rounding)
            folded = (t["quant_bias"].double() + t["input_offset"].double().reshape(1) * wq.double().sum(1)) \
                * deq_old.double()
        ws = deq_old / t["input_scale"].float().reshape(1)
        dev = wq.device
        s_in = torch.tensor([s_new], dtype=torch.float32, device=dev)
        o = torch.tensor([o_new], dtype=torch.float32, device=dev)
        deq = (s_in * ws).float()
        tensors = dict(t)
        # input_scale is stored fp32 whatever it was: a 16-bit one would not hold the new scale exactly
        tensors.update(input_scale=s_in, input_offset=o.to(t["input_offset"].dtype),
                       quant_bias=self._quant_bias(wq, deq, o, folded),
                       deq_scale=encode_deq_scale_int64(deq) if t["deq_scale"].dtype == torch.int64 else deq)
        return QuantizedWeight(self, (n, k), tensors, name=qw.name)


# =============================================================================================
@scheme("w8a8_dynamic", aliases=("msmodelslim_w8a8_dynamic",))
@dataclass(frozen=True)
class MsW8A8Dynamic(_DynamicInt8Activations):
    """msModelSlim W8A8_DYNAMIC: per-token symmetric int8 activations; int8 weights with one
    `weight_scale` per output channel (group_size=-1) or per `group_size` inputs; `weight_offset`
    zeros (msModelSlim weights are symmetric; W = (W_q - weight_offset) * weight_scale)."""

    group_size: int = -1

    def __post_init__(self):
        g = self.group_size
        if not isinstance(g, int) or (g != -1 and g <= 0):
            raise OmniqError(f"{self.name}: group_size must be -1 (per output channel) or a positive integer; "
                             f"got {g!r}")

    def _groups(self, k: int) -> tuple[int, int]:
        gs = k if self.group_size == -1 else self.group_size
        return gs, max(1, -(-k // gs))

    def check_weight(self, w: torch.Tensor, name: str | None = None) -> None:
        super().check_weight(w, name)
        if self.group_size > 0 and w.shape[1] % self.group_size:
            raise OmniqError(f"{where(name)}{self.name}: K={w.shape[1]} input features is not a multiple of "
                             f"group_size={self.group_size}; use a divisor of K or group_size=-1")

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        gs, g = self._groups(k)
        grouped = self.group_size > 0
        sc = dict(out_dim=0, in_dim=1 if grouped else None, in_step=gs if grouped else 1, also_accepts=_FLOATS)
        return {"weight": TensorSpec((n, k), torch.int8, in_dim=1, out_dim=0),
                "weight_scale": TensorSpec((n, g), torch.float32, **sc),
                "weight_offset": TensorSpec((n, g), torch.float32, **sc)}

    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = w.shape
        gs, g = self._groups(k)
        amax = w.float().abs().reshape(n, g, gs).amax(dim=-1)
        return {"weight_scale": _scale_from_amax(amax, INT8_MAX)}

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        gs, g = self._groups(k)
        s = scales["weight_scale"].float().reshape(n, g)
        wq = torch.round(w.float().reshape(n, g, gs) / s[..., None]).clamp(INT8_MIN, INT8_MAX)
        return QuantizedWeight(self, (n, k), {"weight": wq.reshape(n, k).to(torch.int8), "weight_scale": s.clone(),
                                              "weight_offset": torch.zeros_like(s)})

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.tensors["weight"].to(torch.int32)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        n, k = qw.shape
        gs, g = self._groups(k)
        s = qw.tensors["weight_scale"].float().reshape(n, g, 1)
        off = qw.tensors["weight_offset"].float().reshape(n, g, 1)
        return ((qw.tensors["weight"].float().reshape(n, g, gs) - off) * s).reshape(n, k)

    def affine_view(self, qw: QuantizedWeight) -> AffineView:
        n, k = qw.shape
        gs, _ = self._groups(k)
        s = qw.tensors["weight_scale"].float()
        off = None if _zero_offsets(qw, ("weight_offset",)) else -qw.tensors["weight_offset"].float() * s
        return AffineView(codes=self.unpack(qw), scales=s.contiguous(), offsets=off, group_size=gs, bits=8, signed=True)


# =============================================================================================
@scheme("w4a8_dynamic", aliases=("msmodelslim_w4a8_dynamic",))
@dataclass(frozen=True)
class MsW4A8Dynamic(_DynamicInt8Activations):
    """msModelSlim W4A8_DYNAMIC: per-token int8 activations, int4 weights in [-8, 7].

    version "1.0.0": `weight` int8 [N/2, K], byte[r, k] = W[2r, k] & 0xF | W[2r+1, k] << 4 (packed
    along N, so N must be even); `weight_scale` / `weight_offset` [N, 1]; `scale_bias` [N, 1]
    = 8 * sum_k W[n, k] * weight_scale[n], or [N, 16] summed per 1/16 of K when `row_parallel`.
    version "0": `weight` int8 [N, K] holding int4 values, W = W_q * weight_scale_second[n, k//G]
    * weight_scale[n] with G = group_size (default 256).
    """

    version: str = "1.0.0"
    group_size: int | None = None
    row_parallel: bool = False

    def __post_init__(self):
        check_choice(self.name, "version", self.version, W4A8_VERSIONS)
        if self.packed:
            if self.group_size not in (None, -1, 0):
                raise OmniqError(f"{self.name}: version 1.0.0 is per output channel; group_size={self.group_size} "
                                 f"applies to the old per-group format (version='0')")
        else:
            if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
                raise OmniqError(f"{self.name}: group_size must be a positive integer for version '0'; "
                                 f"got {self.group_size!r}")
            if self.row_parallel:
                raise OmniqError(f"{self.name}: row_parallel sets the [N, 16] scale_bias of version 1.0.0; "
                                 f"version '0' has no scale_bias")

    @property
    def packed(self) -> bool:
        return self.version == "1.0.0"

    @property
    def group(self) -> int:
        return self.group_size or W4A8_LEGACY_GROUP_SIZE

    def _check_shape(self, n: int, k: int, name: str | None) -> None:
        if self.packed and n % 2:
            raise OmniqError(f"{where(name)}{self.name}: N={n} output features is odd; version 1.0.0 packs two "
                             f"int4 values along the output dimension (weight [N/2, K]), so N must be even")
        if self.packed and self.row_parallel and k % SCALE_BIAS_SLICES:
            raise OmniqError(f"{where(name)}{self.name}: K={k} is not a multiple of {SCALE_BIAS_SLICES}; a "
                             f"row-parallel scale_bias keeps one value per 1/{SCALE_BIAS_SLICES} of K")
        if not self.packed and k % self.group:
            raise OmniqError(f"{where(name)}{self.name}: K={k} input features is not a multiple of "
                             f"group_size={self.group}")

    def check_weight(self, w: torch.Tensor, name: str | None = None) -> None:
        super().check_weight(w, name)
        self._check_shape(*w.shape, name)

    def validate(self, qw: QuantizedWeight) -> None:
        self._check_shape(*qw.shape, qw.name)
        super().validate(qw)

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        self._check_shape(n, k, None)
        ch = dict(out_dim=0, also_accepts=_FLOATS)
        if self.packed:
            sb = (TensorSpec((n, SCALE_BIAS_SLICES), torch.float32, out_dim=0, in_dim=1,
                             in_step=k // SCALE_BIAS_SLICES, also_accepts=_FLOATS) if self.row_parallel
                  else TensorSpec((n, 1), torch.float32, **ch))
            return {"weight": TensorSpec((n // 2, k), torch.int8, in_dim=1, out_dim=0, out_step=2),
                    "weight_scale": TensorSpec((n, 1), torch.float32, **ch),
                    "weight_offset": TensorSpec((n, 1), torch.float32, **ch),
                    "scale_bias": sb}
        g = k // self.group
        grp = dict(out_dim=0, in_dim=1, in_step=self.group, also_accepts=_FLOATS)
        return {"weight": TensorSpec((n, k), torch.int8, in_dim=1, out_dim=0),
                "weight_scale": TensorSpec((n, 1), torch.float32, **ch),
                "weight_offset": TensorSpec((n, 1), torch.float32, **ch),
                "weight_scale_second": TensorSpec((n, g), torch.float32, **grp),
                "weight_offset_second": TensorSpec((n, g), torch.float32, **grp)}

    # ---- verbs ----
    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.float()
        n, k = w.shape
        row = w.abs().amax(dim=1, keepdim=True)
        if self.packed:
            return {"weight_scale": _scale_from_amax(row, INT4_MAX)}
        # two levels: the channel scale maps the row's amax to 7, the group scale (<= 1) shrinks it
        s1 = _scale_from_amax(row, INT4_MAX)
        gmax = w.abs().reshape(n, k // self.group, self.group).amax(-1)
        s2 = torch.where(gmax == 0, torch.ones_like(gmax), gmax / (s1 * INT4_MAX))
        return {"weight_scale": s1, "weight_scale_second": s2}

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        w = w.float()
        n, k = w.shape
        s1 = scales["weight_scale"].float().reshape(n, 1)
        if self.packed:
            q = torch.round(w / s1).clamp(INT4_MIN, INT4_MAX).to(torch.int32)
            packed = pack_nibbles((q & 0xF).to(torch.uint8), dim=0).view(torch.int8)
            return QuantizedWeight(self, (n, k), {"weight": packed, "weight_scale": s1.clone(),
                                                  "weight_offset": torch.zeros_like(s1),
                                                  "scale_bias": self.scale_bias(q, s1)})
        s2 = scales["weight_scale_second"].float().reshape(n, k // self.group)
        q = torch.round(w / (s1 * s2.repeat_interleave(self.group, dim=1))).clamp(INT4_MIN, INT4_MAX)
        return QuantizedWeight(self, (n, k), {"weight": q.to(torch.int8), "weight_scale": s1.clone(),
                                              "weight_offset": torch.zeros_like(s1),
                                              "weight_scale_second": s2.clone(),
                                              "weight_offset_second": torch.zeros_like(s2)})

    def scale_bias(self, q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """8 * sum_k W_int4[n, k] * weight_scale[n]: over all of K, or per 1/16 of K (row-parallel)."""
        n, k = q.shape
        slices = SCALE_BIAS_SLICES if self.row_parallel else 1
        sums = q.double().reshape(n, slices, k // slices).sum(-1)
        return (8 * sums * weight_scale.double().reshape(n, 1)).float()

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        w = qw.tensors["weight"]
        if not self.packed:
            return w.to(torch.int32)
        u = unpack_nibbles(w.contiguous().view(torch.uint8), dim=0).to(torch.int32)
        return u - 16 * (u >= 8).to(torch.int32)   # sign-extend the nibble

    def _scales(self, qw: QuantizedWeight) -> tuple[torch.Tensor, int]:
        """Combined scale [N, G] and its group size."""
        n, k = qw.shape
        s1 = qw.tensors["weight_scale"].float().reshape(n, 1)
        if self.packed:
            return s1, k
        if not _zero_offsets(qw, ("weight_offset", "weight_offset_second")):
            self._fail(qw, "nonzero weight_offset / weight_offset_second: the old (version '0') W4A8 format is "
                           "symmetric, and how a two-level offset applies is not defined by its consumers")
        return s1 * qw.tensors["weight_scale_second"].float(), self.group

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        n, k = qw.shape
        s, gs = self._scales(qw)
        q = self.unpack(qw).float()
        if self.packed:
            return (q - qw.tensors["weight_offset"].float().reshape(n, 1)) * s
        return (q.reshape(n, k // gs, gs) * s[..., None]).reshape(n, k)

    def affine_view(self, qw: QuantizedWeight) -> AffineView:
        s, gs = self._scales(qw)
        off = None
        if self.packed and not _zero_offsets(qw, ("weight_offset",)):
            off = -qw.tensors["weight_offset"].float().reshape(-1, 1) * s
        return AffineView(codes=self.unpack(qw), scales=s.contiguous(), offsets=off, group_size=gs, bits=4,
                          signed=True)
