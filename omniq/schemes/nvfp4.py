"""NVFP4 as NVIDIA ModelOpt exports it (`quant_algo: "NVFP4"`, formats.md §3.5).

E2M1 elements packed two per byte (element 2i in the low nibble), one FP8 E4M3 scale per 16
K elements, and two fp32 per-tensor scales: `weight_scale_2` for the weight and a static
`input_scale` for the activations. W = e2m1 * float(weight_scale) * weight_scale_2.

Weights are quantized as ModelOpt's `NVFP4QTensor` does (RNE on the E2M1 grid, block scale
clamped to [2^-9, 448] and cast to E4M3); activations as vLLM's reference
(`nvfp4_emulation_utils.ref_nvfp4_quant`) with global scale 1/input_scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.errors import OmniqError, where
from omniq.formats.e2m1 import E2M1_MAX, decode_e2m1, encode_e2m1
from omniq.formats.fp8 import E4M3_MAX
from omniq.formats.packing import pack_nibbles, unpack_nibbles
from omniq.schemes.base import QuantizedWeight, QuantScheme, TensorSpec, check_choice, div_const
from omniq.schemes.mx import expand_blocks, from_blocks, to_blocks
from omniq.schemes.registry import scheme

NVFP4_BLOCK = 16
GLOBAL_MAX = E2M1_MAX * E4M3_MAX   # 6 * 448: amax that maps to the largest block scale
BLOCK_SCALE_MIN = 2.0 ** -9        # smallest E4M3 subnormal; ModelOpt's floor on block scales
_FP4X2 = tuple(d for d in (getattr(torch, "float4_e2m1fn_x2", None),) if d is not None)


def _positive_finite(v) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return ok and 0 < float(v) < float("inf")


@scheme("nvfp4")
@dataclass(frozen=True)
class NVFP4Scheme(QuantScheme):
    """ModelOpt NVFP4, W4A4 or weight-only (K % 16 == 0).

    Storage: `weight` uint8 [N, K/2] (float4_e2m1fn_x2 accepted), `weight_scale`
    float8_e4m3fn [N, K/16], `weight_scale_2` fp32 (1,) = amax(W)/(6*448), `input_scale`
    fp32 (1,) (required with activation="nvfp4", optional and unused otherwise).
    activation: "nvfp4" (static per-tensor global scale, dynamic E4M3 scale per 16, RNE) or
        None (W4A16).
    input_scale: what `quantize` stores as `input_scale`. None stores 1.0, a placeholder
        (activations up to 6*448 in magnitude, tiny ones flush to zero): call
        `calibrate(qw, x)` with sample activations to set amax(x)/(6*448) as ModelOpt does.
    """

    activation: str | None = "nvfp4"
    input_scale: float | None = None

    k_multiple = NVFP4_BLOCK

    def __post_init__(self):
        check_choice("nvfp4", "activation", self.activation, ("nvfp4", None))
        if self.input_scale is not None and not _positive_finite(self.input_scale):
            raise OmniqError(f"nvfp4: invalid input_scale={self.input_scale!r}; it must be a positive finite "
                             f"float (or None to store 1.0 and calibrate it from sample activations)")

    @property
    def activation_quantized(self) -> bool:
        return self.activation is not None

    def _check_k(self, k: int, layer: str | None = None) -> None:
        if k % NVFP4_BLOCK:
            raise OmniqError(f"{where(layer)}nvfp4: K={k} input features is not a multiple of the block size "
                             f"{NVFP4_BLOCK}; pad the layer or leave it unquantized")

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        self._check_k(k)
        return {"weight": TensorSpec((n, k // 2), torch.uint8, in_dim=1, in_step=2, out_dim=0,
                                     also_accepts=_FP4X2),
                "weight_scale": TensorSpec((n, k // NVFP4_BLOCK), torch.float8_e4m3fn, in_dim=1,
                                           in_step=NVFP4_BLOCK, out_dim=0),
                "weight_scale_2": TensorSpec((1,), torch.float32, per_tensor=True),
                "input_scale": TensorSpec((1,), torch.float32, per_tensor=True,
                                          optional=self.activation is None)}

    def validate(self, qw: QuantizedWeight) -> None:
        self._check_k(qw.shape[1], qw.name)
        super().validate(qw)

    # ---- the three verbs -----------------------------------------------------------------
    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """ModelOpt's dynamic path: ws2 = amax/(6*448); sblk = amax16/(6*ws2), 0 -> 1,
        clamped to >= 2^-9, cast to E4M3. An all-zero weight (where ModelOpt divides 0/0)
        gets ws2 = 1 and block scales 1."""
        w = w.float()
        amax = w.abs().amax()
        ws2 = div_const(amax, GLOBAL_MAX)
        ws2 = torch.where(ws2 == 0, torch.ones_like(ws2), ws2).reshape(1)
        sblk = to_blocks(w, NVFP4_BLOCK).abs().amax(dim=-1) / (E2M1_MAX * ws2)
        sblk = torch.where(sblk == 0, torch.ones_like(sblk), sblk)
        # amax16 <= amax keeps sblk <= 448 up to rounding; the clamp keeps the cast from NaN
        sblk = sblk.clamp(min=BLOCK_SCALE_MIN, max=E4M3_MAX).to(torch.float8_e4m3fn)
        out = {"weight_scale": sblk, "weight_scale_2": ws2}
        if self.activation is not None:
            s = 1.0 if self.input_scale is None else float(self.input_scale)
            out["input_scale"] = torch.tensor([s], dtype=torch.float32, device=w.device)
        return out

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        self._check_k(k)
        sblk = scales["weight_scale"]
        ws2 = scales["weight_scale_2"].float().reshape(1)
        # ModelOpt: W / (float(sblk) * ws2), then RNE to the E2M1 grid with sign bit = (v < 0):
        # negative values that round to zero store -0; -0.0 itself (+ 0.0 makes it +0) stores +0
        denom = sblk.float() * ws2
        v = from_blocks(to_blocks(w.float(), NVFP4_BLOCK) / denom.unsqueeze(-1), k) + 0.0
        codes = encode_e2m1(v, "rne", signed_zero=True)
        tensors = {"weight": pack_nibbles(codes), "weight_scale": sblk, "weight_scale_2": ws2}
        if "input_scale" in scales:
            tensors["input_scale"] = scales["input_scale"].float().reshape(1)
        return QuantizedWeight(self, (n, k), tensors)

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """E2M1 codes uint8 [N, K] (0..15; 8 is -0)."""
        w = qw.tensors["weight"]
        return unpack_nibbles(w if w.dtype == torch.uint8 else w.view(torch.uint8))

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        k = qw.shape[1]
        # ModelOpt and vLLM multiply the two scales first, then the element
        s = qw.tensors["weight_scale"].float() * qw.tensors["weight_scale_2"].float().reshape(())
        return decode_e2m1(self.unpack(qw)) * expand_blocks(s, NVFP4_BLOCK, k)

    def _input_scale(self, qw: QuantizedWeight) -> torch.Tensor:
        t = qw.tensors.get("input_scale")
        if t is None:
            raise OmniqError(f"{where(qw.name)}nvfp4: activation='nvfp4' needs the tensor 'input_scale' "
                             f"(fp32 (1,)); load it from the checkpoint or call calibrate(qw, x)")
        s = t.float().reshape(())
        if not (torch.isfinite(s) and s > 0):
            raise OmniqError(f"{where(qw.name)}nvfp4: tensor 'input_scale' is {s.item()!r}; it must be a "
                             f"positive finite float (amax(x)/(6*448))")
        return s

    def quantize_activation(self, x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        """vLLM's ref_nvfp4_quant + dequant with global_scale = 1/input_scale:
        sblk = e4m3(clamp(gs * amax16 * (1/6), 448)); q = rne(clamp(x / (sblk/gs), ±6));
        x^ = q * (sblk / gs). A block whose scale flushes to 0 is 0."""
        x = x.float()
        if self.activation is None:
            return x
        k = x.shape[-1]
        gs = 1.0 / self._input_scale(qw)
        xb = to_blocks(x, NVFP4_BLOCK)
        # same operation order as vLLM so the E4M3 rounding of the scale matches bit for bit
        sblk = gs * (xb.abs().amax(dim=-1, keepdim=True) * (1.0 / E2M1_MAX))
        sblk = sblk.clamp(min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn).float()
        denom = sblk * (1.0 / gs)
        out_scale = torch.where(denom == 0, torch.zeros_like(denom), 1.0 / denom)
        q = decode_e2m1(encode_e2m1((xb * out_scale).clamp(-E2M1_MAX, E2M1_MAX), "rne"))
        return from_blocks(q * (sblk / gs), k)

    def calibrate(self, qw: QuantizedWeight, x: torch.Tensor) -> QuantizedWeight:
        """Static activation scale from sample activations x [..., K]: input_scale =
        amax(x)/(6*448) (ModelOpt's max calibration). An all-zero x keeps the current value.
        Returns a new QuantizedWeight; weight-only (activation=None) returns qw."""
        if self.activation is None:
            return qw
        x = self.check_input(x, qw)
        amax = x.abs().amax()
        if not torch.isfinite(amax):
            raise OmniqError(f"{where(qw.name)}nvfp4: calibration activations hold NaN/Inf; "
                             f"calibrate on finite samples")
        if amax == 0:
            return qw
        s = div_const(amax, GLOBAL_MAX).reshape(1).to(torch.float32)
        return QuantizedWeight(self, qw.shape, {**qw.tensors, "input_scale": s}, name=qw.name)
