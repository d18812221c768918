"""GGUF (ggml) block codecs: raw block bytes <-> integer codes, block scales and float32 values.

One `BlockType` row per ggml type, in the spirit of ggml's `type_traits[]`: elements per block,
bytes per block, the byte layout of the block's fields, and three functions (fields from bytes,
bytes from fields, a float quantizer); the value math (`group_params`, `dequantize_fields`) is
shared by all rows. Adding a type is adding a row to `BLOCK_TYPES`. Layouts and float op order: formats.md section 5;
everything here is vectorised over all blocks at once.

Decoded fields (`dict[str, Tensor]`, leading dim = blocks):
  codes  int32 [B, block]  the stored integers (q8_0 signed; others 0..2^bits-1)
  d      float16 [B]       block scale;  m  float16 [B] (q4_1/q5_1 min, added)
  dmin   float16 [B]       K-quant super-block min scale (subtracted: - dmin*mn)
  sc     int32 [B, G]      sub-block scale integers as stored (q3_k 0..63 biased by 32,
                           q6_k signed int8);  mn  int32 [B, G] sub-block min integers
Value of element e in group g: (codes[e] - zero) * scale[g] (+ offset[g]), with
scale = d * (sc - sc_bias) and offset = m or -(dmin * mn), in float32 in that op order,
which is gguf-py's and ggml's order (bit-exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

QK_K = 256
Fields = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: its facts and its codec functions."""

    name: str                      # lower-case ggml name, e.g. "q4_k"
    type_id: int                   # GGMLQuantizationType value
    block_size: int                # elements per block
    type_size: int                 # bytes per block
    bits: int                      # bits per stored code
    group_size: int                # elements sharing one scale (and offset)
    zero: int                      # code of value 0 in symmetric types (q4_0: 8); 0 otherwise
    signed: bool                   # codes are stored as signed integers (q8_0)
    sc_bias: int                   # stored sub-block scale minus this is the multiplier (q3_k: 32)
    layout: tuple[tuple[str, int, int], ...]   # (field, byte offset, bytes), in storage order
    decode: Callable[[dict[str, torch.Tensor]], Fields]   # raw field bytes -> fields
    encode: Callable[[Fields], dict[str, torch.Tensor]]   # fields -> raw field bytes
    quantize: Callable[[torch.Tensor, bool], Fields]      # float32 [B, block] -> fields
    formula: str                   # dequantization, in the field names above

    @property
    def kquant(self) -> bool:
        return self.block_size == QK_K

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    @property
    def groups(self) -> int:
        return self.block_size // self.group_size


# ---- bit plumbing ----------------------------------------------------------------------------

def _f16(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 2] little-endian half -> float16 [B]."""
    return _fresh(raw).view(torch.float16)[:, 0]


def _f16_bytes(h: torch.Tensor) -> torch.Tensor:
    return _fresh(h.to(torch.float16).reshape(-1, 1)).view(torch.uint8)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    # a dtype view needs unit last stride; .contiguous() keeps odd strides of size-1 dims
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _bits_unpack(raw: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """uint8 [B, groups*L] -> int32 [B, groups*(8/width)*L]: in each run of L bytes, value
    (slot s, byte l) = bits [width*s + width-1 : width*s] of byte l, ordered (group, s, l).

    This one pattern covers every ggml plane: split-half nibbles (q4_0: groups=1, width=4),
    q4_k nibbles (groups=4), 2-bit planes (q2_k, q6_k high bits) and 1-bit high-bit masks.
    """
    b = raw.shape[0]
    per = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=raw.device).view(1, 1, per, 1)
    v = (raw.to(torch.int32).view(b, groups, 1, raw.shape[1] // groups) >> shifts) & ((1 << width) - 1)
    return v.reshape(b, groups * per * (raw.shape[1] // groups))


def _bits_pack(vals: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Inverse of _bits_unpack: int [B, groups*(8/width)*L] -> uint8 [B, groups*L]."""
    b = vals.shape[0]
    per = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=vals.device).view(1, 1, per, 1)
    run = vals.shape[1] // (groups * per)
    v = (vals.to(torch.int32).view(b, groups, per, run) & ((1 << width) - 1)) << shifts
    return v.sum(2).reshape(b, groups * run).to(torch.uint8)


def _k4_scales_unpack(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k/q5_k 12-byte scales -> 6-bit (sc, mn) [B, 8] (ggml get_scale_min_k4).

    Bytes 0-3: sc0-3 | sc4-7 high bits << 6; bytes 4-7: mn0-3 | mn4-7 high bits << 6;
    bytes 8-11: sc4-7 low nibble | mn4-7 low nibble << 4.
    """
    s = raw.to(torch.int32)
    a, m, lo = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 63, (lo & 0xF) | ((a >> 6) << 4)), dim=1)
    mn = torch.cat((m & 63, (lo >> 4) | ((m >> 6) << 4)), dim=1)
    return sc, mn


def _k4_scales_pack(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    a = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    lo = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return torch.cat((a, m, lo), dim=1).to(torch.uint8)


def _q3k_scales_unpack(raw: torch.Tensor) -> torch.Tensor:
    """q3_k 12-byte scales -> 16 stored 6-bit scales (0..63; the multiplier is s - 32).

    Low nibbles: bytes 0-7 low halves are scales 0-7, high halves scales 8-15; high two bits
    of scale i sit in byte 8 + i%4 at bit 2*(i//4).
    """
    s = raw.to(torch.int32)
    low = torch.cat((s[:, :8] & 0xF, s[:, :8] >> 4), dim=1)
    high = _bits_unpack(raw[:, 8:12], 1, 2)        # ordered (i//4, i%4) = i
    return low | (high << 4)


def _q3k_scales_pack(sc: torch.Tensor) -> torch.Tensor:
    sc = sc.to(torch.int32)
    low = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    return torch.cat((low.to(torch.uint8), _bits_pack(sc >> 4, 1, 2)), dim=1)


# ---- decode / encode per type ------------------------------------------------------------------

def _dec_q8_0(r):
    return {"d": _f16(r["d"]), "codes": r["qs"].view(torch.int8).to(torch.int32)}


def _enc_q8_0(f):
    return {"d": _f16_bytes(f["d"]), "qs": f["codes"].to(torch.int8).view(torch.uint8)}


def _dec_legacy(r):
    """q4_0/q4_1/q5_0/q5_1: element j<16 is the low nibble of qs[j], j>=16 the high nibble of
    qs[j-16]; q5 adds bit j of the little-endian u32 qh as bit 4."""
    f = {"d": _f16(r["d"]), "codes": _bits_unpack(r["qs"], 1, 4)}
    if "m" in r:
        f["m"] = _f16(r["m"])
    if "qh" in r:
        f["codes"] = f["codes"] | (_bits_unpack(r["qh"], 4, 1) << 4)
    return f


def _enc_legacy(f, five: bool, with_min: bool):
    c = f["codes"].to(torch.int32)
    r = {"d": _f16_bytes(f["d"]), "qs": _bits_pack(c & 0xF, 1, 4)}
    if with_min:
        r["m"] = _f16_bytes(f["m"])
    if five:
        r["qh"] = _bits_pack(c >> 4, 4, 1)
    return r


def _dec_q2_k(r):
    s = r["scales"].to(torch.int32)
    return {"d": _f16(r["d"]), "dmin": _f16(r["dmin"]), "sc": s & 0xF, "mn": s >> 4,
            "codes": _bits_unpack(r["qs"], 2, 2)}


def _enc_q2_k(f):
    scales = ((f["sc"].to(torch.int32) & 0xF) | (f["mn"].to(torch.int32) << 4)).to(torch.uint8)
    return {"scales": scales, "qs": _bits_pack(f["codes"], 2, 2),
            "d": _f16_bytes(f["d"]), "dmin": _f16_bytes(f["dmin"])}


def _dec_q3_k(r):
    # a set hmask bit means "no -4": stored code = low2 | hbit << 2, value = code - 4
    codes = _bits_unpack(r["qs"], 2, 2) | (_bits_unpack(r["hmask"], 1, 1) << 2)
    return {"d": _f16(r["d"]), "sc": _q3k_scales_unpack(r["scales"]), "codes": codes}


def _enc_q3_k(f):
    c = f["codes"].to(torch.int32)
    return {"hmask": _bits_pack(c >> 2, 1, 1), "qs": _bits_pack(c & 3, 2, 2),
            "scales": _q3k_scales_pack(f["sc"]), "d": _f16_bytes(f["d"])}


def _dec_q45_k(r):
    sc, mn = _k4_scales_unpack(r["scales"])
    codes = _bits_unpack(r["qs"], 4, 4)
    if "qh" in r:
        codes = codes | (_bits_unpack(r["qh"], 1, 1) << 4)
    return {"d": _f16(r["d"]), "dmin": _f16(r["dmin"]), "sc": sc, "mn": mn, "codes": codes}


def _enc_q45_k(f, five: bool):
    c = f["codes"].to(torch.int32)
    r = {"d": _f16_bytes(f["d"]), "dmin": _f16_bytes(f["dmin"]),
         "scales": _k4_scales_pack(f["sc"], f["mn"])}
    if five:
        r["qh"] = _bits_pack(c >> 4, 1, 1)
    r["qs"] = _bits_pack(c & 0xF, 4, 4)
    return r


def _dec_q6_k(r):
    codes = _bits_unpack(r["ql"], 2, 4) | (_bits_unpack(r["qh"], 2, 2) << 4)
    return {"d": _f16(r["d"]), "sc": r["scales"].view(torch.int8).to(torch.int32), "codes": codes}


def _enc_q6_k(f):
    c = f["codes"].to(torch.int32)
    return {"ql": _bits_pack(c & 0xF, 2, 4), "qh": _bits_pack(c >> 4, 2, 2),
            "scales": f["sc"].to(torch.int8).view(torch.uint8), "d": _f16_bytes(f["d"])}


# ---- legacy quantizers: gguf-py 0.19.0's (= ggml's reference) tie rules, bit for bit ----------

def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf / gguf np_roundf. floor(|v| + 0.5) would round 0.49999997 up in fp32."""
    a = v.abs()
    f = torch.floor(a)
    return torch.copysign(f + (a - f >= 0.5).to(v.dtype), v)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """a / b as a true IEEE division. With a Python number for b, CUDA multiplies by 1/b and
    `number / tensor` is reciprocal-then-multiply: both round differently from ggml's C."""
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, float(b))
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, float(a))
    return torch.div(a, b)


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    nz = d != 0
    return torch.where(nz, _div(1.0, torch.where(nz, d, torch.ones_like(d))), torch.zeros_like(d))


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element with the largest |x| along the last dim, sign kept (first one wins)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _quant_q8_0(x, search=True):
    d = _div(x.abs().amax(-1, keepdim=True), 127)
    codes = _round_half_away(x * _safe_inv(d))           # RHAZ with the fp32 d
    return {"d": d[:, 0].half(), "codes": codes.to(torch.int32)}


def _quant_sym_legacy(x, nmax):
    """q4_0 (nmax 8) / q5_0 (16): d = signed max / -nmax, code = trunc(x/d + nmax + 0.5)."""
    d = _div(_signed_absmax(x).unsqueeze(-1), -nmax)
    codes = torch.trunc(x * _safe_inv(d) + (nmax + 0.5)).clamp(0, 2 * nmax - 1)
    return {"d": d[:, 0].half(), "codes": codes.to(torch.int32)}


def _c_loop_extreme(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A min/max `v` [B, 1] as ggml's C loop finds it: when it is a zero, the first zero of the
    block with its sign (reductions may return either of +0/-0; gguf-py's numpy one can pick the
    other, so the stored f16 sign bit of a zero min can differ from gguf-py's; values cannot)."""
    first0 = x.gather(-1, (x == 0).to(torch.int32).argmax(-1, keepdim=True))
    return torch.where(v == 0, first0, v)


def _quant_min_legacy(x, nmax):
    """q4_1 (nmax 15) / q5_1 (31): d = (max - min)/nmax, code = trunc((x - min)/d + 0.5)."""
    mn = _c_loop_extreme(x, x.amin(-1, keepdim=True))
    d = _div(_c_loop_extreme(x, x.amax(-1, keepdim=True)) - mn, nmax)
    codes = torch.trunc((x - mn) * _safe_inv(d) + 0.5).clamp(0, nmax)
    return {"d": d[:, 0].half(), "m": mn[:, 0].half(), "codes": codes.to(torch.int32)}


# ---- K-quant quantizers: per-sub-block least-squares search, then the super-block scales -------
#
# Method (llama.cpp ggml-quants.c make_qx_quants / make_qkx2_quants, re-derived here and run on
# all sub-blocks at once):
#  1. sub-blocks: for a grid of candidate inverse scales around nmax/amax, round the sub-block,
#     fit the scale (and min <= 0) by least squares to those codes, keep the candidate with the
#     smallest squared error, then alternate "round with this scale" / "refit" a few times (each
#     step can only lower the error). Weights are uniform: the error minimised is the plain
#     squared error (llama.cpp weights by rms + |x|; uniform measured ~1% lower RMS here).
#  2. super-block: the sub-block scales (and mins) are rounded against one float16 scale; a few
#     scale factors t <= 1 are tried (clipping the largest sub-block scale buys finer steps for
#     the rest), then d (and dmin) are refitted by least squares with the integers fixed. Every
#     step re-rounds the codes to the final float16-rounded scales and is kept per super-block
#     only if the block's squared error drops.
# `search=False` is plain round-to-nearest (scale = amax/nmax or (max - min)/nmax, sub-block
# scales rounded against max/qmax), the baseline the search is measured against.

_LLOYD_STEPS = 3


def _wsum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(-1)


def _fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, search: bool) -> torch.Tensor:
    """Scale s (may be negative) for codes l in [-nmax, nmax-1], x ~ s*l, per sub-block.

    x, w: [B, G, n]. The extreme element maps to -nmax, which uses the extra negative level.
    """
    mx = _signed_absmax(x)
    rtn = torch.where(mx == 0, torch.zeros_like(mx), _div(mx, -nmax))
    if not search:
        return rtn
    safe = torch.where(mx == 0, torch.ones_like(mx), mx)
    steps = torch.arange(-9, 10, dtype=x.dtype, device=x.device) * 0.1            # [C]
    iscale = -(nmax + steps) / safe.unsqueeze(-1)                                 # [B, G, C]
    xe, we = x.unsqueeze(-2), w.unsqueeze(-2)
    l = torch.round(iscale.unsqueeze(-1) * xe).clamp(-nmax, nmax - 1)             # [B, G, C, n]
    slx, sl2 = _wsum(we * xe * l), _wsum(we * l * l)
    gain = torch.where(sl2 > 0, slx * slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)),
                       torch.full_like(sl2, -1.0))
    best = gain.argmax(-1, keepdim=True)
    slx, sl2 = slx.gather(-1, best)[..., 0], sl2.gather(-1, best)[..., 0]
    s = torch.where(sl2 > 0, slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), rtn)
    for _ in range(_LLOYD_STEPS):
        ok = s != 0
        l = torch.round(x / torch.where(ok, s, torch.ones_like(s)).unsqueeze(-1)).clamp(-nmax, nmax - 1)
        slx, sl2 = _wsum(w * x * l), _wsum(w * l * l)
        s = torch.where(ok & (sl2 > 0), slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), s)
    return torch.where(mx == 0, torch.zeros_like(s), s)


def _fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                nstep: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale >= 0, min <= 0) per sub-block for codes l in [0, nmax], x ~ scale*l + min."""
    lo = x.amin(-1).clamp(max=0.0)
    rng = x.amax(-1) - lo
    flat = rng <= 0
    safe_rng = torch.where(flat, torch.ones_like(rng), rng)
    scale0 = torch.where(flat, torch.zeros_like(rng), _div(rng, nmax))
    if not search:
        return scale0, lo

    def err(s, m, l):
        return _wsum(w.unsqueeze(-2) * (s.unsqueeze(-1) * l + m.unsqueeze(-1) - x.unsqueeze(-2)) ** 2)

    def fit(l, xe, we):
        """Weighted least squares for (scale, min) given codes l, constrained to min <= 0."""
        sw, sx = _wsum(we.expand_as(l)), _wsum(we * xe)
        sl, sl2, sxl = _wsum(we * l), _wsum(we * l * l), _wsum(we * l * xe)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sxl - sx * sl) / det
        m = (sl2 * sx - sl * sxl) / det
        clip = m > 0
        s = torch.where(clip, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), s)
        m = torch.where(clip, torch.zeros_like(m), m)
        return s, m, ok & (s >= 0)

    xe, we = x.unsqueeze(-2), w.unsqueeze(-2)
    steps = rmin + rdelta * torch.arange(nstep + 1, dtype=x.dtype, device=x.device)  # [C]
    iscale = (nmax + steps) / safe_rng.unsqueeze(-1)                                # [B, G, C]
    l = torch.round(iscale.unsqueeze(-1) * (xe - lo[..., None, None])).clamp(0, nmax)
    s, m, ok = fit(l, xe, we)
    e = torch.where(ok, err(s, m, l), torch.full_like(s, float("inf")))
    # the plain rounding candidate competes too
    l0 = torch.round((x - lo.unsqueeze(-1)) / safe_rng.unsqueeze(-1) * nmax).clamp(0, nmax).unsqueeze(-2)
    e0 = err(scale0.unsqueeze(-1), lo.unsqueeze(-1), l0)
    best = e.argmin(-1, keepdim=True)
    take = e.gather(-1, best) < e0
    s = torch.where(take, s.gather(-1, best), scale0.unsqueeze(-1))[..., 0]
    m = torch.where(take, m.gather(-1, best), lo.unsqueeze(-1))[..., 0]
    for _ in range(_LLOYD_STEPS):
        pos = s > 0
        l = torch.round((x - m.unsqueeze(-1)) / torch.where(pos, s, torch.ones_like(s)).unsqueeze(-1))
        l = l.clamp(0, nmax).unsqueeze(-2)
        s1, m1, ok = fit(l, xe, we)
        better = ok & pos.unsqueeze(-1) & (err(s1, m1, l) < err(s.unsqueeze(-1), m.unsqueeze(-1), l))
        s = torch.where(better, s1, s.unsqueeze(-1))[..., 0]
        m = torch.where(better, m1, m.unsqueeze(-1))[..., 0]
    s = torch.where(flat, torch.zeros_like(s), s)
    m = torch.where(flat, lo, m)
    return s, m


def _unsigned_scales(v: torch.Tensor, qmax: int, t: float | None = None):
    """Non-negative sub-block values [B, G] -> (float16 d [B], integers [B, G] in 0..qmax).

    t=None: ggml's plain rule, d = max/qmax and round(v * qmax/max). A factor t: d = t*max/qmax
    (t < 1 clips the largest values for finer steps elsewhere), integers rounded against the
    float16 d actually stored.
    """
    vmax = v.amax(-1, keepdim=True)
    pos = vmax > 0
    if t is None:
        inv = torch.where(pos, _div(qmax, torch.where(pos, vmax, torch.ones_like(vmax))), torch.zeros_like(vmax))
        return _div(vmax[:, 0], qmax).half(), torch.round(inv * v).clamp(0, qmax).to(torch.int32)
    d = _div(vmax * t, qmax).half()
    df = d.float()
    ok = df > 0
    q = torch.where(ok, torch.round(v / torch.where(ok, df, torch.ones_like(df))), torch.zeros_like(v))
    return d[:, 0], q.clamp(0, qmax).to(torch.int32)


def _signed_scales(v: torch.Tensor, qmax: int, qlo: int, t: float | None = None):
    """Signed sub-block scales [B, G] -> (float16 d [B], integers in [qlo, qmax]); the largest
    |scale| maps to -(qmax + 1) (ggml's trick: its sign is absorbed by d). t as above."""
    mx = _signed_absmax(v).unsqueeze(-1)
    nz = mx != 0
    safe = torch.where(nz, mx, torch.ones_like(mx))
    if t is None:
        iscale = torch.where(nz, _div(-(qmax + 1), safe), torch.zeros_like(mx))
        d = torch.where(nz, _div(1.0, torch.where(nz, iscale, torch.ones_like(iscale))), torch.zeros_like(iscale))
        return d[:, 0].half(), torch.round(iscale * v).clamp(qlo, qmax).to(torch.int32)
    d = torch.where(nz, _div(safe * t, -(qmax + 1)), torch.zeros_like(mx)).half()
    df = d.float()
    ok = df != 0
    q = torch.where(ok, torch.round(v / torch.where(ok, df, torch.ones_like(df))), torch.zeros_like(v))
    return d[:, 0], q.clamp(qlo, qmax).to(torch.int32)


def _requantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, lo: int, hi: int):
    """Codes nearest to x [B, G, n] under final float32 group scales/offsets [B, G]."""
    num = x if offset is None else x - offset.unsqueeze(-1)
    ok = (scale != 0).unsqueeze(-1)
    q = torch.round(num / torch.where(ok, scale.unsqueeze(-1), torch.ones_like(num)))
    return torch.where(ok, q.clamp(lo, hi), torch.zeros_like(q))


def with_codes(bt: "BlockType", x: torch.Tensor, f: Fields) -> Fields:
    """`f` with its codes re-rounded to x under its (final, float16-rounded) scales."""
    b = x.shape[0]
    scale, offset = group_params(bt, f)
    top = (1 << bt.bits) - 1
    q = _requantize(x.view(b, bt.groups, bt.group_size), scale, offset, -bt.zero, top - bt.zero) + bt.zero
    return {**f, "codes": q.reshape(b, bt.block_size).to(torch.int32)}


def _block_err(bt: "BlockType", x: torch.Tensor, f: Fields) -> torch.Tensor:
    return (dequantize_fields(bt, f) - x).pow(2).sum(-1)


def _keep_better(bt, x, best, best_err, cand):
    err = _block_err(bt, x, cand)
    take = err < best_err
    return _select(take, cand, best), torch.where(take, err, best_err)


def _refit_superblock(bt: "BlockType", x: torch.Tensor, f: Fields, err: torch.Tensor):
    """Least-squares d (and dmin) for fixed integer sub-block scales and codes, then re-round
    the codes; kept per block only where the error drops. x ~ d*A + dmin*M with
    A = sc*(q - zero) and M = -mn."""
    b = x.shape[0]
    one = torch.ones_like(f["d"])
    unit = {**f, "d": one, **({"dmin": one} if "dmin" in f else {})}
    us, uo = group_params(bt, unit)
    a = ((f["codes"] - bt.zero).float().view(b, -1, bt.group_size) * us.unsqueeze(-1)).reshape(b, -1)
    saa, sxa = (a * a).sum(-1), (x * a).sum(-1)
    if uo is None:
        ok = saa > 0
        d = torch.where(ok, sxa / torch.where(ok, saa, torch.ones_like(saa)), f["d"].float())
        cand = {**f, "d": d.half()}
    else:
        m = uo.unsqueeze(-1).expand(b, -1, bt.group_size).reshape(b, -1)
        smm, sam, sxm = (m * m).sum(-1), (a * m).sum(-1), (x * m).sum(-1)
        det = saa * smm - sam * sam
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        d = torch.where(ok, (sxa * smm - sam * sxm) / det, f["d"].float())
        dmin = torch.where(ok, (saa * sxm - sam * sxa) / det, f["dmin"].float())
        cand = {**f, "d": d.half(), "dmin": dmin.half()}
    cand = with_codes(bt, x, cand)
    return _keep_better(bt, x, f, err, cand)


# Super-block scale factors tried by the search: t < 1 clips the largest sub-block scales to
# give the others finer steps (matters on heavy-tailed weights).
_SUPER_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
_REFITS = 2


def _quant_affine_k(x, search, nmax, n, qmax, rmin, rdelta, nstep):
    """q2_k / q4_k / q5_k: sub-blocks of n with scale and min, both quantized to 0..qmax."""
    bt = _AFFINE_K[nmax]
    b = x.shape[0]
    xs = x.view(b, -1, n)
    s, m = _fit_affine(xs, torch.ones_like(xs), nmax, rmin, rdelta, nstep, search)
    d, sc = _unsigned_scales(s, qmax)
    dmin, mn = _unsigned_scales(-m, qmax)
    f = with_codes(bt, x, {"d": d, "dmin": dmin, "sc": sc, "mn": mn})
    if not search:
        return f
    err = _block_err(bt, x, f)
    for t in _SUPER_FACTORS:                    # scale factor, then min factor
        d_t, sc_t = _unsigned_scales(s, qmax, t)
        f, err = _keep_better(bt, x, f, err, with_codes(bt, x, {**f, "d": d_t, "sc": sc_t}))
    for t in _SUPER_FACTORS:
        dmin_t, mn_t = _unsigned_scales(-m, qmax, t)
        f, err = _keep_better(bt, x, f, err, with_codes(bt, x, {**f, "dmin": dmin_t, "mn": mn_t}))
    for _ in range(_REFITS):
        f, err = _refit_superblock(bt, x, f, err)
    return f


def _quant_sym_k(x, search, nmax, sc_max, sc_lo, sc_bias):
    """q3_k (nmax 4, 6-bit scales biased by 32) / q6_k (nmax 32, int8 scales), sub-blocks of 16."""
    bt = _SYM_K[nmax]
    b = x.shape[0]
    xs = x.view(b, -1, 16)
    s = _fit_symmetric(xs, torch.ones_like(xs), nmax, search)
    d, sc = _signed_scales(s, sc_max, sc_lo)
    f = with_codes(bt, x, {"d": d, "sc": sc + sc_bias})
    if not search:
        return f
    err = _block_err(bt, x, f)
    for t in _SUPER_FACTORS:
        d_t, sc_t = _signed_scales(s, sc_max, sc_lo, t)
        f, err = _keep_better(bt, x, f, err, with_codes(bt, x, {"d": d_t, "sc": sc_t + sc_bias}))
    for _ in range(_REFITS):
        f, err = _refit_superblock(bt, x, f, err)
    return f


# ---- the table ---------------------------------------------------------------------------------

def _row(name, type_id, block_size, type_size, bits, group_size, layout, decode, encode, quantize,
         formula, zero=0, signed=False, sc_bias=0):
    bt = BlockType(name, type_id, block_size, type_size, bits, group_size, zero, signed, sc_bias,
                   tuple(layout), decode, encode, quantize, formula)
    end = 0
    for _, off, nbytes in bt.layout:
        assert off == end, (name, "fields must tile the block")
        end = off + nbytes
    assert end == type_size, (name, end, type_size)
    return bt


BLOCK_TYPES: dict[str, BlockType] = {bt.name: bt for bt in (
    _row("q8_0", 8, 32, 34, 8, 32, [("d", 0, 2), ("qs", 2, 32)],
         _dec_q8_0, _enc_q8_0, _quant_q8_0, "d*q, q int8", signed=True),
    _row("q4_0", 2, 32, 18, 4, 32, [("d", 0, 2), ("qs", 2, 16)],
         _dec_legacy, lambda f: _enc_legacy(f, False, False), lambda x, s=True: _quant_sym_legacy(x, 8),
         "d*(q-8)", zero=8),
    _row("q4_1", 3, 32, 20, 4, 32, [("d", 0, 2), ("m", 2, 2), ("qs", 4, 16)],
         _dec_legacy, lambda f: _enc_legacy(f, False, True), lambda x, s=True: _quant_min_legacy(x, 15),
         "d*q + m"),
    _row("q5_0", 6, 32, 22, 5, 32, [("d", 0, 2), ("qh", 2, 4), ("qs", 6, 16)],
         _dec_legacy, lambda f: _enc_legacy(f, True, False), lambda x, s=True: _quant_sym_legacy(x, 16),
         "d*(q-16)", zero=16),
    _row("q5_1", 7, 32, 24, 5, 32, [("d", 0, 2), ("m", 2, 2), ("qh", 4, 4), ("qs", 8, 16)],
         _dec_legacy, lambda f: _enc_legacy(f, True, True), lambda x, s=True: _quant_min_legacy(x, 31),
         "d*q + m"),
    _row("q2_k", 10, 256, 84, 2, 16, [("scales", 0, 16), ("qs", 16, 64), ("d", 80, 2), ("dmin", 82, 2)],
         _dec_q2_k, _enc_q2_k,
         lambda x, s=True: _quant_affine_k(x, s, 3, 16, 15, -0.5, 0.1, 15),
         "(d*sc)*q - dmin*mn, sc = scales & 15, mn = scales >> 4"),
    _row("q3_k", 11, 256, 110, 3, 16, [("hmask", 0, 32), ("qs", 32, 64), ("scales", 96, 12), ("d", 108, 2)],
         _dec_q3_k, _enc_q3_k, lambda x, s=True: _quant_sym_k(x, s, 4, 31, -32, 32),
         "(d*(sc-32))*(q-4), q = low2 | hbit<<2", zero=4, sc_bias=32),
    _row("q4_k", 12, 256, 144, 4, 32, [("d", 0, 2), ("dmin", 2, 2), ("scales", 4, 12), ("qs", 16, 128)],
         _dec_q45_k, lambda f: _enc_q45_k(f, False),
         lambda x, s=True: _quant_affine_k(x, s, 15, 32, 63, -1.0, 0.1, 20),
         "(d*sc)*q - dmin*mn, 6-bit sc/mn"),
    _row("q5_k", 13, 256, 176, 5, 32,
         [("d", 0, 2), ("dmin", 2, 2), ("scales", 4, 12), ("qh", 16, 32), ("qs", 48, 128)],
         _dec_q45_k, lambda f: _enc_q45_k(f, True),
         lambda x, s=True: _quant_affine_k(x, s, 31, 32, 63, -0.5, 0.1, 15),
         "(d*sc)*q - dmin*mn, 6-bit sc/mn, q = low4 | hbit<<4"),
    _row("q6_k", 14, 256, 210, 6, 16, [("ql", 0, 128), ("qh", 128, 64), ("scales", 192, 16), ("d", 208, 2)],
         _dec_q6_k, _enc_q6_k, lambda x, s=True: _quant_sym_k(x, s, 32, 127, -128, 0),
         "(d*sc)*(q-32), sc int8, q = low4 | high2<<4", zero=32),
)}

BY_TYPE_ID: dict[int, BlockType] = {bt.type_id: bt for bt in BLOCK_TYPES.values()}
_AFFINE_K = {3: BLOCK_TYPES["q2_k"], 15: BLOCK_TYPES["q4_k"], 31: BLOCK_TYPES["q5_k"]}
_SYM_K = {4: BLOCK_TYPES["q3_k"], 32: BLOCK_TYPES["q6_k"]}


# ---- whole-tensor entry points -------------------------------------------------------------------

def split_fields(bt: BlockType, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 [B, type_size] -> {field: uint8 [B, nbytes]} by the row's layout."""
    return {name: blocks[:, off:off + n] for name, off, n in bt.layout}


def unpack_blocks(bt: BlockType, blocks: torch.Tensor) -> Fields:
    """uint8 [B, type_size] raw blocks -> decoded fields (codes, d, ...)."""
    return bt.decode(split_fields(bt, blocks.to(torch.uint8)))


def pack_blocks(bt: BlockType, fields: Fields) -> torch.Tensor:
    """Decoded fields -> uint8 [B, type_size] raw blocks."""
    raw = bt.encode(fields)
    return torch.cat([raw[name] for name, _, _ in bt.layout], dim=1)


def group_params(bt: BlockType, f: Fields) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 (scale [B, G], offset [B, G] or None) of each group, in gguf-py's op order."""
    d = f["d"].float().unsqueeze(-1)
    scale = d * (f["sc"] - bt.sc_bias).float() if "sc" in f else d
    if "m" in f:
        offset = f["m"].float().unsqueeze(-1)
    elif "dmin" in f:
        offset = -(f["dmin"].float().unsqueeze(-1) * f["mn"].float())
    else:
        offset = None
    return scale, offset


def dequantize_fields(bt: BlockType, f: Fields) -> torch.Tensor:
    """float32 [B, block_size]: (codes - zero) * scale (+ offset), as gguf-py computes it."""
    b = f["codes"].shape[0]
    scale, offset = group_params(bt, f)
    v = (f["codes"] - bt.zero).float().view(b, bt.groups, bt.group_size) * scale.unsqueeze(-1)
    if offset is not None:
        v = v + offset.unsqueeze(-1)
    return v.reshape(b, bt.block_size)


def dequantize_blocks(bt: BlockType, blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [B, type_size] -> float32 [B, block_size], bit-exact with gguf.quants.dequantize."""
    return dequantize_fields(bt, unpack_blocks(bt, blocks))


def _select(mask: torch.Tensor, a: Fields, b: Fields) -> Fields:
    return {k: torch.where(mask.view(-1, *([1] * (a[k].dim() - 1))), a[k], b[k]) for k in a}


def quantize_blocks(bt: BlockType, x: torch.Tensor, search: bool = True, chunk: int = 1024) -> Fields:
    """float32 [B, block_size] -> fields. Legacy types follow gguf-py bit for bit (but for the
    f16 sign of a zero q4_1/q5_1 min, see _c_loop_extreme); K-quants use the least-squares
    search (search=True) or plain round-to-nearest (search=False).

    With search, each super-block also keeps the round-to-nearest result when that is closer:
    the search fits sub-blocks before their scales are rounded to 4/6/8 bits against a float16
    d, so on a rare block (constant blocks, whose RTN scale lands exactly on the float16 grid)
    it can lose. The searched result is therefore never worse than RTN, block by block.
    """
    x = x.float()
    if x.shape[0] == 0:
        return {k: v[:0] for k, v in bt.quantize(torch.zeros(1, bt.block_size, device=x.device), False).items()}
    outs = []
    for i in range(0, x.shape[0], chunk):      # bounds the [B, G, candidates, n] temporaries
        xc = x[i:i + chunk]
        f = bt.quantize(xc, search)
        if search and bt.kquant:
            g = bt.quantize(xc, False)
            err_f = (dequantize_fields(bt, f) - xc).pow(2).sum(-1)
            err_g = (dequantize_fields(bt, g) - xc).pow(2).sum(-1)
            f = _select(err_f <= err_g, f, g)
        outs.append(f)
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


# ---- facts for kernel writers ------------------------------------------------------------------

def _facts(bt: BlockType) -> dict:
    return {
        "type_id": bt.type_id,
        "block_elems": bt.block_size,
        "block_bytes": bt.type_size,
        "bits": bt.bits,
        "bits_per_weight": bt.bits_per_weight,
        "group_size": bt.group_size,
        "zero": bt.zero,
        "fields": {name: (off, n) for name, off, n in bt.layout},
        "dequant": bt.formula,
    }


# Per-type facts for decoding raw blocks in a kernel: field -> (byte offset, bytes) inside a
# block; f16 fields (d, m, dmin) are little-endian. Element maps (which bits of which byte hold
# element e) are formats.md section 5 and `_bits_unpack` above.
BLOCK_FACTS: dict[str, dict] = {name: _facts(bt) for name, bt in BLOCK_TYPES.items()}
