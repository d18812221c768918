"""Grouped integer weight-only matmul in Triton over one prepared layout.

Every integer scheme (GPTQ incl. act-order, AWQ, AutoRound, int8 weight-only, msModelSlim
W4A8) describes its weight as `AffineView`: W[n, k] = codes * scales + offsets per group.
`prepare_affine` turns that into ONE layout, "triton.affine.v1":

  qweight  int32 [N, ceil(K/PB) * 16]       unsigned codes u, PB = 16 * (32/bits) inputs per
                                            16-word block, "slot-major": word r of a block holds
                                            k = 16*i + r in value slot i (pack_slot_major)
  scales   fp16 | bf16 | fp32 [G, N]        the narrowest dtype that holds them exactly
  zeros    uint8 [G, N] (integer zero points, W = (u - z) * s), or float offsets [G, N]
           (W = u * s + o), or nothing when every zero point is one constant
  perm     int32 [K]                        GPTQ act-order: K sorted by g_idx once here; the
                                            kernels gather x columns through it
  g_idx    int32 [K]                        only for an irregular g_idx that sorting cannot
                                            turn into uniform groups (per-element gather)

Kernels sharing it (the dispatcher switches per M without a second copy):
  gemv        fp32 FMA reduction, no tensor cores, M <= 4
  splitk      tensor-core dots with split-K (the last CTA of a tile sums the partials), M <= 64
  gemm        the same kernel tiled for large M
  dequant_mm  large M: one pass writes W in x's dtype (transient), the vendor BLAS multiplies

The dot kernels compute the transposed product acc[n, m] = W[n, :] . x[m, :] (swap-AB), so
the dequantized weight is the MMA's register operand. Slot i of a [BN, 16] word tile is a
[BN, 16] tile of consecutive k, so unpacking is a shift and a mask in place, one 16-deep dot
per slot, no reshapes. Codes become floats with the exponent trick (u | 0x4B000000 read as
fp32 is 2^23 + u; subtracting 2^23 + z gives u - z exactly), or with PTX lop3 into
bf16x2 / f16x2 pairs when compiled for NVIDIA (ASM config). Integer zero points are taken
off before the dot, group scales are applied to the fp32 block sum, so the dot's inputs are
exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.dispatch import Layout
from omniq.errors import KernelError, where
from omniq.kernels._common import (float_dot_dtype, interpreting, launch_grid, layered_config, next_pow2,
                                   pick_split, split_workspace, tile_counters, tl, triton)

SUPPORTED_BITS = (2, 4, 8)
LAYOUT_NAME = "triton.affine.v1"
WORDS_PER_BLOCK = 16   # words per row per K block: each value slot is a 16-wide dot


# --------------------------------------------------------------------------------------------
# The prepared layout
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class AffinePrepared:
    """The one device copy of an integer weight for the triton.affine kernels."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    g_idx: torch.Tensor | None
    n: int = 0
    k: int = 0
    bits: int = 4
    group_size: int = 128
    zmode: int = 0      # 0: constant zero point zc, 1: uint8 zeros, 2: float offsets
    zc: int = 0
    act_int8: bool = False  # the scheme quantizes activations to int8 per token (W4A8)
    name: str | None = None
    zero_max: int = 0       # the largest integer zero point (zmode 1), known at prepare time

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]


def _narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """t (fp32) in fp16 or bf16 when that holds every value exactly, else fp32."""
    for dt in (torch.float16, torch.bfloat16):
        c = t.to(dt)
        if torch.isfinite(c).all() and torch.equal(c.float(), t):
            return c
    return t


def prepare_affine(qw, device) -> AffinePrepared:
    """Repack qw (any scheme with `affine_view`) into the triton.affine.v1 layout, once."""
    view = qw.scheme.affine_view(qw)
    if view is None:
        raise KernelError(f"{where(qw.name)}{qw.scheme.name}: no integer affine form "
                          f"(affine_view returned None); the triton.affine kernels cannot run it")
    bits = int(view.bits)
    if bits not in SUPPORTED_BITS:
        raise KernelError(f"{where(qw.name)}{qw.scheme.name}: {bits}-bit codes are not supported by "
                          f"triton.affine (bits must be one of {SUPPORTED_BITS})")
    codes = view.codes.to(torch.int64)
    n, k = codes.shape
    off = (1 << (bits - 1)) if view.signed else 0
    u = codes + off
    if u.numel() and (u.min() < 0 or u.max() >= (1 << bits)):
        raise KernelError(f"{where(qw.name)}{qw.scheme.name}: codes outside the {bits}-bit "
                          f"{'signed' if view.signed else 'unsigned'} range")
    g = int(view.group_size) if view.group_size and view.group_size > 0 else k
    scales = view.scales.float().reshape(n, -1)
    ng = scales.shape[1]

    # act-order: sort K by group once so groups are contiguous again; x is gathered instead
    perm = g_idx = None
    if view.g_idx is not None:
        gi = view.g_idx.to(torch.int64).reshape(-1)
        regular = torch.arange(k, dtype=torch.int64) // g
        if not torch.equal(gi.cpu(), regular):
            order = torch.argsort(gi.cpu(), stable=True)
            if torch.equal(gi.cpu()[order], regular):
                perm = order
                u = u[:, order.to(u.device)]
            else:
                g_idx = gi
                if gi.min() < 0 or gi.max() >= ng:
                    raise KernelError(f"{where(qw.name)}g_idx holds groups outside [0, {ng})")

    # zero points: integers when offsets are -z*s (GPTQ, AWQ), else float offsets
    zmode, zc, zeros, zero_max = 0, off, None, 0
    if view.offsets is not None:
        o = view.offsets.float().reshape(n, ng)
        safe = torch.where(scales != 0, scales, torch.ones_like(scales))
        zr = torch.round(off - o / safe)
        exact = ((off - zr) * scales - o).abs() <= 1e-6 * scales.abs() + 1e-30
        exact &= (scales != 0) | (o == 0)
        if bool(exact.all()) and (zr.numel() == 0 or (zr.min() >= 0 and zr.max() <= 255)):
            if zr.numel() and bool((zr == zr.flatten()[0]).all()):
                zc = int(zr.flatten()[0])
            else:
                zmode, zeros = 1, zr.to(torch.uint8).t().contiguous()
                zero_max = int(zr.max())
        else:
            zmode, zeros = 2, _narrowest_exact((o - off * scales).t().contiguous())

    qweight = pack_slot_major(u, bits)
    dev = torch.device(device)
    return AffinePrepared(
        qweight=qweight.contiguous().to(dev),
        scales=_narrowest_exact(scales.t().contiguous()).to(dev),
        zeros=None if zeros is None else zeros.to(dev),
        perm=None if perm is None else perm.to(torch.int32).to(dev),
        g_idx=None if g_idx is None else g_idx.to(torch.int32).to(dev),
        n=n, k=k, bits=bits, group_size=g, zmode=zmode, zc=zc, zero_max=zero_max,
        act_int8=bool(getattr(qw.scheme, "activation_quantized", False)), name=qw.name)


LAYOUT = Layout(LAYOUT_NAME, prepare_affine)


def pack_slot_major(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> int32 [N, ceil(K/PB) * 16], K padded with zero codes.

    Within each block of PB = 16 * (32/bits) input features, word r holds k = i*16 + r in value
    slot i. Unpacking slot i of a [BN, 16] word tile then gives a [BN, 16] tile of CONSECUTIVE k:
    the kernels shift and mask in place and dot each slot with a contiguous slice of x, with no
    interleaving (no reshape, no layout shuffles)."""
    per = 32 // bits
    pb = WORDS_PER_BLOCK * per
    n, k = u.shape
    kp = -(-max(k, 1) // pb) * pb
    if kp != k:
        u = torch.nn.functional.pad(u, (0, kp - k))
    u = u.reshape(n, kp // pb, per, WORDS_PER_BLOCK).transpose(2, 3)     # [N, blocks, r, slot]
    shifts = torch.arange(per, dtype=torch.int64, device=u.device) * bits
    word = (u.to(torch.int64) << shifts).sum(-1).reshape(n, -1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


def unpack_slot_major(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_slot_major: int32 words -> int64 codes [N, K]."""
    per = 32 // bits
    n = qweight.shape[0]
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(n, -1, WORDS_PER_BLOCK)                                  # [N, blocks, r]
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    u = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)                    # [N, blocks, r, slot]
    return u.transpose(2, 3).reshape(n, -1)[:, :k]


def dequantize_prepared(p: AffinePrepared) -> torch.Tensor:
    """float32 [N, K] weight the layout holds, in the original K order (tests, fallbacks)."""
    u = unpack_slot_major(p.qweight, p.bits, p.k).float()
    w = p.qweight
    if p.g_idx is not None:
        gi = p.g_idx.long()
    else:
        gi = torch.arange(p.k, device=w.device) // p.group_size
    s = p.scales.float().t()[:, gi]
    if p.zmode == 0:
        wf = (u - p.zc) * s
    elif p.zmode == 1:
        wf = (u - p.zeros.float().t()[:, gi]) * s
    else:
        wf = u * s + p.zeros.float().t()[:, gi]
    if p.perm is not None:
        out = torch.empty_like(wf)
        out[:, p.perm.long()] = wf
        wf = out
    return wf


def _lop3_slots_ptx(magic: int, one: int, fma: str) -> str:
    """PTX of _lop3_slots: a 32-bit word of 4-bit codes -> 8 halves (u - z). Per nibble pair one
    lop3 puts u under `magic`'s exponent (magic + u, exactly), one packed fma by `one` adds
    $9 = -(magic + z) twice; outputs $0..$3 are the low halves of the four pairs, $4..$7 the high."""
    lines = ["{", ".reg .b32 s, t0, t1, t2, t3, one;", f"mov.b32 one, 0x{one:04X}{one:04X};",
             f"lop3.b32 t0, $8, 0x000f000f, 0x{magic:04x}{magic:04x}, 0xea;"]
    for i in (1, 2, 3):
        lines += [f"shr.u32 s, $8, {4 * i};", f"lop3.b32 t{i}, s, 0x000f000f, 0x{magic:04x}{magic:04x}, 0xea;"]
    lines += [f"{fma} t{i}, t{i}, one, $9;" for i in range(4)]
    lines += [f"mov.b32 {{${i}, ${i + 4}}}, t{i};" for i in range(4)]
    return "\n".join(lines + ["}"])


# --------------------------------------------------------------------------------------------
# Split-K bookkeeping shared by every split-K kernel of omniq's Triton backends
# --------------------------------------------------------------------------------------------
if triton is not None:
    # bf16: 0x4300 is 128 (u sits in the mantissa's low bits); fp16: 0x6400 is 1024
    _LOP3_SLOTS_BF16 = tl.constexpr(_lop3_slots_ptx(0x4300, 0x3F80, "fma.rn.bf16x2"))
    _LOP3_SLOTS_F16 = tl.constexpr(_lop3_slots_ptx(0x6400, 0x3C00, "fma.rn.f16x2"))

    @triton.jit
    def _tile_epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                       tile, n_tiles, pid_k,
                       SPLIT_K, USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """Write acc[n, m] (+ bias) to y[m, n]; with split-K, each CTA parks its partial and the
        last one to arrive sums all partials in split order (deterministic) and writes y."""
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        if not USE_SPLIT:
            if HAS_BIAS:
                b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
                acc = acc + b[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
            tl.store(ws_ptr + (pid_k * n_tiles + tile) * (BLOCK_N * BLOCK_M) + local, acc)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s in range(SPLIT_K):
                    total += tl.load(ws_ptr + (s * n_tiles + tile) * (BLOCK_N * BLOCK_M) + local,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
                    total = total + b[:, None]
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _grouped_tile(pid, N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr):
        """(pid_n, pid_m) of output tile `pid` in grouped order: GROUP_N weight tiles are visited
        for one x tile before the next, so concurrent CTAs share x tiles in L2."""
        grid_n = tl.cdiv(N, BLOCK_N)
        grid_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_N * grid_m
        first_n = (pid // width) * GROUP_N
        gsize = tl.minimum(grid_n - first_n, GROUP_N)
        return first_n + (pid % width) % gsize, (pid % width) // gsize

    @triton.jit
    def _codes_as_float(u):
        """Integer codes 0..2^23 to fp32 exactly, without an int->float conversion."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _lop3_slots(words, neg, BF16: tl.constexpr):
        """4-bit words [BN, 16] -> the 8 value slots (u - z) as bf16/fp16 [BN, 16] tiles through
        PTX lop3 + one fma per pair (no conversion instructions). `neg` holds -(magic + z) twice
        (bf16x2 / f16x2 bits). NVIDIA only."""
        if BF16:
            return tl.inline_asm_elementwise(asm=_LOP3_SLOTS_BF16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r",
                                             args=[words, neg], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(asm=_LOP3_SLOTS_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r",
                                             args=[words, neg], dtype=(tl.float16,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _group_terms(s_ptr, z_ptr, grp, rn, N, ZMODE: tl.constexpr):
        """Scale and zero point (or float offset) of one group for the rows rn, fp32 [BN]."""
        s = tl.load(s_ptr + grp * N + rn).to(tl.float32)
        if ZMODE == 0:
            z = s * 0.0
        else:
            z = tl.load(z_ptr + grp * N + rn).to(tl.float32)
        return s, z

    @triton.jit
    def _slot(acc, part, xsum, w, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn, kbase,
              K, N, G, stride_xm,
              ZMODE: tl.constexpr, ZC: tl.constexpr, SCALE_AT: tl.constexpr, HAS_PERM: tl.constexpr,
              HAS_GIDX: tl.constexpr, XQ: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
        """One value slot: weights w [BN, 16] (k = kbase .. kbase+15) times x[rm, those k]
        (x may be int8 codes, XQ: they convert exactly to the fp16 dot dtype).

        w holds u - z exactly (integer zero points) or u (float offsets), except SCALE_AT == 0,
        where w is the raw code and the scale is gathered per element here.
        SCALE_AT: 0 = per element, 1 = per slot, 2 = per block: the dot accumulates into `part`
        in its own layout and the caller scales it once per block."""
        kk = kbase + tl.arange(0, 16)
        ok = kk < K
        if HAS_PERM:
            kx = tl.load(perm_ptr + kk, mask=ok, other=0)
        else:
            kx = kk
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + kx[:, None], mask=ok[:, None], other=0.0)
        if SCALE_AT == 0:
            if HAS_GIDX:
                grp = tl.load(gidx_ptr + kk, mask=ok, other=0)
            else:
                grp = tl.minimum(kk, K - 1) // G
            gp = grp[None, :] * N + rn[:, None]
            sc = tl.load(s_ptr + gp).to(tl.float32)
            if ZMODE == 0:
                ws = (w - ZC) * sc
            elif ZMODE == 1:
                ws = (w - tl.load(z_ptr + gp).to(tl.float32)) * sc
            else:
                ws = w * sc + tl.load(z_ptr + gp).to(tl.float32)
            acc = tl.dot(ws.to(DOT_DTYPE), xt.to(DOT_DTYPE), acc, input_precision="ieee" if IEEE else None)
        elif SCALE_AT == 1:
            p = tl.dot(w.to(DOT_DTYPE), xt.to(DOT_DTYPE), input_precision="ieee" if IEEE else None)
            s, z = _group_terms(s_ptr, z_ptr, tl.minimum(kbase, K - 1) // G, rn, N, ZMODE)
            if ZMODE == 2:
                acc = acc + p * s[:, None] + z[:, None] * tl.sum(xt.to(tl.float32), axis=0)[None, :]
            else:
                acc = acc + p * s[:, None]
        else:
            part = tl.dot(w.to(DOT_DTYPE), xt.to(DOT_DTYPE), part, input_precision="ieee" if IEEE else None)
            if ZMODE == 2:
                xsum += tl.sum(xt.to(tl.float32), axis=0)
        return acc, part, xsum

    @triton.jit
    def _affine_dot_kernel(
            x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, gidx_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, xs_ptr,
            M, N, K, KW, G, stride_xm, stride_ym, SPLIT_K,
            BITS: tl.constexpr, ZMODE: tl.constexpr, ZC: tl.constexpr, SCALE_AT: tl.constexpr,
            HAS_PERM: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
            DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, XQ: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, USE_SPLIT: tl.constexpr, GROUP_N: tl.constexpr):
        """acc[n, m] = sum_k W[n, k] x[m, k] over 16-word K blocks, one tensor-core dot per value slot."""
        PER: tl.constexpr = 32 // BITS
        PB: tl.constexpr = 16 * PER
        pid_n, pid_m = _grouped_tile(tl.program_id(0), N, M, BLOCK_N, BLOCK_M, GROUP_N)
        pid_k = tl.program_id(1)
        grid_n = tl.cdiv(N, BLOCK_N)
        grid_m = tl.cdiv(M, BLOCK_M)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)  # clamped rows: loads need no N/M masks
        rm = tl.minimum(offs_m, M - 1)

        n_blocks = KW // 16
        per_split = tl.cdiv(n_blocks, SPLIT_K)
        b0 = pid_k * per_split
        b1 = tl.minimum(b0 + per_split, n_blocks)

        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for b in range(b0, b1):
            words = tl.load(qw_ptr + rn[:, None] * KW + (b * 16 + tl.arange(0, 16))[None, :])
            k0 = b * PB
            part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            # the block's zero point, subtracted from the codes before the dot (exact)
            if ZMODE == 1 and SCALE_AT != 0:
                zrow = tl.load(z_ptr + (tl.minimum(k0, K - 1) // G) * N + rn).to(tl.float32)
            else:
                zrow = tl.zeros([BLOCK_N], dtype=tl.float32)
            if ASM != 0:
                if ZMODE == 0:
                    zf = zrow + ZC
                else:
                    zf = zrow
                if ASM == 1:
                    nb = (-(128.0 + zf)).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                else:
                    nb = (-(1024.0 + zf)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                neg = tl.broadcast_to((nb | (nb << 16))[:, None], (BLOCK_N, 16))
                o0, o1, o2, o3, o4, o5, o6, o7 = _lop3_slots(words, neg, ASM == 1)
                acc, part, xsum = _slot(acc, part, xsum, o0, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX, XQ,
                                        DOT_DTYPE, IEEE)
                acc, part, xsum = _slot(acc, part, xsum, o1, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0 + 16, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX,
                                        XQ, DOT_DTYPE, IEEE)
                acc, part, xsum = _slot(acc, part, xsum, o2, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0 + 32, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX,
                                        XQ, DOT_DTYPE, IEEE)
                acc, part, xsum = _slot(acc, part, xsum, o3, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0 + 48, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX,
                                        XQ, DOT_DTYPE, IEEE)
                acc, part, xsum = _slot(acc, part, xsum, o4, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0 + 64, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX,
                                        XQ, DOT_DTYPE, IEEE)
                acc, part, xsum = _slot(acc, part, xsum, o5, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0 + 80, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX,
                                        XQ, DOT_DTYPE, IEEE)
                acc, part, xsum = _slot(acc, part, xsum, o6, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0 + 96, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX,
                                        XQ, DOT_DTYPE, IEEE)
                acc, part, xsum = _slot(acc, part, xsum, o7, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                        k0 + 112, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM, HAS_GIDX,
                                        XQ, DOT_DTYPE, IEEE)
            else:
                for i in tl.static_range(PER):
                    u = (words >> (i * BITS)) & ((1 << BITS) - 1)
                    if SCALE_AT == 1 and ZMODE == 1:   # groups change per slot
                        zrow = tl.load(z_ptr + (tl.minimum(k0 + i * 16, K - 1) // G) * N + rn).to(tl.float32)
                    if SCALE_AT == 0 or ZMODE == 2:
                        w = _codes_as_float(u)
                    elif ZMODE == 0:
                        w = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZC)
                    else:
                        w = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zrow)[:, None]
                    acc, part, xsum = _slot(acc, part, xsum, w, x_ptr, perm_ptr, gidx_ptr, s_ptr, z_ptr, rm, rn,
                                            k0 + i * 16, K, N, G, stride_xm, ZMODE, ZC, SCALE_AT, HAS_PERM,
                                            HAS_GIDX, XQ, DOT_DTYPE, IEEE)
            if SCALE_AT == 2:
                s, z = _group_terms(s_ptr, z_ptr, k0 // G, rn, N, ZMODE)
                if ZMODE == 2:
                    acc = acc + part * s[:, None] + z[:, None] * xsum[None, :]
                else:
                    acc = acc + part * s[:, None]

        if XQ:
            acc = acc * tl.load(xs_ptr + rm)[None, :]
        _tile_epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                       pid_n * grid_m + pid_m, grid_n * grid_m, pid_k, SPLIT_K, USE_SPLIT, HAS_BIAS,
                       BLOCK_N, BLOCK_M)

    @triton.jit
    def _affine_gemv_kernel(
            x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, gidx_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
            M, N, K, KW, G, stride_xm, stride_ym, SPLIT_K,
            BITS: tl.constexpr, ZMODE: tl.constexpr, ZC: tl.constexpr, SCALE_AT: tl.constexpr,
            HAS_PERM: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, USE_SPLIT: tl.constexpr):
        """acc[n, m] = sum_k W[n, k] x[m, k] with fp32 FMAs (no tensor cores), one x row at a
        time: for M of a few rows, where a tensor-core tile would be mostly padding."""
        PER: tl.constexpr = 32 // BITS
        PB: tl.constexpr = 16 * PER
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)
        cols = tl.arange(0, BLOCK_M)
        n_blocks = KW // 16
        per_split = tl.cdiv(n_blocks, SPLIT_K)
        b0 = pid_k * per_split
        b1 = tl.minimum(b0 + per_split, n_blocks)

        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for b in range(b0, b1):
            words = tl.load(qw_ptr + rn[:, None] * KW + (b * 16 + tl.arange(0, 16))[None, :])
            k0 = b * PB
            for i in tl.static_range(PER):
                u = _codes_as_float((words >> (i * BITS)) & ((1 << BITS) - 1))      # [BN, 16]
                kk = k0 + i * 16 + tl.arange(0, 16)
                ok = kk < K
                if HAS_PERM:
                    kx = tl.load(perm_ptr + kk, mask=ok, other=0)
                else:
                    kx = kk
                if SCALE_AT == 0:
                    if HAS_GIDX:
                        grp = tl.load(gidx_ptr + kk, mask=ok, other=0)
                    else:
                        grp = tl.minimum(kk, K - 1) // G
                    gp = grp[None, :] * N + rn[:, None]
                    sc = tl.load(s_ptr + gp).to(tl.float32)
                    if ZMODE == 0:
                        u = (u - ZC) * sc
                    elif ZMODE == 1:
                        u = (u - tl.load(z_ptr + gp).to(tl.float32)) * sc
                    else:
                        u = u * sc + tl.load(z_ptr + gp).to(tl.float32)
                else:
                    s, z = _group_terms(s_ptr, z_ptr, tl.minimum(k0 + i * 16, K - 1) // G, rn, N, ZMODE)
                for m in tl.static_range(BLOCK_M):
                    xm = tl.load(x_ptr + tl.minimum(m, M - 1) * stride_xm + kx, mask=ok, other=0.0).to(tl.float32)
                    p = tl.sum(u * xm[None, :], axis=1)                                # [BN]
                    if SCALE_AT != 0:
                        xs = tl.sum(xm, axis=0)
                        if ZMODE == 0:
                            p = (p - ZC * xs) * s
                        elif ZMODE == 1:
                            p = (p - z * xs) * s
                        else:
                            p = p * s + z * xs
                    acc += tl.where(cols[None, :] == m, p[:, None], 0.0)

        _tile_epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                       pid_n, tl.cdiv(N, BLOCK_N), pid_k, SPLIT_K, USE_SPLIT, HAS_BIAS, BLOCK_N, BLOCK_M)

    @triton.jit
    def _affine_dequant_kernel(qw_ptr, s_ptr, z_ptr, gidx_ptr, w_ptr, N, K, KW, G,
                               BITS: tl.constexpr, ZMODE: tl.constexpr, ZC: tl.constexpr,
                               SCALE_AT: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCKS: tl.constexpr):
        """W[n, k] in w_ptr's dtype (K order of the layout, i.e. act-order sorted) for a tile
        of BLOCK_N rows and BLOCKS K blocks: a bandwidth-bound pass before a cuBLAS GEMM."""
        PER: tl.constexpr = 32 // BITS
        PB: tl.constexpr = 16 * PER
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nok = rn < N
        rnc = tl.minimum(rn, N - 1)
        for bb in tl.static_range(BLOCKS):
            b = tl.program_id(1) * BLOCKS + bb
            if b < KW // 16:
                words = tl.load(qw_ptr + rnc[:, None] * KW + (b * 16 + tl.arange(0, 16))[None, :])
                # the whole block at once, [BN, slot, word] = K order (k = 16 slot + word), so
                # each row is stored as one contiguous run of PB values (wide stores)
                sh = tl.arange(0, PER) * BITS
                codes = (words[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)
                u = _codes_as_float(tl.reshape(codes, (BLOCK_N, PB)))
                kk = b * PB + tl.arange(0, PB)
                ok = kk < K
                if SCALE_AT == 2:      # one group for the block
                    s, z = _group_terms(s_ptr, z_ptr, tl.minimum(b * PB, K - 1) // G, rnc, N, ZMODE)
                    sc = s[:, None]
                    zz = z[:, None]
                elif SCALE_AT == 1:    # one group per 16-wide slot
                    gp = (tl.minimum(b * PB + tl.arange(0, PER) * 16, K - 1) // G)[None, :] * N + rnc[:, None]
                    sc = _per_slot(tl.load(s_ptr + gp).to(tl.float32), BLOCK_N, PER, PB)
                    zz = sc * 0.0
                    if ZMODE != 0:
                        zz = _per_slot(tl.load(z_ptr + gp).to(tl.float32), BLOCK_N, PER, PB)
                else:                  # per element (g_idx, or groups off the 16-wide slots)
                    if HAS_GIDX:
                        grp = tl.load(gidx_ptr + kk, mask=ok, other=0)
                    else:
                        grp = tl.minimum(kk, K - 1) // G
                    gp = grp[None, :] * N + rnc[:, None]
                    sc = tl.load(s_ptr + gp).to(tl.float32)
                    zz = sc * 0.0
                    if ZMODE != 0:
                        zz = tl.load(z_ptr + gp).to(tl.float32)
                if ZMODE == 0:
                    w = (u - ZC) * sc
                elif ZMODE == 1:
                    w = (u - zz) * sc
                else:
                    w = u * sc + zz
                tl.store(w_ptr + rn[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty),
                         mask=nok[:, None] & ok[None, :])

    @triton.jit
    def _per_slot(v, BLOCK_N: tl.constexpr, PER: tl.constexpr, PB: tl.constexpr):
        """[BN, PER] per-slot values spread over the 16 K of each slot: [BN, PB] in K order."""
        return tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_N, PER, 16)), (BLOCK_N, PB))


# --------------------------------------------------------------------------------------------
# Configurations: defaults per kernel and M bucket, plus measured bests per shape (H200).
# Keys of TUNED: (kernel, N, K, M bucket) -> overrides of the default config.
# --------------------------------------------------------------------------------------------
DEFAULTS = {
    # H200 sweep (benchmarks/probe_int.py): BLOCK_N 128 / 4 warps won every shape at M <= 16
    "gemv": {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "waves": 4.0},
    "splitk": {"BLOCK_N": 128, "BLOCK_M": 16, "num_warps": 4, "num_stages": 3, "GROUP_N": 1, "waves": 2.0,
               "ASM": True},
    "gemm": {"BLOCK_N": 128, "BLOCK_M": 128, "num_warps": 8, "num_stages": 3, "GROUP_N": 8, "SPLIT_K": 1},
    "dequant": {"BLOCK_N": 32, "BLOCKS": 4, "num_warps": 4},   # probe_dequant.txt (h200-2026-11-29c)
}
# M bucket refinements of the defaults (applied before TUNED)
BY_M = {
    ("gemm", 32): {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4},
    ("gemm", 64): {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4},
    ("gemm", 128): {"BLOCK_M": 64, "BLOCK_N": 128},
    ("splitk", 32): {"BLOCK_M": 32},
    ("splitk", 64): {"BLOCK_M": 64},
}
TUNED: dict = {
    # best of benchmarks/probe_int.py on an H200 (gptq 4-bit g128 sym, bf16 x; CUDA-graph replay
    # medians, weights rotated past L2); the 8192 x 8192 rows are from the current kernel, the
    # others from the previous revision of the same kernel (same knobs)
    ('gemm', 3072, 12288, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "GROUP_N": 8, "SPLIT_K": 1},  # 327.3 us
    ('gemm', 3072, 12288, 512): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "GROUP_N": 8, "SPLIT_K": 1},  # 418.0 us
    ('gemm', 3072, 12288, 2048): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "GROUP_N": 8, "SPLIT_K": 1},  # 1236.0 us
    ('gemm', 8192, 8192, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 8, "num_stages": 3, "ASM": False, "GROUP_N": 8, "SPLIT_K": 1},  # 85.1 us
    ('gemm', 8192, 8192, 512): {"BLOCK_N": 128, "BLOCK_M": 128, "num_warps": 8, "num_stages": 3, "ASM": False, "GROUP_N": 8, "SPLIT_K": 1},  # 237.0 us
    ('gemm', 12288, 3072, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "GROUP_N": 8, "SPLIT_K": 1},  # 84.1 us
    ('gemm', 12288, 3072, 512): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "GROUP_N": 8, "SPLIT_K": 1},  # 321.2 us
    ('gemm', 12288, 3072, 2048): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "GROUP_N": 8, "SPLIT_K": 1},  # 1222.2 us
    ('gemv', 3072, 12288, 1): {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "waves": 4},  # 22.1 us
    ('gemv', 8192, 8192, 1): {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "waves": 4},  # 34.1 us
    ('gemv', 12288, 3072, 1): {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "waves": 4},  # 23.9 us
    ('splitk', 3072, 12288, 1): {"BLOCK_N": 128, "BLOCK_M": 16, "num_warps": 4, "num_stages": 3, "ASM": True, "waves": 2, "GROUP_N": 1},  # 20.4 us
    ('splitk', 3072, 12288, 16): {"BLOCK_N": 128, "BLOCK_M": 16, "num_warps": 4, "num_stages": 3, "ASM": True, "waves": 2, "GROUP_N": 1},  # 20.8 us
    ('splitk', 3072, 12288, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "waves": 2, "GROUP_N": 1},  # 55.5 us
    ('splitk', 8192, 8192, 1): {"BLOCK_N": 64, "BLOCK_M": 16, "num_warps": 4, "num_stages": 4, "ASM": True, "waves": 4, "GROUP_N": 1},  # 31.2 us
    ('splitk', 8192, 8192, 16): {"BLOCK_N": 64, "BLOCK_M": 16, "num_warps": 4, "num_stages": 4, "ASM": True, "waves": 4, "GROUP_N": 1},  # 31.3 us
    ('splitk', 8192, 8192, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": True, "waves": 2, "GROUP_N": 1},  # 44.3 us
    ('splitk', 12288, 3072, 1): {"BLOCK_N": 128, "BLOCK_M": 16, "num_warps": 4, "num_stages": 3, "ASM": True, "waves": 2, "GROUP_N": 1},  # 23.0 us
    ('splitk', 12288, 3072, 16): {"BLOCK_N": 128, "BLOCK_M": 16, "num_warps": 4, "num_stages": 3, "ASM": True, "waves": 2, "GROUP_N": 1},  # 23.7 us
    # re-swept 2026-11-29 (h200-2026-11-29d/probe_int_m64.txt): 32.3 us against 38.4 us with ASM / 2 waves
    ('splitk', 12288, 3072, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "ASM": False, "waves": 1, "GROUP_N": 1},  # 32.3 us
}

GEMV_MAX_M = 4
SPLITK_MAX_M = 64
DEQUANT_MM_MIN_M = 65
# a dequantized copy bigger than this is made in N chunks (transient memory of dequant_mm)
DEQUANT_CHUNK_BYTES = 256 << 20


def config_for(kind: str, m: int, n: int, k: int, device: torch.device | None = None) -> dict:
    return layered_config(DEFAULTS, BY_M, TUNED, kind, m, (kind, n, k))


def scale_at(p: AffinePrepared) -> int:
    """Where group scales apply: 0 per element (irregular g_idx, or groups not multiples of 16),
    1 per 16-wide slot (groups smaller than a K block), 2 once per K block."""
    pb = WORDS_PER_BLOCK * (32 // p.bits)
    if p.g_idx is not None:
        return 0
    if p.group_size >= p.k or p.group_size % pb == 0:
        return 2
    if p.group_size % 16 == 0:
        return 1
    return 0


def _common_args(x, p: AffinePrepared, bias, y):
    dummy = p.scales
    return (x, p.qweight, p.scales, p.zeros if p.zeros is not None else dummy,
            p.perm if p.perm is not None else dummy, p.g_idx if p.g_idx is not None else dummy,
            bias if bias is not None else dummy, y)


def run_dot(x: torch.Tensor, p: AffinePrepared, bias: torch.Tensor | None, kind: str = "gemm",
            cfg: dict | None = None, act_int8: bool = False) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T (+ bias) with the tensor-core kernel ("splitk" or "gemm" configs).

    act_int8: quantize x per token to int8 first (msModelSlim W4A8 dynamic: s = amax/127,
    x_q = rint(x / s)); the integer products are then summed exactly."""
    m = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = dict(cfg or config_for(kind, m, p.n, p.k, x.device))
    at = scale_at(p)
    xs = None
    out_dtype = x.dtype
    if act_int8:
        if at == 0 or p.bits > 4:
            raise KernelError(f"{where(p.name)}int8 activations need <= 4-bit codes and groups that are "
                              f"multiples of 16 (group_size={p.group_size}, bits={p.bits})")
        from omniq.kernels.triton_w8a8 import ACT_TOKEN_DIV, quantize_activation
        x, xs, _ = quantize_activation(x, ACT_TOKEN_DIV, fp8=False)
    n_blocks = p.qweight.shape[1] // WORDS_PER_BLOCK
    bn, bm, tiles, split = launch_grid(cfg, p.n, m, n_blocks, x.device)
    # int8 activations times 4-bit codes: fp16 operands hold both exactly, and each 128-wide
    # block's fp32 sum (|sum| < 2^18) is exact too; 8-bit tensor-core dots would need K >= 32
    dot_dtype, ieee = (tl.float16, False) if act_int8 else float_dot_dtype(x.dtype)
    # lop3 folds one zero point per K block into its fma: integer zeros, constant within a block
    use_asm = bool(cfg.get("ASM", False)) and (at == 2 or (at == 1 and p.zmode == 0)) and p.zmode != 2 \
        and p.bits == 4 and not ieee and not act_int8 \
        and x.device.type == "cuda" and torch.version.hip is None and not interpreting()
    asm = (1 if x.dtype == torch.bfloat16 else 2) if use_asm else 0
    y = torch.empty(m, p.n, dtype=out_dtype, device=x.device)
    ws, cnt = split_workspace(split, tiles, bn, bm, x.device, tile_counters)
    _affine_dot_kernel[(tiles, split)](
        *_common_args(x, p, bias, y), ws, cnt, xs if xs is not None else ws,
        m, p.n, p.k, p.qweight.shape[1], p.group_size, x.stride(0), y.stride(0), split,
        BITS=p.bits, ZMODE=p.zmode, ZC=p.zc, SCALE_AT=at,
        HAS_PERM=p.perm is not None, HAS_GIDX=p.g_idx is not None, HAS_BIAS=bias is not None,
        DOT_DTYPE=dot_dtype, IEEE=ieee, ASM=asm, XQ=act_int8,
        BLOCK_N=bn, BLOCK_M=bm, USE_SPLIT=split > 1, GROUP_N=cfg.get("GROUP_N", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def run_gemv(x: torch.Tensor, p: AffinePrepared, bias: torch.Tensor | None,
             cfg: dict | None = None) -> torch.Tensor:
    """y[M, N] for M <= GEMV_MAX_M with the FMA kernel."""
    m = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = dict(cfg or config_for("gemv", m, p.n, p.k, x.device))
    bn = max(1, min(cfg["BLOCK_N"], next_pow2(p.n)))
    bm = next_pow2(m)
    grid_n = -(-p.n // bn)
    n_blocks = p.qweight.shape[1] // WORDS_PER_BLOCK
    split = pick_split(cfg, grid_n, n_blocks, x.device, waves=4.0)
    y = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    ws, cnt = split_workspace(split, grid_n, bn, bm, x.device, tile_counters)
    _affine_gemv_kernel[(grid_n, split)](
        *_common_args(x, p, bias, y), ws, cnt,
        m, p.n, p.k, p.qweight.shape[1], p.group_size, x.stride(0), y.stride(0), split,
        BITS=p.bits, ZMODE=p.zmode, ZC=p.zc, SCALE_AT=scale_at(p),
        HAS_PERM=p.perm is not None, HAS_GIDX=p.g_idx is not None, HAS_BIAS=bias is not None,
        BLOCK_N=bn, BLOCK_M=bm, USE_SPLIT=split > 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def dequantize_rows(p: AffinePrepared, n0: int, n1: int, dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """Rows n0:n1 of W as `dtype` [n1 - n0, K], in the layout's K order (act-order sorted)."""
    cfg = dict(cfg or DEFAULTS["dequant"])
    rows = n1 - n0
    w = torch.empty(rows, p.k, dtype=dtype, device=p.qweight.device)
    kw = p.qweight.shape[1]
    n_blocks = kw // WORDS_PER_BLOCK
    bn = max(1, min(cfg["BLOCK_N"], next_pow2(rows)))
    blocks = cfg["BLOCKS"]
    s = p.scales[:, n0:n1]
    z = p.zeros[:, n0:n1] if p.zeros is not None else s
    if n0 or n1 != p.n:
        s, z = s.contiguous(), z.contiguous()
    _affine_dequant_kernel[(-(-rows // bn), -(-n_blocks // blocks))](
        p.qweight[n0:n1], s, z, p.g_idx if p.g_idx is not None else s, w, rows, p.k, kw, p.group_size,
        BITS=p.bits, ZMODE=p.zmode, ZC=p.zc, SCALE_AT=scale_at(p), HAS_GIDX=p.g_idx is not None,
        BLOCK_N=bn, BLOCKS=blocks, num_warps=cfg["num_warps"])
    return w


def run_dequant_mm(x: torch.Tensor, p: AffinePrepared, bias: torch.Tensor | None,
                   cfg: dict | None = None) -> torch.Tensor:
    """Large M: dequantize W (transiently, in N chunks of at most DEQUANT_CHUNK_BYTES) and let
    the vendor BLAS multiply. Compute-bound shapes then run at BLAS speed plus one pass over W."""
    if p.perm is not None:
        x = x.index_select(1, p.perm)
    dt = x.dtype
    rows = max(1, DEQUANT_CHUNK_BYTES // (p.k * x.element_size()))
    if rows >= p.n:
        w = dequantize_rows(p, 0, p.n, dt, cfg)
        y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias.to(dt), x, w.t())
        return y
    y = torch.empty(x.shape[0], p.n, dtype=dt, device=x.device)
    for n0 in range(0, p.n, rows):
        n1 = min(p.n, n0 + rows)
        w = dequantize_rows(p, n0, n1, dt, cfg)
        part = torch.mm(x, w.t())
        if bias is not None:
            part += bias[n0:n1].to(dt)
        y[:, n0:n1] = part
    return y
