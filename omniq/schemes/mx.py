"""OCP microscaling schemes (formats.md §3): MXFP8, MXFP4 and vLLM-Omni's two-level
`mxfp4_dualscale`.

Every 32 consecutive K elements share one E8M0 exponent byte (`weight_scale`, uint8 holding
the biased exponent; 0xFF is NaN and makes its whole block NaN). Elements are E4M3 (MXFP8)
or E2M1 nibbles packed two per byte, element 2i in the low nibble (MXFP4). The shared
exponent follows `scale_rule` (omniq.formats.e8m0.shared_exponent); the dequantizer only
reads the byte. A negative element that rounds to zero is stored as -0 (code 8), as torch,
ml_dtypes and ModelOpt casts store it (gguf-py stores +0; the value is the same).
Activations are quantized dynamically per 32 along K with the same rules, exactly as weights
are, and the reference `matmul` multiplies the fake-quantized values.

`mxfp4_dualscale` adds a coarse fp32 scale per 512 K elements (`weight_dual_scale`) and a
per-input-channel smoothing `mul_scale` that multiplies x before its quantization; the
activation quantizer follows the Ascend op `npu_dynamic_dual_level_mx_quant` (CANN ops-nn
aclnnDynamicDualLevelMxQuant): l0 = amax512/6, t = x/l0, then OCP MXFP4 of t per 32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omniq.errors import OmniqError, where
from omniq.formats.e2m1 import E2M1_MAX, ROUNDING_RULES, decode_e2m1, encode_e2m1
from omniq.formats.e8m0 import E8M0_BIAS, SCALE_RULES, decode_e8m0, encode_e8m0, shared_exponent
from omniq.formats.fp8 import E4M3_MAX, saturating_cast
from omniq.formats.packing import pack_nibbles, unpack_nibbles
from omniq.schemes.base import QuantizedWeight, QuantScheme, TensorSpec, check_choice, div_const
from omniq.schemes.registry import scheme

MX_BLOCK = 32      # OCP MX v1.0 block along K
DUAL_BLOCK = 512   # mxfp4_dualscale coarse block along K

# Same bytes, other dtype names: torch's packed FP4 and E8M0 dtypes (absent in older torch).
_FP4X2 = tuple(d for d in (getattr(torch, "float4_e2m1fn_x2", None),) if d is not None)
_E8M0 = tuple(d for d in (getattr(torch, "float8_e8m0fnu", None),) if d is not None)
# Dtypes that may hold the numeric FP4 values of `weight` [N, K] (vLLM-Omni loads the
# checkpoint's float8_e4m3fn into the layer's bf16/fp16 parameter; both are exact).
_NUMERIC_FP4 = (torch.bfloat16, torch.float16, torch.float32)
WEIGHT_STORAGES = ("packed", "e4m3")


@dataclass(frozen=True)
class MXElement:
    """An MX element format: the facts the shared exponent needs (formats.md §3.2) and how a
    value already divided by its block scale lands on the element grid (saturating)."""

    name: str
    emax: int      # exponent of the largest normal
    max: float     # largest finite magnitude
    mbits: int     # mantissa bits (the "even" scale rule rounds amax to these)

    def round(self, v: torch.Tensor, rounding: str) -> torch.Tensor:
        """float32 values on the element grid; E4M3 always rounds to nearest even (torch's
        cast, as torchao, vLLM and the NPU's "rint" do)."""
        if self.name == "e2m1":
            return decode_e2m1(encode_e2m1(v, rounding))
        return saturating_cast(v).float()


E2M1 = MXElement("e2m1", emax=2, max=E2M1_MAX, mbits=1)
E4M3 = MXElement("e4m3", emax=8, max=E4M3_MAX, mbits=3)
MX_ELEMENTS = {"mxfp4": E2M1, "mxfp8": E4M3}


# ---- block helpers (shared with omniq.schemes.nvfp4) -----------------------------------------
def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., K] -> [..., ceil(K/block), block], zero-padding a partial last block (zeros
    never raise a block's amax, so a partial block behaves as the format defines it)."""
    k = x.shape[-1]
    nb = -(-k // block)
    if nb * block != k:
        x = F.pad(x, (0, nb * block - k))
    return x.reshape(*x.shape[:-1], nb, block)


def from_blocks(xb: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of to_blocks: [..., nb, block] -> [..., K]."""
    return xb.flatten(-2)[..., :k]


def expand_blocks(s: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """Per-block scales [..., nb] -> per-element [..., K]."""
    return s.repeat_interleave(block, dim=-1)[..., :k]


def e8m0_bytes(t: torch.Tensor) -> torch.Tensor:
    """An E8M0 scale tensor as uint8 bytes, whichever of uint8 / float8_e8m0fnu holds it."""
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def mx_quantize(x: torch.Tensor, elem: MXElement, rule: str, rounding: str,
                block: int = MX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX quantization of x [..., K] along K: (element values on the grid, fp32 [..., K];
    E8M0 scale bytes, uint8 [..., ceil(K/block)]).

    E = shared_exponent(amax) per block, P = round(V / 2^E) saturated (formats.md §3.3).
    A block holding NaN or Inf gets the NaN scale byte 0xFF."""
    k = x.shape[-1]
    xb = to_blocks(x.float(), block)
    e = shared_exponent(xb.abs().amax(dim=-1), elem.emax, elem.max, elem.mbits, rule)
    # multiplying by 2^-E is exact (a power of two), as the reference's division by 2^E is
    v = torch.ldexp(xb, -e.unsqueeze(-1).clamp(max=E8M0_BIAS))
    return from_blocks(elem.round(v, rounding), k), encode_e8m0(e)


def mx_fake_quantize(x: torch.Tensor, elem: MXElement, rule: str, rounding: str,
                     block: int = MX_BLOCK) -> torch.Tensor:
    """What an MX kernel sees of x: P * 2^E per block (NaN where the scale byte is 0xFF)."""
    q, b = mx_quantize(x, elem, rule, rounding, block)
    return q * expand_blocks(decode_e8m0(b), block, x.shape[-1])


def dual_level_quantize(x: torch.Tensor, rounding: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-level MXFP4 of x [..., K] (K % 512 == 0): (E2M1 values fp32 [..., K], fine E8M0
    bytes [..., K/32], coarse fp32 scale [..., K/512]).

    coarse = amax512 / 6 (msModelSlim MXWeightDualScaleMinmax; the NPU op's level0 scale),
    then t = x / coarse is OCP-MXFP4-quantized per 32 with the FLOOR rule. An all-zero
    512-block keeps coarse = 0 and codes 0 (the sources divide 0/0 there)."""
    k = x.shape[-1]
    xb = to_blocks(x.float(), DUAL_BLOCK)
    coarse = div_const(xb.abs().amax(dim=-1), E2M1_MAX)
    safe = torch.where(coarse == 0, torch.ones_like(coarse), coarse)
    t = from_blocks(xb / safe.unsqueeze(-1), k)
    q, fine = mx_quantize(t, E2M1, "floor", rounding)
    return q, fine, coarse


def dual_level_fake_quantize(x: torch.Tensor, rounding: str) -> torch.Tensor:
    q, fine, coarse = dual_level_quantize(x, rounding)
    k = x.shape[-1]
    return (q * expand_blocks(decode_e8m0(fine), MX_BLOCK, k)) * expand_blocks(coarse, DUAL_BLOCK, k)


# ---- shared scheme plumbing -----------------------------------------------------------------
class _MXBase(QuantScheme):
    """K checks and the E8M0 scale tensor spec shared by the MX schemes (not registered)."""

    def _check_k(self, k: int, layer: str | None = None) -> None:
        if self.k_multiple > 1 and k % self.k_multiple:
            raise OmniqError(f"{where(layer)}{self.name}: K={k} input features is not a multiple of the "
                             f"block size {self.k_multiple}; pad the layer or leave it unquantized")

    def validate(self, qw: QuantizedWeight) -> None:
        self._check_k(qw.shape[1], qw.name)
        super().validate(qw)

    @staticmethod
    def _scale_spec(n: int, k: int) -> TensorSpec:
        return TensorSpec((n, -(-k // MX_BLOCK)), torch.uint8, in_dim=1, in_step=MX_BLOCK, out_dim=0,
                          also_accepts=_E8M0)


class _FP4Weight(_MXBase):
    """`weight` as packed nibbles uint8 [N, K/2] (element 2i low) or as the numeric FP4
    values in a float tensor [N, K] (vLLM-Omni's float8_e4m3fn checkpoints); every verb reads
    both, `weight_storage` picks what `pack` writes and what `tensor_specs` declares."""

    def _weight_spec(self, n: int, k: int, storage: str | None = None) -> TensorSpec:
        if (storage or self.weight_storage) == "e4m3":
            return TensorSpec((n, k), torch.float8_e4m3fn, in_dim=1, out_dim=0, also_accepts=_NUMERIC_FP4)
        return TensorSpec((n, k // 2), torch.uint8, in_dim=1, in_step=2, out_dim=0, also_accepts=_FP4X2)

    @staticmethod
    def _storage_of(w: torch.Tensor | None) -> str | None:
        if w is None:
            return None
        return "e4m3" if w.dtype == torch.float8_e4m3fn or w.dtype in _NUMERIC_FP4 else "packed"

    def validate(self, qw: QuantizedWeight) -> None:
        storage = self._storage_of(qw.tensors.get("weight"))
        if storage is not None and storage != self.weight_storage:
            # the other storage is valid input too: check against its specs
            return dataclasses.replace(self, weight_storage=storage).validate(qw)
        super().validate(qw)

    def _store(self, codes: torch.Tensor) -> torch.Tensor:
        if self.weight_storage == "e4m3":
            return decode_e2m1(codes).to(torch.float8_e4m3fn)  # E2M1 values are exact in E4M3
        return pack_nibbles(codes)

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """E2M1 codes uint8 [N, K] (0..15; 8 is -0), from either storage of `weight`."""
        w = qw.tensors["weight"]
        if self._storage_of(w) == "packed":
            return unpack_nibbles(w if w.dtype == torch.uint8 else w.view(torch.uint8))
        v = w.float()
        sign = torch.signbit(v).to(torch.uint8) << 3
        codes = encode_e2m1(v.abs(), "rne") | sign
        bad = decode_e2m1(codes) != v  # NaN and off-grid values
        if bad.any():
            idx = bad.nonzero()[0].tolist()
            raise OmniqError(f"{where(qw.name)}{self.name}: tensor 'weight' ({w.dtype}, numeric FP4 storage) holds "
                             f"{int(bad.sum())} values that are not E2M1 numbers (first {v[tuple(idx)].item()!r} "
                             f"at [n, k] = {idx}); it must hold 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6")
        return codes


# ---- MXFP8 ----------------------------------------------------------------------------------
@scheme("mxfp8")
@dataclass(frozen=True)
class MXFP8Scheme(_MXBase):
    """OCP MXFP8: E4M3 elements, one E8M0 exponent per 32 along K.

    Storage: `weight` float8_e4m3fn [N, K]; `weight_scale` uint8 [N, ceil(K/32)] (E8M0 bytes;
    float8_e8m0fnu accepted). Any K: the last block may be partial, as vLLM-Omni's MXFP8
    checkpoints declare with ceil(K/32) scale groups (it behaves as zero-padded).
    activation: "mxfp8" (W8A8, dynamic per 32 along K) or None (W8A16).
    scale_rule: shared exponent rule, "floor" (OCP, default), "even" (AMD Quark), "ceil",
        "rceil" (NVIDIA); elements round to nearest even and saturate at ±448.
    """

    activation: str | None = "mxfp8"
    scale_rule: str = "floor"

    def __post_init__(self):
        check_choice("mxfp8", "activation", self.activation, ("mxfp8", None))
        check_choice("mxfp8", "scale_rule", self.scale_rule, SCALE_RULES)

    @property
    def activation_quantized(self) -> bool:
        return self.activation is not None

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec((n, k), torch.float8_e4m3fn, in_dim=1, out_dim=0),
                "weight_scale": self._scale_spec(n, k)}

    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        _, b = mx_quantize(w, E4M3, self.scale_rule, "rne")
        return {"weight_scale": b}

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        b = e8m0_bytes(scales["weight_scale"])
        e = b.to(torch.int32) - E8M0_BIAS
        v = from_blocks(torch.ldexp(to_blocks(w.float(), MX_BLOCK), -e.unsqueeze(-1)), k)
        return QuantizedWeight(self, (n, k), {"weight": saturating_cast(v), "weight_scale": b})

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """E4M3 bit patterns of `weight`, uint8 [N, K]."""
        return qw.tensors["weight"].view(torch.uint8)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        k = qw.shape[1]
        s = decode_e8m0(e8m0_bytes(qw.tensors["weight_scale"]))
        return qw.tensors["weight"].float() * expand_blocks(s, MX_BLOCK, k)

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        if self.activation is None:
            return x.float()
        return mx_fake_quantize(x, E4M3, self.scale_rule, "rne")


# ---- MXFP4 ----------------------------------------------------------------------------------
@scheme("mxfp4")
@dataclass(frozen=True)
class MXFP4Scheme(_FP4Weight):
    """OCP MXFP4: E2M1 elements, one E8M0 exponent per 32 along K (K % 32 == 0).

    Storage: `weight` uint8 [N, K/2], element 2i in the low nibble (float4_e2m1fn_x2 accepted;
    with weight_storage="e4m3", or on input, the numeric FP4 values [N, K] in float8_e4m3fn,
    as vLLM-Omni's NPU checkpoints hold them); `weight_scale` uint8 [N, K/32] E8M0 bytes.
    activation: "mxfp4" (W4A4), "mxfp8" (W4A8, E4M3 per 32) or None (W4A16); activations
        use `scale_rule` and `act_rounding`.
    scale_rule: "floor" (OCP, default), "even" (AMD Quark), "ceil", "rceil" (NVIDIA).
    rounding: E2M1 rounding of weight elements: "rne" (default: vLLM-Omni's NPU quantizer
        `npu_dynamic_mx_quant(round_mode="rint")`, torchao, ModelOpt), "rhaz" (microxcaling's
        "nearest", msModelSlim), "rtz" (ties toward zero, gguf-py's MXFP4 quantizer).
    act_rounding: the same choice for activations (default "rne", the NPU op's "rint").
    weight_storage: "packed" (default) or "e4m3".
    """

    activation: str | None = "mxfp4"
    scale_rule: str = "floor"
    rounding: str = "rne"
    act_rounding: str = "rne"
    weight_storage: str = "packed"

    k_multiple = MX_BLOCK

    def __post_init__(self):
        check_choice("mxfp4", "activation", self.activation, ("mxfp4", "mxfp8", None))
        check_choice("mxfp4", "scale_rule", self.scale_rule, SCALE_RULES)
        check_choice("mxfp4", "rounding", self.rounding, ROUNDING_RULES)
        check_choice("mxfp4", "act_rounding", self.act_rounding, ROUNDING_RULES)
        check_choice("mxfp4", "weight_storage", self.weight_storage, WEIGHT_STORAGES)

    @property
    def activation_quantized(self) -> bool:
        return self.activation is not None

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        self._check_k(k)
        return {"weight": self._weight_spec(n, k), "weight_scale": self._scale_spec(n, k)}

    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        _, b = mx_quantize(w, E2M1, self.scale_rule, self.rounding)
        return {"weight_scale": b}

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        self._check_k(k)
        b = e8m0_bytes(scales["weight_scale"])
        e = b.to(torch.int32) - E8M0_BIAS
        v = from_blocks(torch.ldexp(to_blocks(w.float(), MX_BLOCK), -e.unsqueeze(-1)), k)
        codes = encode_e2m1(v, self.rounding, signed_zero=True)
        return QuantizedWeight(self, (n, k), {"weight": self._store(codes), "weight_scale": b})

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        k = qw.shape[1]
        s = decode_e8m0(e8m0_bytes(qw.tensors["weight_scale"]))
        return decode_e2m1(self.unpack(qw)) * expand_blocks(s, MX_BLOCK, k)

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        if self.activation is None:
            return x.float()
        return mx_fake_quantize(x, MX_ELEMENTS[self.activation], self.scale_rule, self.act_rounding)


# ---- mxfp4_dualscale ------------------------------------------------------------------------
@scheme("mxfp4_dualscale")
@dataclass(frozen=True)
class MXFP4DualScaleScheme(_FP4Weight):
    """vLLM-Omni `mxfp4_dualscale` (Ascend, msModelSlim W4A4_MXFP4_DUALSCALE), formats.md §3.6.

    W[n,k] = e2m1(P) * 2^(weight_scale[n,k/32] - 127) * weight_dual_scale[n,k/512]; K % 512 == 0.
    Storage: `weight` uint8 [N, K/2] packed (msModelSlim's saver) or numeric FP4 in
    float8_e4m3fn [N, K] (vLLM-Omni's docs; bf16/fp16 also read); `weight_scale` uint8
    [N, K/32] fine E8M0; `weight_dual_scale` fp32 [N, K/512, 1] coarse; `mul_scale` fp32 [K].

    The stored weight lives in the smoothed basis: y = fakequant(x * mul_scale) @ W^T, so
    `dequantize` returns W as stored and the layer's original weight is W * mul_scale[k].
    `quantize(w, mul_scale=s)` stores w / s (smoothing folded into the weight) and s;
    without `mul_scale` it stores ones.

    activation: "mxfp4_dualscale" (W4A4: x*mul_scale, then the dual-level quantizer of
        `npu_dynamic_dual_level_mx_quant`: l0 = amax512/6 fp32, t = x/l0, FLOOR E8M0 per 32 on
        t, E2M1 elements) or None (W4A16: x * mul_scale only). The NPU op casts t to x's dtype
        (bf16/fp16) before the second level; this fp32 reference does not.
    rounding: E2M1 rounding of weights: "rne" (default, vLLM-Omni's online path through the
        NPU op's round_mode="rint"), "rhaz" (msModelSlim's microxcaling quantizer), "rtz".
    act_rounding: the same for activations (default "rne", the op's default "rint").
    weight_storage: "packed" (default) or "e4m3".
    """

    activation: str | None = "mxfp4_dualscale"
    rounding: str = "rne"
    act_rounding: str = "rne"
    weight_storage: str = "packed"

    k_multiple = DUAL_BLOCK

    def __post_init__(self):
        check_choice("mxfp4_dualscale", "activation", self.activation, ("mxfp4_dualscale", None))
        check_choice("mxfp4_dualscale", "rounding", self.rounding, ROUNDING_RULES)
        check_choice("mxfp4_dualscale", "act_rounding", self.act_rounding, ROUNDING_RULES)
        check_choice("mxfp4_dualscale", "weight_storage", self.weight_storage, WEIGHT_STORAGES)

    @property
    def activation_quantized(self) -> bool:
        return self.activation is not None

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        self._check_k(k)
        return {"weight": self._weight_spec(n, k),
                "weight_scale": self._scale_spec(n, k),
                "weight_dual_scale": TensorSpec((n, k // DUAL_BLOCK, 1), torch.float32, in_dim=1,
                                                in_step=DUAL_BLOCK, out_dim=0),
                "mul_scale": TensorSpec((k,), torch.float32, in_dim=0,
                                        also_accepts=(torch.bfloat16, torch.float16))}

    def _check_mul_scale(self, s, k: int, layer: str | None) -> torch.Tensor:
        s = torch.as_tensor(s)
        if s.shape != (k,) or not s.is_floating_point():
            raise OmniqError(f"{where(layer)}{self.name}: mul_scale must be a float tensor of shape ({k},), "
                             f"one smoothing factor per input feature; got {s.dtype} {tuple(s.shape)}")
        s = s.float()
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise OmniqError(f"{where(layer)}{self.name}: mul_scale must hold finite, strictly positive "
                             f"values (it multiplies x and divides W)")
        return s

    def quantize(self, w: torch.Tensor, name: str | None = None,
                 mul_scale: torch.Tensor | None = None) -> QuantizedWeight:
        """Quantize the layer weight w [N, K]; with `mul_scale` (K,), store w / mul_scale so
        that (x * mul_scale) @ stored^T == x @ w^T."""
        self.check_weight(w, name)
        if mul_scale is None:
            return super().quantize(w, name)
        s = self._check_mul_scale(mul_scale, w.shape[1], name).to(w.device)
        ws = w.float() / s
        qw = self.pack(ws, {**self.scale(ws), "mul_scale": s})
        qw.name = name
        return qw

    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        _, fine, coarse = dual_level_quantize(w, self.rounding)
        return {"weight_scale": fine, "weight_dual_scale": coarse.unsqueeze(-1),
                "mul_scale": torch.ones(w.shape[1], dtype=torch.float32, device=w.device)}

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Quantize w (already in the smoothed basis) with the given fine and coarse scales."""
        n, k = w.shape
        self._check_k(k)
        b = e8m0_bytes(scales["weight_scale"])
        coarse = scales["weight_dual_scale"].float().reshape(n, k // DUAL_BLOCK)
        safe = torch.where(coarse == 0, torch.ones_like(coarse), coarse)
        t = from_blocks(to_blocks(w.float(), DUAL_BLOCK) / safe.unsqueeze(-1), k)
        e = b.to(torch.int32) - E8M0_BIAS
        v = from_blocks(torch.ldexp(to_blocks(t, MX_BLOCK), -e.unsqueeze(-1)), k)
        codes = encode_e2m1(v, self.rounding, signed_zero=True)
        mul = scales.get("mul_scale")
        mul = torch.ones(k, dtype=torch.float32, device=w.device) if mul is None else mul.float().reshape(k)
        return QuantizedWeight(self, (n, k), {"weight": self._store(codes), "weight_scale": b,
                                              "weight_dual_scale": coarse.reshape(n, -1, 1),
                                              "mul_scale": mul})

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """The stored weight (smoothed basis), fp32 [N, K]."""
        n, k = qw.shape
        fine = decode_e8m0(e8m0_bytes(qw.tensors["weight_scale"]))
        coarse = qw.tensors["weight_dual_scale"].float().reshape(n, k // DUAL_BLOCK)
        return (decode_e2m1(self.unpack(qw)) * expand_blocks(fine, MX_BLOCK, k)) * \
            expand_blocks(coarse, DUAL_BLOCK, k)

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        x = x.float() * qw.tensors["mul_scale"].float()
        if self.activation is None:
            return x
        return dual_level_fake_quantize(x, self.act_rounding)
