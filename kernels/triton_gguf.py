"""GGUF (ggml) block-quantized weights in Triton, decoded from the raw block bytes in-kernel.

The layout is the checkpoint itself (`weight` uint8 [N, K/block * bytes_per_block], the blocks
of a row back to back, as in the GGUF file): nothing is repacked, the kernels read each block's
fields at their byte offsets (formats.md section 5, omniq.formats.gguf_blocks). f16 fields are
read through an int16 view of the same bytes (every block size is even).

All ten types run: q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k. A block is cut
into sub-tiles that share one scale (16 or 32 elements along K); each sub-tile is decoded to
(code - zero) * scale + offset in fp32 with gguf-py's op order, rounded once to the dot dtype,
and multiplied on tensor cores against the matching slice of x (swap-AB: the weight is the
MMA's A operand). Compiled for NVIDIA, 4-bit nibbles (q4_0, q4_1, q4_k) and the int8 codes of
q8_0 become bf16x2/fp16x2 pairs with PTX prmt/lop3 (exact: 0x4300 | q is 128 + q in bf16) and a
paired fma applies scale and offset.

Kernels: split-K for small M (the last CTA of each tile sums the partials), a tiled GEMM, and
for M >= 128 dequantize-then-matmul (the same block decoder writes a transient dense copy in
one pass, then torch's dense matmul), all over the same bytes.
"""
from __future__ import annotations

import torch

from omniq.errors import KernelError, where
from omniq.kernels._common import layered_config, tl, triton
from omniq.kernels.triton_mx import _launch_grid, _workspace, dot_dtype, nvidia_ptx

# ggml type ids (gguf.GGMLQuantizationType), the kernel's TYPE constant
TYPE_IDS = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
            "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14}
# elements and bytes per block
BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
         "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
# types with a PTX decode (4-bit nibbles and int8 codes)
PTX_TYPES = ("q8_0", "q4_0", "q4_1", "q4_k")

# PTX of the GGUF decoders, two bytes (consecutive K: one MMA register) per call.
# int8 codes:  $0 = q*a + c pair (output), $1 the two bytes (b16), $2 a pair, $3 c pair.
# nibbles:     $0 lo pair, $1 hi pair (outputs), $2 the two bytes, $3 alo, $4 clo, $5 ahi, $6 chi.
# tests/_fp_ptx_util.py executes these strings on every byte pair.
PTX_I8_BF16 = """{
.reg .b32 m7, ms, e, n1, t, r, s;
mov.b32 m7, 0x007F007F;
mov.b32 ms, 0x00800080;
mov.b32 e, 0x43004300;
mov.b32 n1, 0xBF80BF80;
cvt.u32.u16 t, $1;
prmt.b32 t, t, 0, 0x4140;
lop3.b32 r, t, m7, e, 0xEA;
lop3.b32 s, t, ms, e, 0xEA;
fma.rn.bf16x2 r, s, n1, r;
fma.rn.bf16x2 $0, r, $2, $3;
}"""
PTX_I8_F16 = """{
.reg .b32 m, e, t, r;
mov.b32 m, 0x00FF00FF;
mov.b32 e, 0x64806480;
cvt.u32.u16 t, $1;
prmt.b32 t, t, 0, 0x4140;
lop3.b32 r, t, m, e, 0x6A;
sub.rn.f16x2 r, r, e;
fma.rn.f16x2 $0, r, $2, $3;
}"""
PTX_U4_BF16 = """{
.reg .b32 m, e, k, one, t, u, r;
mov.b32 m, 0x000F000F;
mov.b32 e, 0x43004300;
mov.b32 k, 0xC300C300;
mov.b32 one, 0x3F803F80;
cvt.u32.u16 t, $2;
prmt.b32 t, t, 0, 0x4140;
lop3.b32 r, t, m, e, 0xEA;
fma.rn.bf16x2 r, r, one, k;
fma.rn.bf16x2 $0, r, $3, $4;
shr.b32 u, t, 4;
lop3.b32 r, u, m, e, 0xEA;
fma.rn.bf16x2 r, r, one, k;
fma.rn.bf16x2 $1, r, $5, $6;
}"""
PTX_U4_F16 = """{
.reg .b32 m, e, t, u, r;
mov.b32 m, 0x000F000F;
mov.b32 e, 0x64006400;
cvt.u32.u16 t, $2;
prmt.b32 t, t, 0, 0x4140;
lop3.b32 r, t, m, e, 0xEA;
sub.rn.f16x2 r, r, e;
fma.rn.f16x2 $0, r, $3, $4;
shr.b32 u, t, 4;
lop3.b32 r, u, m, e, 0xEA;
sub.rn.f16x2 r, r, e;
fma.rn.f16x2 $1, r, $5, $6;
}"""

if triton is not None:
    from omniq.kernels.triton_mx import _epilogue, _mma, _tile_ids
    _PTX_I8_BF16 = tl.constexpr(PTX_I8_BF16)
    _PTX_I8_F16 = tl.constexpr(PTX_I8_F16)
    _PTX_U4_BF16 = tl.constexpr(PTX_U4_BF16)
    _PTX_U4_F16 = tl.constexpr(PTX_U4_F16)

    @triton.jit
    def _f16(h_ptr, off):
        """The little-endian f16 field at even byte offsets `off` [BN], as fp32."""
        return tl.load(h_ptr + off // 2).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _u32(h_ptr, off):
        """The little-endian u32 field at even byte offsets `off` [BN] (two int16 loads)."""
        lo = tl.load(h_ptr + off // 2).to(tl.int32) & 0xFFFF
        hi = tl.load(h_ptr + off // 2 + 1).to(tl.int32) & 0xFFFF
        return lo | (hi << 16)

    @triton.jit
    def _byte(w_ptr, off):
        return tl.load(w_ptr + off).to(tl.int32)

    @triton.jit
    def _bytes(w_ptr, off, L: tl.constexpr):
        """uint8 [BN, L] at byte offsets off[:, None] + 0..L-1 (as int32)."""
        return tl.load(w_ptr + off[:, None] + tl.arange(0, L)[None, :]).to(tl.int32)

    @triton.jit
    def _raw(w_ptr, off, L: tl.constexpr):
        return tl.load(w_ptr + off[:, None] + tl.arange(0, L)[None, :])

    @triton.jit
    def _xt(x_ptr, rm, stride_xm, k0, L: tl.constexpr, DOT: tl.constexpr):
        """x[m, k0:k0+L] transposed: [L, BM] in the dot dtype."""
        return tl.load(x_ptr + rm[None, :] * stride_xm + (k0 + tl.arange(0, L))[:, None]).to(DOT)

    @triton.jit
    def _sub(acc, q, scale, offset, x_ptr, rm, stride_xm, k0, L: tl.constexpr,
             HAS_OFF: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
             out_ptr, ro, nr, ldo, STORE: tl.constexpr):
        """acc += ((q * scale + offset) rounded to DOT) @ x[:, k0:k0+L]^T; q int32 [BN, L] holds
        code - zero, scale / offset fp32 [BN] (gguf-py's op order: code*scale, then + offset).
        With STORE the values are written to out[ro, k0:k0+L] (rows ro < nr, row stride ldo)
        instead (the dequantize kernel) and acc is returned as is."""
        w = q.to(tl.float32) * scale[:, None]
        if HAS_OFF:
            w = w + offset[:, None]
        if STORE:
            tl.store(out_ptr + ro[:, None] * ldo + (k0 + tl.arange(0, L))[None, :],
                     w.to(out_ptr.dtype.element_ty), mask=(ro < nr)[:, None])
        else:
            acc = _mma(acc, w.to(DOT), _xt(x_ptr, rm, stride_xm, k0, L, DOT), UPCAST, IEEE)
        return acc

    @triton.jit
    def _i8_ptx(raw, a, c, BF16: tl.constexpr):
        """int8 codes (bytes) -> q * a + c as bf16x2/fp16x2 pairs, two bytes (consecutive K: one
        MMA register) per call. bf16: 128 + (q & 127) and 128 * (1 + sign) are built with lop3
        and subtracted exactly; fp16: 1024 + (q ^ 128) minus 1152."""
        if BF16:
            w = tl.inline_asm_elementwise(
                asm=_PTX_I8_BF16,
                constraints="=r,h,r,r",
                args=[raw, a, c], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            w = tl.inline_asm_elementwise(
                asm=_PTX_I8_F16,
                constraints="=r,h,r,r",
                args=[raw, a, c], dtype=tl.float16, is_pure=True, pack=2)
        return w

    @triton.jit
    def _u4_ptx(raw, alo, clo, ahi, chi, BF16: tl.constexpr):
        """Bytes [BN, L] of two nibbles -> (lo, hi) = (q_lo*alo + clo, q_hi*ahi + chi) as
        bf16x2/fp16x2 pairs, two bytes per call: 0x4300 | q is 128 + q in bf16 (0x6400 | q is
        1024 + q in fp16), one exact subtraction, one fma."""
        if BF16:
            lo, hi = tl.inline_asm_elementwise(
                asm=_PTX_U4_BF16,
                constraints="=r,=r,h,r,r,r,r",
                args=[raw, alo, clo, ahi, chi], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            lo, hi = tl.inline_asm_elementwise(
                asm=_PTX_U4_F16,
                constraints="=r,=r,h,r,r,r,r",
                args=[raw, alo, clo, ahi, chi], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
        return lo, hi

    @triton.jit
    def _nib_pair(acc, raw, alo, clo, ahi, chi, x_ptr, rm, stride_xm, k_lo, k_hi, L: tl.constexpr,
                  ASM: tl.constexpr, HAS_OFF: tl.constexpr, ZERO: tl.constexpr,
                  DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  out_ptr, ro, nr, ldo, STORE: tl.constexpr):
        """Bytes [BN, L]: low nibbles are elements k_lo.., high nibbles k_hi..; w = q*a + c."""
        if ASM != 0 and not STORE:
            lo, hi = _u4_ptx(raw, tl.broadcast_to(alo.to(DOT)[:, None], raw.shape),
                             tl.broadcast_to(clo.to(DOT)[:, None], raw.shape),
                             tl.broadcast_to(ahi.to(DOT)[:, None], raw.shape),
                             tl.broadcast_to(chi.to(DOT)[:, None], raw.shape), ASM == 1)
            acc = _mma(acc, lo, _xt(x_ptr, rm, stride_xm, k_lo, L, DOT), UPCAST, IEEE)
            acc = _mma(acc, hi, _xt(x_ptr, rm, stride_xm, k_hi, L, DOT), UPCAST, IEEE)
        else:
            b = raw.to(tl.int32)
            acc = _sub(acc, (b & 15) - ZERO, alo, clo, x_ptr, rm, stride_xm, k_lo, L, HAS_OFF, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
            acc = _sub(acc, (b >> 4) - ZERO, ahi, chi, x_ptr, rm, stride_xm, k_hi, L, HAS_OFF, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        return acc

    @triton.jit
    def _k4_scale_min(w_ptr, sb, J: tl.constexpr):
        """q4_k / q5_k 6-bit (scale, min) of sub-block J from the 12 scale bytes at sb (ggml's
        get_scale_min_k4)."""
        if J < 4:
            sc = _byte(w_ptr, sb + J) & 63
            mn = _byte(w_ptr, sb + J + 4) & 63
        else:
            sc = (_byte(w_ptr, sb + J + 4) & 15) | ((_byte(w_ptr, sb + J - 4) >> 6) << 4)
            mn = (_byte(w_ptr, sb + J + 4) >> 4) | ((_byte(w_ptr, sb + J) >> 6) << 4)
        return sc, mn

    @triton.jit
    def _gguf_block(acc, w_ptr, h_ptr, x_ptr, base, kb, rm, stride_xm,
                    TYPE: tl.constexpr, ASM: tl.constexpr, DOT: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr, out_ptr, ro, nr, ldo, STORE: tl.constexpr):
        """acc += one block (per row, at byte offsets base [BN]) times x[:, kb : kb+block]."""
        zoff = base.to(tl.float32) * 0.0   # fp32 zeros [BN] for offset-free sub-tiles
        if TYPE == 8:      # q8_0: d f16 @0, qs int8[32] @2
            d = _f16(h_ptr, base)
            raw = _raw(w_ptr, base + 2, 32)
            if ASM != 0:
                w = _i8_ptx(raw, tl.broadcast_to(d.to(DOT)[:, None], raw.shape),
                            tl.broadcast_to(zoff.to(DOT)[:, None], raw.shape), ASM == 1)
                acc = _mma(acc, w, _xt(x_ptr, rm, stride_xm, kb, 32, DOT), UPCAST, IEEE)
            else:
                q = raw.to(tl.int8, bitcast=True).to(tl.int32)
                acc = _sub(acc, q, d, zoff, x_ptr, rm, stride_xm, kb, 32, False, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        elif TYPE == 2 or TYPE == 3:    # q4_0 d*(q-8) / q4_1 d*q + m; qs[16] @2 / @4
            d = _f16(h_ptr, base)
            if TYPE == 2:
                raw = _raw(w_ptr, base + 2, 16)
                if ASM != 0:
                    c = d * -8.0
                else:
                    c = zoff
                acc = _nib_pair(acc, raw, d, c, d, c, x_ptr, rm, stride_xm, kb, kb + 16, 16,
                                ASM, False, 8, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
            else:
                m = _f16(h_ptr, base + 2)
                raw = _raw(w_ptr, base + 4, 16)
                acc = _nib_pair(acc, raw, d, m, d, m, x_ptr, rm, stride_xm, kb, kb + 16, 16,
                                ASM, True, 0, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        elif TYPE == 6 or TYPE == 7:    # q5_0 / q5_1: 5th bit j of the u32 qh
            d = _f16(h_ptr, base)
            if TYPE == 6:
                qh = _u32(h_ptr, base + 2)
                qs = _bytes(w_ptr, base + 6, 16)
                zero = 16
                m = zoff
            else:
                m = _f16(h_ptr, base + 2)
                qh = _u32(h_ptr, base + 4)
                qs = _bytes(w_ptr, base + 8, 16)
                zero = 0
            j = tl.arange(0, 16)
            lo = (qs & 15) | (((qh[:, None] >> j[None, :]) & 1) << 4)
            hi = (qs >> 4) | (((qh[:, None] >> (j[None, :] + 16)) & 1) << 4)
            acc = _sub(acc, lo - zero, d, m, x_ptr, rm, stride_xm, kb, 16, TYPE == 7, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
            acc = _sub(acc, hi - zero, d, m, x_ptr, rm, stride_xm, kb + 16, 16, TYPE == 7, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        elif TYPE == 10:   # q2_k: scales[16] @0, qs[64] @16, d @80, dmin @82
            d = _f16(h_ptr, base + 80)
            dmin = _f16(h_ptr, base + 82)
            for hh in tl.static_range(2):
                for hf in tl.static_range(2):
                    qb = _bytes(w_ptr, base + 16 + 32 * hh + 16 * hf, 16)
                    for sh in tl.static_range(4):
                        scb = _byte(w_ptr, base + 8 * hh + 2 * sh + hf)
                        scale = d * (scb & 15).to(tl.float32)
                        off = -(dmin * (scb >> 4).to(tl.float32))
                        acc = _sub(acc, (qb >> (2 * sh)) & 3, scale, off, x_ptr, rm, stride_xm,
                                   kb + 128 * hh + 32 * sh + 16 * hf, 16, True, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        elif TYPE == 11:   # q3_k: hmask[32] @0, qs[64] @32, scales[12] @96, d @108
            d = _f16(h_ptr, base + 108)
            for hh in tl.static_range(2):
                for hf in tl.static_range(2):
                    qb = _bytes(w_ptr, base + 32 + 32 * hh + 16 * hf, 16)
                    hm = _bytes(w_ptr, base + 16 * hf, 16)
                    for sh in tl.static_range(4):
                        i = 8 * hh + 2 * sh + hf
                        if i < 8:
                            low4 = _byte(w_ptr, base + 96 + i) & 15
                        else:
                            low4 = _byte(w_ptr, base + 96 + i - 8) >> 4
                        high2 = (_byte(w_ptr, base + 104 + i % 4) >> (2 * (i // 4))) & 3
                        scale = d * ((low4 | (high2 << 4)) - 32).to(tl.float32)
                        q = (((qb >> (2 * sh)) & 3) | (((hm >> (4 * hh + sh)) & 1) << 2)) - 4
                        acc = _sub(acc, q, scale, zoff, x_ptr, rm, stride_xm,
                                   kb + 128 * hh + 32 * sh + 16 * hf, 16, False, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        elif TYPE == 12 or TYPE == 13:   # q4_k / q5_k: d @0, dmin @2, scales[12] @4, (qh[32] @16), qs
            d = _f16(h_ptr, base)
            dmin = _f16(h_ptr, base + 2)
            if TYPE == 13:
                qh = _bytes(w_ptr, base + 16, 32)
            for c in tl.static_range(4):
                sc0, mn0 = _k4_scale_min(w_ptr, base + 4, 2 * c)
                sc1, mn1 = _k4_scale_min(w_ptr, base + 4, 2 * c + 1)
                a0 = d * sc0.to(tl.float32)
                c0 = -(dmin * mn0.to(tl.float32))
                a1 = d * sc1.to(tl.float32)
                c1 = -(dmin * mn1.to(tl.float32))
                if TYPE == 12:
                    raw = _raw(w_ptr, base + 16 + 32 * c, 32)
                    acc = _nib_pair(acc, raw, a0, c0, a1, c1, x_ptr, rm, stride_xm, kb + 64 * c,
                                    kb + 64 * c + 32, 32, ASM, True, 0, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
                else:
                    qs = _bytes(w_ptr, base + 48 + 32 * c, 32)
                    lo = (qs & 15) | (((qh >> (2 * c)) & 1) << 4)
                    hi = (qs >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
                    acc = _sub(acc, lo, a0, c0, x_ptr, rm, stride_xm, kb + 64 * c, 32, True, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
                    acc = _sub(acc, hi, a1, c1, x_ptr, rm, stride_xm, kb + 64 * c + 32, 32, True,
                               DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        else:              # q6_k: ql[128] @0, qh[64] @128, scales int8[16] @192, d @208
            d = _f16(h_ptr, base + 208)
            for hh in tl.static_range(2):
                for t in tl.static_range(8):
                    low = (_bytes(w_ptr, base + 64 * hh + 16 * (t % 4), 16) >> (4 * (t // 4))) & 15
                    high = (_bytes(w_ptr, base + 128 + 32 * hh + 16 * (t % 2), 16) >> (2 * (t // 2))) & 3
                    sc = tl.load(w_ptr + base + 192 + 8 * hh + t).to(tl.int8, bitcast=True).to(tl.float32)
                    acc = _sub(acc, (low | (high << 4)) - 32, d * sc, zoff, x_ptr, rm, stride_xm,
                               kb + 128 * hh + 16 * t, 16, False, DOT, UPCAST, IEEE, out_ptr, ro, nr, ldo, STORE)
        return acc

    @triton.jit
    def _q8_0_blocks(acc, w_ptr, h_ptr, x_ptr, row, b0, rm, stride_xm, BLOCKS: tl.constexpr,
                     ASM: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc += BLOCKS consecutive q8_0 blocks (from block b0, rows at byte offsets `row` [BN])
        times x, as one [BN, BLOCKS * 32] tile and one dot: every block's loads are issued
        before the first is used, and the tile goes to the MMA once, not once per 32-wide block
        (the 34-byte blocks are only 2-byte aligned, so their loads cannot be prefetched by
        cp.async; one block at a time left a single block's loads in flight per CTA)."""
        j = tl.arange(0, BLOCKS)
        i = tl.arange(0, 32)
        blk = row[:, None] + (b0 + j)[None, :] * 34                       # [BN, BLOCKS] byte offsets
        d = tl.load(h_ptr + blk // 2).to(tl.float16, bitcast=True)        # the blocks' f16 scales
        raw = tl.load(w_ptr + blk[:, :, None] + 2 + i[None, None, :])     # [BN, BLOCKS, 32] codes
        bn: tl.constexpr = raw.shape[0]
        raw = tl.reshape(raw, (bn, BLOCKS * 32))
        if ASM != 0:
            a = tl.reshape(tl.broadcast_to(d.to(DOT)[:, :, None], (bn, BLOCKS, 32)), (bn, BLOCKS * 32))
            w = _i8_ptx(raw, a, tl.zeros_like(a), ASM == 1)
        else:
            a = tl.reshape(tl.broadcast_to(d.to(tl.float32)[:, :, None], (bn, BLOCKS, 32)), (bn, BLOCKS * 32))
            w = (raw.to(tl.int8, bitcast=True).to(tl.float32) * a).to(DOT)
        return _mma(acc, w, _xt(x_ptr, rm, stride_xm, b0 * 32, BLOCKS * 32, DOT), UPCAST, IEEE)

    @triton.jit
    def _gguf_kernel(x_ptr, w_ptr, h_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                     M, N, n_blocks, row_bytes, stride_xm, stride_ym,
                     TYPE: tl.constexpr, QK: tl.constexpr, BPB: tl.constexpr, BLOCKS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K,
                     GROUP_N: tl.constexpr, WIDE: tl.constexpr = False):
        """acc[n, m] = sum over blocks of W_block[n] . x[m, block]; BLOCKS blocks per iteration
        (WIDE, q8_0 only: as one tile, _q8_0_blocks)."""
        pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)
        rm = tl.minimum(offs_m, M - 1)
        row = rn * row_bytes
        n_iters = n_blocks // BLOCKS
        per = tl.cdiv(n_iters, SPLIT_K)
        i0 = pid_k * per
        i1 = tl.minimum(i0 + per, n_iters)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for it in range(i0, i1):
            if WIDE:
                acc = _q8_0_blocks(acc, w_ptr, h_ptr, x_ptr, row, it * BLOCKS, rm, stride_xm, BLOCKS,
                                   ASM, DOT, UPCAST, IEEE)
            else:
                for bb in tl.static_range(BLOCKS):
                    b = it * BLOCKS + bb
                    acc = _gguf_block(acc, w_ptr, h_ptr, x_ptr, row + b * BPB, b * QK, rm, stride_xm,
                                      TYPE, ASM, DOT, UPCAST, IEEE, y_ptr, offs_n, N, 0, False)
        _epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                  pid_n * tl.cdiv(M, BLOCK_M) + pid_m, tl.cdiv(N, BLOCK_N) * tl.cdiv(M, BLOCK_M), pid_k,
                  SPLIT_K, HAS_BIAS, BLOCK_N, BLOCK_M)


    @triton.jit
    def _gguf_dequant_kernel(w_ptr, h_ptr, out_ptr, N, row_bytes, ldo,
                             TYPE: tl.constexpr, QK: tl.constexpr, BPB: tl.constexpr, BLOCKS: tl.constexpr,
                             BLOCK_N: tl.constexpr):
        """out[n, :] = the row's blocks dequantized (one pass; the dequantize-then-cuBLAS path)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = tl.minimum(offs_n, N - 1)
        row = rn * row_bytes
        dummy = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        for bb in tl.static_range(BLOCKS):
            b = tl.program_id(1) * BLOCKS + bb
            dummy = _gguf_block(dummy, w_ptr, h_ptr, out_ptr, row + b * BPB, b * QK, rn, 0,
                                TYPE, 0, tl.float32, False, True, out_ptr, offs_n, N, ldo, True)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
SPLITK_MAX_M = 64
DEFAULTS = {
    "splitk": {"BLOCK_N": 64, "BLOCK_M": 16, "K_PER_ITER": 256, "num_warps": 4, "num_stages": 3, "waves": 2.0},
    "gemm": {"BLOCK_N": 128, "BLOCK_M": 128, "K_PER_ITER": 256, "num_warps": 8, "num_stages": 2, "GROUP_N": 8},
}
BY_M = {("splitk", 32): {"BLOCK_M": 32}, ("splitk", 64): {"BLOCK_M": 64},
        ("gemm", 64): {"BLOCK_M": 64, "num_warps": 4}, ("gemm", 128): {"BLOCK_M": 64}}
# per-type refinements, from the H200 sweep (benchmarks/probe_fp.py --sweep, N = K = 8192, M = 1):
# 128-row tiles for q8_0 (1.55x faster than 64) and q6_k (1.47x), 512 K per iteration for q4_k
BY_TYPE = {("splitk", "q8_0"): {"BLOCK_N": 128}, ("splitk", "q6_k"): {"BLOCK_N": 128},
           ("splitk", "q4_k"): {"K_PER_ITER": 512}}
# (kind, type, n, k, m_bucket) -> overrides. q8_0 split-K with WIDE tiles, from
# benchmarks/results/h200-2026-11-29e/probe_q8_wide.txt (H200, us, block by block -> wide):
# 8192^2 M=1 71.4 -> 55.8, M=16 74.7 -> 56.0, M=64 97.0 -> 75.3 (BLOCK_N 64); 3072x12288 M=1
# 47.2 -> 37.7, M=16 49.4 -> 38.0, M=64 68.2 -> 58.0 (BLOCK_N 64, 128 K per iteration);
# 12288x3072 M=64 83.3 -> 55.2 (BLOCK_N 64). 12288x3072 at M <= 16 stays block by block (42.0 us
# against 47.3 at best wide). The M = 1 and 16 results agree, so the buckets between take them too.
_Q8_WIDE = {"WIDE": True}
TUNED: dict = {
    **{("splitk", "q8_0", 8192, 8192, mb): _Q8_WIDE for mb in (1, 2, 4, 8, 16)},
    **{("splitk", "q8_0", 3072, 12288, mb): _Q8_WIDE for mb in (1, 2, 4, 8, 16)},
    ("splitk", "q8_0", 8192, 8192, 64): {"WIDE": True, "BLOCK_N": 64},
    ("splitk", "q8_0", 12288, 3072, 64): {"WIDE": True, "BLOCK_N": 64},
    ("splitk", "q8_0", 3072, 12288, 64): {"WIDE": True, "BLOCK_N": 64, "K_PER_ITER": 128},
}


def config_for(kind: str, gtype: str, m: int, n: int, k: int) -> dict:
    return layered_config(DEFAULTS, BY_M, TUNED, kind, m, (kind, gtype, n, k), BY_TYPE.get((kind, gtype), {}))


def gguf_type(qw) -> str:
    t = getattr(qw.scheme, "type", None)
    if t not in TYPE_IDS:
        raise KernelError(f"{where(qw.name)}gguf type {t!r} has no Triton kernel; types: {sorted(TYPE_IDS)}")
    return t


def run_gguf(x: torch.Tensor, qw, bias: torch.Tensor | None, kind: str = "gemm", cfg: dict | None = None,
             asm: bool | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T (+ bias) for a gguf QuantizedWeight (raw block bytes)."""
    t = gguf_type(qw)
    n, k = qw.shape
    qk, bpb = BLOCK[t]
    w = qw.tensors["weight"]
    if w.dtype != torch.uint8:
        w = w.view(torch.uint8)
    if not w.is_contiguous():
        w = w.contiguous()
    m = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = dict(cfg or config_for(kind, t, m, n, k))
    dot, upcast, ieee = dot_dtype(x.dtype)
    use_asm = t in PTX_TYPES and nvidia_ptx(x.device) and not ieee and (asm if asm is not None else cfg.get("ASM", True))
    n_blocks = k // qk
    blocks = max(1, min(cfg["K_PER_ITER"] // qk, n_blocks))
    while n_blocks % blocks:
        blocks -= 1
    # q8_0's blocks of an iteration as one tile (a power of two of them: a Triton tensor shape)
    wide = t == "q8_0" and cfg.get("WIDE", False) and blocks & (blocks - 1) == 0
    iters = n_blocks // blocks
    bn, bm, tiles, split = _launch_grid(kind, m, n, iters, x.device, cfg)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, cnt = _workspace(split, tiles, bn, bm, x.device, dummy=y)
    _gguf_kernel[(tiles, split)](
        x, w, w.view(torch.int16), bias if bias is not None else y, y, ws, cnt,
        m, n, n_blocks, w.stride(0), x.stride(0), y.stride(0),
        TYPE=TYPE_IDS[t], QK=qk, BPB=bpb, BLOCKS=blocks, HAS_BIAS=bias is not None, DOT=dot,
        ASM=(1 if x.dtype == torch.bfloat16 else 2) if use_asm else 0, UPCAST=upcast, IEEE=ieee,
        BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=split, GROUP_N=cfg.get("GROUP_N", 1), WIDE=wide,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


DEQUANT_MIN_M = 128


def dequantize_gguf(qw, dtype: torch.dtype) -> torch.Tensor:
    """The gguf weight [N, K] in `dtype` (each value rounded once from gguf-py's fp32)."""
    t = gguf_type(qw)
    n, k = qw.shape
    qk, bpb = BLOCK[t]
    w = qw.tensors["weight"]
    w = (w if w.dtype == torch.uint8 else w.view(torch.uint8)).contiguous()
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    n_blocks = k // qk
    blocks = max(1, min(256 // qk, n_blocks))
    while n_blocks % blocks:
        blocks -= 1
    bn = 32
    _gguf_dequant_kernel[(-(-n // bn), n_blocks // blocks)](
        w, w.view(torch.int16), out, n, w.stride(0), out.stride(0),
        TYPE=TYPE_IDS[t], QK=qk, BPB=bpb, BLOCKS=blocks, BLOCK_N=bn, num_warps=4)
    return out


def run_gguf_dequant_mm(x: torch.Tensor, qw, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize (transient copy in x's dtype) then torch's dense matmul: large M."""
    w = dequantize_gguf(qw, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def check_gguf_problem(scheme, n: int, k: int, act_dtype: torch.dtype) -> str | None:
    t = getattr(scheme, "type", None)
    if t not in TYPE_IDS:
        return f"gguf type {t!r} has no Triton kernel"
    if act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations must be bf16, fp16 or fp32, not {act_dtype}"
    if k % BLOCK[t][0]:
        return f"K={k} is not a multiple of the {t} block ({BLOCK[t][0]})"
    return None
