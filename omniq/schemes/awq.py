"""AWQ weight-only int4 (formats.md §4.2: AutoAWQ `WQLinear_GEMM`, vLLM `quant_method: awq`).

Storage (G = group size, K % G == 0, N % 8 == 0):
  qweight  int32 [K, N/8]    packed along N with the AWQ interleave: nibble i of word (k, c)
                             holds column 8c + AWQ_ORDER[i]
  qzeros   int32 [K/G, N/8]  the same interleave, zero points stored as-is (no -1)
  scales   fp16  [K/G, N]
W[n, k] = (q[k, n] - zero[k//G, n]) * scales[k//G, n].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.errors import OmniqError, where
from omniq.formats.packing import AWQ_ORDER, pack_int32, unpack_int32
from omniq.schemes.base import AffineView, QuantizedWeight, QuantScheme, TensorSpec, check_choice
from omniq.schemes.gptq import fp16_scales
from omniq.schemes.registry import scheme

BITS = (4,)
GROUP_SIZES = (-1, 32, 64, 128)
PACK = 8          # 4-bit values per int32 word
MAXQ = 15
SCALE_MIN_RANGE = 1e-5  # AutoAWQ clamps (max - min) here before dividing by 15
_SCALE_DTYPES = (torch.bfloat16,)


@scheme("awq")
@dataclass(frozen=True)
class AWQScheme(QuantScheme):
    """AWQ-format 4-bit weights with per-group fp16 scales and zero points (W4A16).

    group_size: 32, 64, 128, or -1 (one group per output channel). K must be a multiple of
    the group size (qzeros and scales have exactly K/G rows) and N a multiple of 8.

    Quantizer (AutoAWQ's pseudo_quantize_tensor with zero_point=True, RNE), per group:
      scale = max(xmax - xmin, 1e-5)/15 (rounded up to fp16), zero = clamp(-rint(xmin/scale), 0, 15),
      q = clamp(rint(w/scale) + zero, 0, 15),
    with xmin = min(w, 0) and xmax = max(w, 0). AutoAWQ uses the group's plain min and max;
    for a group of one sign that clips most of the group (e.g. all weights in [10, 11] get
    the range [0, 1]), so the range is widened to include 0 (as GPTQ does), which keeps every
    weight within half a step. Activation-aware scale search is calibration, outside the format.
    """

    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        check_choice("awq", "bits", self.bits, BITS)
        check_choice("awq", "group_size", self.group_size, GROUP_SIZES)

    def group(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def check_shape(self, n: int, k: int, name: str | None = None) -> None:
        if n % PACK:
            raise OmniqError(f"{where(name)}awq: N (out_features)={n} is not a multiple of {PACK}: AWQ packs "
                             f"{PACK} output columns per int32 word; pad N or leave the layer unquantized")
        g = self.group(k)
        if k % g:
            raise OmniqError(f"{where(name)}awq: K (in_features)={k} is not a multiple of group_size={g}: the AWQ "
                             f"format stores exactly K/G scale rows; choose a group size that divides K "
                             f"(or -1), or use gptq, whose last group may be partial")

    def check_weight(self, w: torch.Tensor, name: str | None = None) -> None:
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            self.check_shape(*w.shape, name)
        QuantScheme.check_weight(self, w, name)

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        self.check_shape(n, k)
        g = k // self.group(k)
        gin = dict(in_dim=None) if self.group_size == -1 else dict(in_dim=0, in_step=self.group_size)
        return {
            "qweight": TensorSpec((k, n // PACK), torch.int32, in_dim=0, out_dim=1, out_step=PACK),
            "qzeros": TensorSpec((g, n // PACK), torch.int32, out_dim=1, out_step=PACK, **gin),
            "scales": TensorSpec((g, n), torch.float16, out_dim=1, also_accepts=_SCALE_DTYPES, **gin),
        }

    # ---- the three verbs -----------------------------------------------------------------
    def scale(self, w: torch.Tensor, name: str | None = None) -> dict[str, torch.Tensor]:
        """{"scales": fp16 [K/G, N], "zeros": int32 [K/G, N]}."""
        n, k = w.shape
        g = self.group(k)
        wg = w.float().T.reshape(k // g, g, n)
        xmin = wg.amin(dim=1).clamp(max=0)
        xmax = wg.amax(dim=1).clamp(min=0)
        s = fp16_scales((xmax - xmin).clamp(min=SCALE_MIN_RANGE) / MAXQ, "awq", name)
        zero = (-torch.round(xmin / s.float())).clamp(0, MAXQ).to(torch.int32)
        return {"scales": s, "zeros": zero}

    def quantize(self, w: torch.Tensor, name: str | None = None) -> QuantizedWeight:
        self.check_weight(w, name)
        qw = self.pack(w, self.scale(w, name))
        qw.name = name
        return qw

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        self.check_shape(n, k)
        g = self.group(k)
        s = scales["scales"].float().repeat_interleave(g, 0)       # [K, N]
        z = scales["zeros"].repeat_interleave(g, 0).float()
        q = (torch.round(w.float().T / s) + z).clamp(0, MAXQ).to(torch.int32)
        return self.pack_codes(q.T, scales["zeros"], scales["scales"])

    def pack_codes(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
        """Storage tensors from codes q [N, K] and zero points [K/G, N]."""
        n, k = q.shape
        tensors = {
            "qweight": pack_int32(q.T, 4, dim=1, order=AWQ_ORDER),
            "qzeros": pack_int32(zeros, 4, dim=1, order=AWQ_ORDER),
            "scales": scales if scales.dtype in (torch.float16, *_SCALE_DTYPES) else scales.to(torch.float16),
        }
        return QuantizedWeight(self, (n, k), tensors)

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """The unsigned codes q (0..15) as int32 [N, K]."""
        return unpack_int32(qw.tensors["qweight"], 4, dim=1, order=AWQ_ORDER).T.contiguous()

    def zero_points(self, qw: QuantizedWeight) -> torch.Tensor:
        """int32 [K/G, N]."""
        return unpack_int32(qw.tensors["qzeros"], 4, dim=1, order=AWQ_ORDER)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        g = self.group(qw.shape[1])
        s = qw.tensors["scales"].float().T.repeat_interleave(g, 1)    # [N, K]
        z = self.zero_points(qw).T.repeat_interleave(g, 1)
        return (self.unpack(qw) - z).float() * s

    def affine_view(self, qw: QuantizedWeight) -> AffineView:
        s = qw.tensors["scales"].float()
        offsets = -(self.zero_points(qw).float() * s)
        return AffineView(codes=self.unpack(qw), scales=s.T.contiguous(), offsets=offsets.T.contiguous(),
                          group_size=self.group(qw.shape[1]), bits=4, signed=False)
