"""GPTQ weight-only int4/int8 (formats.md §4.1: AutoGPTQ / GPTQModel, vLLM `quant_method: gptq`),
and the AutoRound / INC exports that reuse the GPTQ and AWQ layouts (§7.1).

Storage (b bits, G = group size, ceil(K/G) groups):
  qweight  int32 [K*b/32, N]          packed along K, sequential: value i of word (r, n) = q[r*32/b + i, n]
  qzeros   int32 [ceil(K/G), N*b/32]  packed along N, sequential; v1 (`gptq`) stores zero - 1
  scales   fp16  [ceil(K/G), N]
  g_idx    int32 [K]                  group of input feature k (non-monotone with act-order)
W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.errors import OmniqError, where
from omniq.formats.packing import pack_int32, unpack_int32
from omniq.schemes.base import AffineView, QuantizedWeight, QuantScheme, TensorSpec, check_choice
from omniq.schemes.registry import register_scheme, scheme

BITS = (4, 8)
GROUP_SIZES = (-1, 32, 64, 128)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_SCALE_DTYPES = (torch.bfloat16,)  # fp16 is the format; bf16 keeps scale * code exact in fp32 too
_FP16_MAX = torch.finfo(torch.float16).max


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fp16_scales(s: torch.Tensor, scheme_name: str, name: str | None) -> torch.Tensor:
    """fp32 group scales -> the format's fp16, rounded UP to the next fp16 value.

    Rounding to nearest could shrink a scale by half an fp16 ulp, and the group's extreme
    weight would then sit up to maxq/2 ulps outside the grid (clipped); rounding up keeps the
    whole group within half a step. A scale above the fp16 range is an error.
    """
    s = s.float()
    s16 = s.to(torch.float16)
    s16 = torch.where(s16.float() < s, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    if bool(s16.isinf().any()):
        raise OmniqError(f"{where(name)}{scheme_name}: the weight's range needs group scales up to "
                         f"{float(s.max()):.4g}, above the fp16 maximum {_FP16_MAX:.0f} the format stores; "
                         f"rescale the layer or use a float scheme (fp8)")
    return s16


def group_minmax(w: torch.Tensor, g_idx: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (n, group) min and max of w [N, K] over the columns k with g_idx[k] == group,
    widened to include 0 (xmin <= 0 <= xmax), as GPTQ's find_params does."""
    n = w.shape[0]
    idx = g_idx.long().unsqueeze(0).expand(n, -1)
    zeros = torch.zeros(n, groups, dtype=torch.float32, device=w.device)
    xmin = zeros.scatter_reduce(1, idx, w, "amin", include_self=True)
    xmax = zeros.scatter_reduce(1, idx, w, "amax", include_self=True)
    return xmin, xmax


@scheme("gptq")
@dataclass(frozen=True)
class GPTQScheme(QuantScheme):
    """GPTQ-format int weights with group scales and zero points (weight-only, W4A16 / W8A16).

    bits: 4 or 8. group_size: 32, 64, 128 or -1 (one group per output channel, G = K).
    K need not be a multiple of the group size: groups are ceil(K/G), the last one partial,
    all defined by g_idx. K must be a multiple of 32/bits (qweight packs K) and N a multiple
    of 32/bits (qzeros packs N).

    Quantizer (GPTQ's find_params, RNE): per group xmin = min(w, 0), xmax = max(w, 0);
      sym:  scale = 2*max(|xmin|, xmax)/maxq, zero = 2^(bits-1)
      asym: scale = (xmax - xmin)/maxq, zero = rint(-xmin/scale)
    an all-zero group uses xmin, xmax = -1, +1; the scale is rounded up to fp16 first (so
    the fp16 grid still covers the group) and q = clamp(rint(w/scale) + zero, 0, maxq).
    Unlike GPTQ's reference, a symmetric group with no negative value still gets the full
    2*max range (GPTQ narrows it to max/maxq, which clips half of the group), so every
    weight is within half a step.
    checkpoint_format "gptq" (v1) stores zero - 1 and cannot store zero 0 (it reads back
    as 2^bits): an asymmetric v1 group whose zero would be 0 gets zero 1 and a scale
    stretched to xmax/(maxq - 1/2), which keeps the half-step bound.

    desc_act (act-order): GPTQ quantizes columns in descending order of the Hessian
    diagonal (the activations' energy per input feature). `scale(w)` sees no activations,
    so it uses the weight's column energy sum_n W[n, k]^2 as the proxy (ties keep the
    lower k first); g_idx[k] = (position of k in that order) // G, non-monotone in general;
    qweight rows stay in the original K order.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"

    def __post_init__(self):
        check_choice("gptq", "bits", self.bits, BITS)
        check_choice("gptq", "group_size", self.group_size, GROUP_SIZES)
        check_choice("gptq", "sym", self.sym, (True, False))
        check_choice("gptq", "desc_act", self.desc_act, (True, False))
        check_choice("gptq", "checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)

    # ---- description -------------------------------------------------------------------
    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def k_multiple(self) -> int:  # qweight packs K
        return self.pack_factor

    def group(self, k: int) -> int:
        """The group size G in effect for K input features (K when group_size is -1)."""
        return k if self.group_size == -1 else self.group_size

    def num_groups(self, k: int) -> int:
        return _ceil_div(k, self.group(k))

    def check_shape(self, n: int, k: int, name: str | None = None) -> None:
        f = self.pack_factor
        if k % f or n % f:
            dim, size = ("K (in_features)", k) if k % f else ("N (out_features)", n)
            raise OmniqError(f"{where(name)}gptq: {dim}={size} is not a multiple of {f}: {self.bits}-bit GPTQ "
                             f"packs {f} values per int32 word along K (qweight) and along N (qzeros); "
                             f"pad the layer to a multiple of {f} or leave it unquantized")

    def check_weight(self, w: torch.Tensor, name: str | None = None) -> None:
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            self.check_shape(*w.shape, name)  # before the base check: its K message is generic
        QuantScheme.check_weight(self, w, name)

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        self.check_shape(n, k)
        f, g = self.pack_factor, self.num_groups(k)
        # one group row per K range, except per-channel (one row for all K) and act-order
        # (a group's members are spread over all of K): those rows are replicated, not split
        replicated = self.group_size == -1 or self.desc_act
        gin = dict(in_dim=None) if replicated else dict(in_dim=0, in_step=self.group_size)
        return {
            "qweight": TensorSpec((k // f, n), torch.int32, in_dim=0, in_step=f, out_dim=1),
            "qzeros": TensorSpec((g, n // f), torch.int32, out_dim=1, out_step=f, **gin),
            "scales": TensorSpec((g, n), torch.float16, out_dim=1, also_accepts=_SCALE_DTYPES, **gin),
            "g_idx": TensorSpec((k,), torch.int32, in_dim=0, optional=not self.desc_act),
        }

    # ---- the three verbs -----------------------------------------------------------------
    def _g_idx(self, w: torch.Tensor) -> torch.Tensor:
        k = w.shape[1]
        g = self.group(k)
        pos = torch.arange(k, device=w.device)
        if self.desc_act and g < k:
            energy = w.float().square().sum(0)
            perm = torch.sort(energy, descending=True, stable=True).indices
            pos = torch.empty_like(perm).scatter_(0, perm, torch.arange(k, device=w.device))
        return (pos // g).to(torch.int32)

    def scale(self, w: torch.Tensor, name: str | None = None) -> dict[str, torch.Tensor]:
        """{"scales": fp16 [G, N], "zeros": int32 [G, N] (true zero points), "g_idx": int32 [K]}."""
        w = w.float()
        n, k = w.shape
        g_idx = self._g_idx(w)
        xmin, xmax = group_minmax(w, g_idx, self.num_groups(k))   # [N, G]
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        maxq = self.maxq
        if self.sym:
            s = fp16_scales(2 * torch.maximum(-xmin, xmax) / maxq, "gptq", name)
            zero = torch.full(s.shape, (maxq + 1) // 2, dtype=torch.int32, device=w.device)
        else:
            s = fp16_scales((xmax - xmin) / maxq, "gptq", name)
            zero = torch.round(-xmin / s.float()).clamp(0, maxq)
            if self.checkpoint_format == "gptq":
                z0 = zero == 0
                s = torch.where(z0, fp16_scales(torch.maximum(s.float(), xmax / (maxq - 0.5)), "gptq", name), s)
                zero = torch.round(-xmin / s.float()).clamp(1, maxq)
            zero = zero.to(torch.int32)
        return {"scales": s.T.contiguous(), "zeros": zero.T.contiguous(), "g_idx": g_idx}

    def quantize(self, w: torch.Tensor, name: str | None = None) -> QuantizedWeight:
        self.check_weight(w, name)
        qw = self.pack(w, self.scale(w, name))
        qw.name = name
        return qw

    def codes(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
        """Integer codes [N, K] of w for group scales/zeros [G, N] and g_idx [K]."""
        gi = g_idx.long()
        s = scales.float().T[:, gi]
        z = zeros.T[:, gi].float()
        return (torch.round(w.float() / s) + z).clamp(0, self.maxq).to(torch.int32)

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        n, k = w.shape
        self.check_shape(n, k)
        g_idx = scales.get("g_idx")
        if g_idx is None:
            g_idx = (torch.arange(k, device=w.device) // self.group(k)).to(torch.int32)
        q = self.codes(w, scales["scales"], scales["zeros"], g_idx)
        return self.pack_codes(q, scales["zeros"], scales["scales"], g_idx)

    def pack_codes(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor) -> QuantizedWeight:
        """Storage tensors from integer codes q [N, K] and true zero points [G, N]."""
        n, k = q.shape
        stored_zeros = zeros - 1 if self.checkpoint_format == "gptq" else zeros
        tensors = {
            "qweight": pack_int32(q.T, self.bits, dim=0),
            "qzeros": pack_int32(stored_zeros, self.bits, dim=1),
            "scales": scales if scales.dtype in (torch.float16, *_SCALE_DTYPES) else scales.to(torch.float16),
            "g_idx": g_idx.to(torch.int32),
        }
        return QuantizedWeight(self, (n, k), tensors)

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        """The unsigned codes q (0 .. 2^bits - 1) as int32 [N, K], in the original K order."""
        return unpack_int32(qw.tensors["qweight"], self.bits, dim=0).T.contiguous()

    def zero_points(self, qw: QuantizedWeight) -> torch.Tensor:
        """The zero points as readers use them, int32 [G, N] (v1: stored + 1, so 0xF reads 16)."""
        z = unpack_int32(qw.tensors["qzeros"], self.bits, dim=1)
        return z + 1 if self.checkpoint_format == "gptq" else z

    def g_idx(self, qw: QuantizedWeight) -> torch.Tensor:
        g = qw.tensors.get("g_idx")
        if g is None:
            k = qw.shape[1]
            g = (torch.arange(k, device=qw.device) // self.group(k)).to(torch.int32)
        return g

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        gi = self.g_idx(qw).long()
        s = qw.tensors["scales"].float().T[:, gi]
        z = self.zero_points(qw).T[:, gi]
        return (self.unpack(qw) - z).float() * s

    def affine_view(self, qw: QuantizedWeight) -> AffineView:
        k = qw.shape[1]
        s = qw.tensors["scales"].float()
        offsets = -(self.zero_points(qw).float() * s)
        g_idx = self.g_idx(qw)
        trivial = torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // self.group(k))
        return AffineView(codes=self.unpack(qw), scales=s.T.contiguous(), offsets=offsets.T.contiguous(),
                          group_size=self.group(k), bits=self.bits, signed=False,
                          g_idx=None if trivial else g_idx)


# ---- AutoRound / INC exports (formats.md §7.1): GPTQ- or AWQ-packed -----------------------
AUTO_ROUND_FORMATS = {
    "auto_round:auto_gptq": "gptq",     # GPTQ layout with v1's zero - 1
    "auto_gptq": "gptq",
    "auto_round": "gptq_v2",            # same tensors, zeros stored as-is
    "auto_round:auto_awq": "awq",       # AWQ layout (asymmetric 4-bit)
    "auto_awq": "awq",
}
_AUTO_ROUND_PARAMS = ("packing_format", "bits", "group_size", "sym", "desc_act")


def auto_round(packing_format: str | None = None, bits: int = 4, group_size: int = 128, sym: bool = True,
               desc_act: bool = False, **extra) -> QuantScheme:
    """The scheme an AutoRound / INC checkpoint's `packing_format` stores: `auto_round:auto_gptq`
    -> gptq (v1), `auto_round` -> gptq with checkpoint_format gptq_v2, `auto_round:auto_awq`
    -> awq. Without packing_format, AutoRound's own choice: auto_gptq when sym, else auto_round."""
    if extra:
        raise OmniqError(f"auto_round: unknown parameter(s) {sorted(extra)}; allowed: {list(_AUTO_ROUND_PARAMS)}")
    if packing_format is None:
        packing_format = "auto_round:auto_gptq" if sym else "auto_round"
    fmt = AUTO_ROUND_FORMATS.get(str(packing_format).strip().lower())
    if fmt is None:
        raise OmniqError(f"auto_round: unsupported packing_format={packing_format!r}; allowed: "
                         f"{list(AUTO_ROUND_FORMATS)}")
    if fmt == "awq":
        from omniq.schemes.awq import AWQScheme
        if sym or desc_act:
            raise OmniqError(f"auto_round: packing_format={packing_format!r} is AutoRound's asymmetric AWQ export; "
                             f"pass sym=False (and no desc_act), or use auto_round:auto_gptq for symmetric weights")
        return AWQScheme(bits=bits, group_size=group_size)
    return GPTQScheme(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=fmt)


register_scheme("auto_round", auto_round, aliases=("auto-round", "inc"))
