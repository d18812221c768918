"""GGUF (ggml) block-quantized weights in Triton: the triton.gguf.v2 layout and its kernels.

Layout (`prepare_gguf`, one device copy shared by the split-K, GEMM and dequantize kernels):
q8_0, q4_k and q6_k are repacked once so that the codes are one contiguous, 16-byte aligned
tensor with the per-block fields beside it; it holds exactly the checkpoint's bytes:
  q8_0  qs int8 [N, K] codes, d fp16 [N, K/32]                                  (34 B / 32)
  q4_k  qs uint8 [N, K/2] (element 2i low nibble, 2i+1 high), hdr uint8 [N, K/256, 16]:
        each super-block's d, dmin (fp16) and 12 packed 6-bit scale/min bytes as in the file
                                                                                 (144 B / 256)
  q6_k  qs uint8 [N, K/2] low nibbles (as q4_k), qh uint8 [N, K/4] high 2 bits (element 4i+t
        at bits 2t), sc int8 [N, K/16], d fp16 [N, K/256]                      (210 B / 256)
The other seven types keep the file's bytes (`raw`) and the byte-offset decoder below, which
reads each block's fields in place (formats.md section 5, omniq.formats.gguf_blocks).

Repacked kernel (`_gguf_mm_kernel`): per K tile of BLOCK_K (a multiple of 32), the weight tile
[BLOCK_N, BLOCK_K] is decoded in registers with tensor ops (shift/and, tl.join, tl.reshape; codes
become fp32 through the 2^23 magic-number trick, no int->float conversions), each value computed
in fp32 in gguf-py's op order and rounded once to the dot dtype (exactly the values the
dequantize kernel writes), then ONE tl.dot against x^T [BLOCK_K, BLOCK_M] (swap-AB: acc[n, m]).
Split-K for small M (the last CTA of each tile sums the partials), the same kernel untiled in K
for large M, and dequantize-then-matmul over the same decoder.

Raw-byte kernel (the seven other types): a block is cut into sub-tiles that share one scale;
each sub-tile is decoded to (code - zero) * scale + offset in fp32 with gguf-py's op order,
rounded once to the dot dtype and multiplied on tensor cores. Compiled for NVIDIA, 4-bit
nibbles (q4_0, q4_1) become bf16x2/fp16x2 pairs with PTX prmt/lop3.
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from omniq.dispatch import Layout
from omniq.errors import KernelError, where
from omniq.kernels._common import layered_config, next_pow2, tl, triton
from omniq.kernels.triton_mx import _launch_grid, _workspace, dot_dtype, nvidia_ptx

# ggml type ids (gguf.GGMLQuantizationType), the kernel's TYPE constant
TYPE_IDS = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
            "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14}
# elements and bytes per block
BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
         "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
# types with a PTX decode in the raw-byte kernel (4-bit nibbles and int8 codes)
PTX_TYPES = ("q8_0", "q4_0", "q4_1", "q4_k")
# types the triton.gguf.v2 layout repacks (the others keep the file's bytes)
REPACKED = ("q8_0", "q4_k", "q6_k")

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
    def _gguf_kernel(x_ptr, w_ptr, h_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                     M, N, n_blocks, row_bytes, stride_xm, stride_ym,
                     TYPE: tl.constexpr, QK: tl.constexpr, BPB: tl.constexpr, BLOCKS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K,
                     GROUP_N: tl.constexpr):
        """acc[n, m] = sum over blocks of W_block[n] . x[m, block]; BLOCKS blocks per iteration."""
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


    # ---- the repacked types (q8_0, q4_k, q6_k): one decoded tile, one dot per K tile ----------
    @triton.jit
    def _exact_f32(q, bias: tl.constexpr):
        """int32 q + 2^23 (0 <= q + 2^23 < 2^24 as bits) -> the fp32 value q - bias, exact: the
        2^23 magic number replaces a slow int->float conversion with an or/add and a subtract."""
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)

    @triton.jit
    def _decode_tile(qs_row, qh_row, hdr_row, d_row, kt,
                     TYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        """W[rows, kt*BLOCK_K : (kt+1)*BLOCK_K] in DOT [BLOCK_N, BLOCK_K], natural K order; each
        value in fp32 with gguf-py's op order, rounded once. *_row: the rows' base pointers [BN].
        Every load is a contiguous run per row (vectorised, so the pipeliner can stage it)."""
        if TYPE == 8:      # q8_0: d * q
            G: tl.constexpr = BLOCK_K // 32
            q = tl.load(qs_row[:, None] + kt * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]).to(tl.int32)
            qf = (q + (0x4B000000 + 128)).to(tl.float32, bitcast=True) - 8388736.0   # q + 128 >= 0
            d = tl.load(d_row[:, None] + kt * G + tl.arange(0, G)[None, :]).to(tl.float32)
            w = tl.reshape(tl.reshape(qf, [BLOCK_N, G, 32]) * d[:, :, None], [BLOCK_N, BLOCK_K])
            w = w.to(DOT)
        elif TYPE == 12:   # q4_k: (d*sc) * q - dmin*mn per 32 elements; BLOCK_K <= 256
            G: tl.constexpr = BLOCK_K // 32
            b = tl.load(qs_row[:, None] + kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]).to(tl.int32)
            b = tl.reshape(b, [BLOCK_N, G, 16])
            # the super-block header, one 16-byte load per row: words d | dmin << 16, then the
            # 12 scale bytes (ggml get_scale_min_k4): w1 = sc0-3 (+ sc4-7 high bits in bits 6-7),
            # w2 = mn0-3 (+ mn4-7 high bits), w3 = sc4-7 low nibbles | mn4-7 low nibbles << 4
            hw = tl.load(hdr_row[:, None] + (kt // (256 // BLOCK_K)) * 4 + tl.arange(0, 4)[None, :])
            w02, w13 = tl.split(tl.reshape(hw, [BLOCK_N, 2, 2]))
            w0, w2 = tl.split(w02)
            w1, w3 = tl.split(w13)
            jj = (kt * G + tl.arange(0, G)) % 8   # sub-blocks of this tile
            sh = ((jj % 4) * 8)[None, :]
            lowj = (jj < 4)[None, :]
            w1, w2, w3 = w1[:, None], w2[:, None], w3[:, None]
            sc = tl.where(lowj, (w1 >> sh) & 63, ((w3 >> sh) & 15) | (((w1 >> (sh + 6)) & 3) << 4))
            mn = tl.where(lowj, (w2 >> sh) & 63, ((w3 >> (sh + 4)) & 15) | (((w2 >> (sh + 6)) & 3) << 4))
            d = (w0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            dmin = ((w0 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            scale = (d[:, None] * sc.to(tl.float32))[:, :, None]
            off = (-(dmin[:, None] * mn.to(tl.float32)))[:, :, None]
            lo = (_exact_f32(b & 15, 0.0) * scale + off).to(DOT)
            hi = (_exact_f32(b >> 4, 0.0) * scale + off).to(DOT)
            w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
        else:              # q6_k: (d*sc) * (q - 32) per 16 elements, q = low4 | high2 << 4; BLOCK_K <= 256
            G: tl.constexpr = BLOCK_K // 16
            b = tl.load(qs_row[:, None] + kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]).to(tl.int32)
            low = tl.reshape(tl.join(b & 15, b >> 4), [BLOCK_N, BLOCK_K])
            h = tl.load(qh_row[:, None] + kt * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)[None, :]).to(tl.int32)
            high = tl.reshape(tl.join(tl.join(h & 3, (h >> 4) & 3), tl.join((h >> 2) & 3, h >> 6)),
                              [BLOCK_N, BLOCK_K])
            qf = _exact_f32(low | (high << 4), 32.0)
            sc = tl.load(hdr_row[:, None] + kt * G + tl.arange(0, G)[None, :]).to(tl.float32)
            d = tl.load(d_row + kt // (256 // BLOCK_K)).to(tl.float32)
            w = tl.reshape(tl.reshape(qf, [BLOCK_N, G, 16]) * (d[:, None] * sc)[:, :, None], [BLOCK_N, BLOCK_K])
            w = w.to(DOT)
        return w

    @triton.jit
    def _rows(qs_ptr, qh_ptr, hdr_ptr, d_ptr, rn, s_qs, s_qh, s_hdr, s_d):
        """Base pointers of rows rn [BN] in each layout tensor (row strides are arguments, so
        Triton knows their 16-divisibility; int64: N * K may pass 2^31)."""
        r = rn.to(tl.int64)
        return qs_ptr + r * s_qs, qh_ptr + r * s_qh, hdr_ptr + r * s_hdr, d_ptr + r * s_d

    @triton.jit
    def _gguf_mm_kernel(x_ptr, qs_ptr, qh_ptr, hdr_ptr, d_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                        M, N, K, stride_xm, stride_ym, s_qs, s_qh, s_hdr, s_d,
                        TYPE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
                        GROUP_N: tl.constexpr):
        """acc[n, m] = sum over K tiles of decode(W tile) @ x^T tile: one dot per tile."""
        pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)
        rm = tl.minimum(offs_m, M - 1)
        qs_row, qh_row, hdr_row, d_row = _rows(qs_ptr, qh_ptr, hdr_ptr, d_ptr, rn, s_qs, s_qh, s_hdr, s_d)
        x_col = x_ptr + rm.to(tl.int64)[None, :] * stride_xm + tl.arange(0, BLOCK_K)[:, None]
        n_iters = K // BLOCK_K
        per = tl.cdiv(n_iters, SPLIT_K)
        i0 = pid_k * per
        i1 = tl.minimum(i0 + per, n_iters)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for it in range(i0, i1):
            w = _decode_tile(qs_row, qh_row, hdr_row, d_row, it, TYPE, BLOCK_N, BLOCK_K, DOT)
            xt = tl.load(x_col + it * BLOCK_K).to(DOT)
            acc = _mma(acc, w, xt, UPCAST, IEEE)
        _epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                  pid_n * tl.cdiv(M, BLOCK_M) + pid_m, tl.cdiv(N, BLOCK_N) * tl.cdiv(M, BLOCK_M), pid_k,
                  SPLIT_K, HAS_BIAS, BLOCK_N, BLOCK_M)

    @triton.jit
    def _gguf_mm_dequant_kernel(qs_ptr, qh_ptr, hdr_ptr, d_ptr, out_ptr, N, ldo, s_qs, s_qh, s_hdr, s_d,
                                TYPE: tl.constexpr, OUT: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[n, k tile] = the decoded tile (the same decoder and rounding as the matmul)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = tl.minimum(offs_n, N - 1)
        kt = tl.program_id(1)
        qs_row, qh_row, hdr_row, d_row = _rows(qs_ptr, qh_ptr, hdr_ptr, d_ptr, rn, s_qs, s_qh, s_hdr, s_d)
        w = _decode_tile(qs_row, qh_row, hdr_row, d_row, kt, TYPE, BLOCK_N, BLOCK_K, OUT)
        tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * ldo + kt * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], w,
                 mask=(offs_n < N)[:, None])


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
TUNED: dict = {}   # (kind, type, n, k, m_bucket) -> overrides


def config_for(kind: str, gtype: str, m: int, n: int, k: int) -> dict:
    return layered_config(DEFAULTS, BY_M, TUNED, kind, m, (kind, gtype, n, k), BY_TYPE.get((kind, gtype), {}))


def gguf_type(qw) -> str:
    t = getattr(qw.scheme, "type", None)
    if t not in TYPE_IDS:
        raise KernelError(f"{where(qw.name)}gguf type {t!r} has no Triton kernel; types: {sorted(TYPE_IDS)}")
    return t


# Repacked types: tiles of BLOCK_K along K, one dot each. Shared memory per stage holds the x^T
# tile [BLOCK_K, BLOCK_M] and the weight bytes (q8_0: BLOCK_N x BLOCK_K), plus one scratch copy of
# the decoded tile for the dot-operand layout: the defaults stay under ~180 KiB of the 227 KiB.
# Split-K below M = 64 fills the SMs; large M keeps 128 x 128 output tiles.
R_DEFAULTS = {
    "splitk": {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "waves": 2.0},
    "gemm": {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "GROUP_N": 8},
}
R_BY_M = {("gemm", 64): {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4},
          ("gemm", 128): {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}}
R_BY_TYPE: dict = {}


def r_config_for(kind: str, gtype: str, m: int, n: int, k: int) -> dict:
    return layered_config(R_DEFAULTS, R_BY_M, TUNED, kind, m, (kind, gtype, n, k), R_BY_TYPE.get((kind, gtype), {}))


@dataclass(eq=False)
class GGUFPrepared:
    """The one device copy of a gguf weight for the triton.gguf kernels (module docstring):
    repacked tensors for q8_0 / q4_k / q6_k, the file's bytes (`raw`) for the other types."""

    gtype: str
    n: int
    k: int
    raw: torch.Tensor | None = None     # uint8 [N, K/block * bytes per block]
    qs: torch.Tensor | None = None      # q8_0 int8 [N, K]; q4_k / q6_k uint8 [N, K/2]
    qh: torch.Tensor | None = None      # q6_k uint8 [N, K/4]
    hdr: torch.Tensor | None = None     # q4_k uint8 [N, K/16] (16-byte headers); q6_k int8 [N, K/16]
    d: torch.Tensor | None = None       # q8_0 fp16 [N, K/32]; q6_k fp16 [N, K/256]
    scheme: object = None
    name: str | None = None


def _pack_quads(v: torch.Tensor) -> torch.Tensor:
    """int [N, K] 2-bit values -> uint8 [N, K/4], element 4i+t at bits 2t of byte i."""
    v = v.to(torch.int32).reshape(v.shape[0], -1, 4)
    return (v[..., 0] | (v[..., 1] << 2) | (v[..., 2] << 4) | (v[..., 3] << 6)).to(torch.uint8)


def prepare_gguf(qw, device) -> GGUFPrepared:
    """The triton.gguf.v2 layout of a gguf weight (repacked on the device, once)."""
    from omniq.formats import gguf_blocks as gb
    from omniq.formats.packing import pack_nibbles
    t = gguf_type(qw)
    n, k = qw.shape
    w = qw.tensors["weight"]
    w = (w if w.dtype == torch.uint8 else w.view(torch.uint8)).to(torch.device(device)).contiguous()
    p = GGUFPrepared(gtype=t, n=n, k=k, scheme=qw.scheme, name=qw.name)
    if t not in REPACKED:
        p.raw = w
        return p
    bt = gb.BLOCK_TYPES[t]
    qk, bpb = BLOCK[t]
    blocks = w.reshape(n, k // qk, bpb)
    if t == "q4_k":   # header = d, dmin, scales (bytes 0-15 of the block); qs re-paired along K
        p.hdr = blocks[:, :, :16].reshape(n, k // 16).contiguous()
        codes = gb.unpack_blocks(bt, blocks.reshape(-1, bpb))["codes"].reshape(n, k)
        p.qs = pack_nibbles(codes)
        return p
    f = gb.unpack_blocks(bt, blocks.reshape(-1, bpb))
    if t == "q8_0":
        p.qs = f["codes"].to(torch.int8).reshape(n, k).contiguous()
        p.d = f["d"].reshape(n, k // 32).contiguous()
    else:             # q6_k
        codes = f["codes"].reshape(n, k)
        p.qs = pack_nibbles(codes & 15)
        p.qh = _pack_quads(codes >> 4)
        p.hdr = f["sc"].to(torch.int8).reshape(n, k // 16).contiguous()
        p.d = f["d"].reshape(n, k // 256).contiguous()
    return p


GGUF_LAYOUT = "triton.gguf.v2"
GGUF = Layout(GGUF_LAYOUT, prepare_gguf)


def _prepared(w, device) -> GGUFPrepared:
    """A prepared layout as is; a QuantizedWeight prepared on the fly (tests, probes)."""
    return w if isinstance(w, GGUFPrepared) else prepare_gguf(w, device)


def _tensor_args(p: GGUFPrepared):
    """(qs, qh, hdr, d) kernel pointers, then their row strides; an unused slot gets qs. The
    q4_k header goes as int32 words (one 16-byte load per super-block and row)."""
    hdr = p.hdr.view(torch.int32) if p.gtype == "q4_k" else p.hdr
    ts = [t if t is not None else p.qs for t in (p.qs, p.qh, hdr, p.d)]
    return (*ts, *(t.stride(0) for t in ts))


def _block_k(want: int, k: int, gtype: str | None = None) -> int:
    """The largest power-of-two multiple of 32, at most `want` (at most one super-block for the
    K-quants, whose tile reads one header), that divides K."""
    bk = max(32, next_pow2(want))
    if gtype in ("q4_k", "q6_k"):
        bk = min(bk, 256)
    while bk > 32 and k % bk:
        bk //= 2
    return bk


# the compiled kernel of the last launch (registers, spills, shared memory for the probe)
LAST_COMPILED: dict = {}


def run_gguf_repacked(x: torch.Tensor, p: GGUFPrepared, bias: torch.Tensor | None, kind: str = "gemm",
                      cfg: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a repacked q8_0 / q4_k / q6_k weight: one dot per K tile."""
    m, n, k = x.shape[0], p.n, p.k
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = dict(cfg or r_config_for(kind, p.gtype, m, n, k))
    if x.dtype == torch.float32:   # fp32 tiles are twice the bytes: keep the stages in shared memory
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 64), num_stages=min(cfg["num_stages"], 2))
    dot, upcast, ieee = dot_dtype(x.dtype)
    bk = _block_k(cfg["BLOCK_K"], k, p.gtype)
    bn, bm, tiles, split = _launch_grid(kind, m, n, k // bk, x.device, cfg)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, cnt = _workspace(split, tiles, bn, bm, x.device, dummy=y)
    args = _tensor_args(p)
    LAST_COMPILED["mm"] = _gguf_mm_kernel[(tiles, split)](
        x, *args[:4], bias if bias is not None else y, y, ws, cnt,
        m, n, k, x.stride(0), y.stride(0), *args[4:],
        TYPE=TYPE_IDS[p.gtype], HAS_BIAS=bias is not None, DOT=dot, UPCAST=upcast, IEEE=ieee,
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split, GROUP_N=cfg.get("GROUP_N", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


_OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _dequantize_repacked(p: GGUFPrepared, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(p.n, p.k, dtype=dtype, device=p.qs.device)
    bk, bn = _block_k(256, p.k, p.gtype), 32
    args = _tensor_args(p)
    _gguf_mm_dequant_kernel[(-(-p.n // bn), p.k // bk)](
        *args[:4], out, p.n, out.stride(0), *args[4:],
        TYPE=TYPE_IDS[p.gtype], OUT=getattr(tl, _OUT_DTYPES[dtype]), BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out


def run_gguf(x: torch.Tensor, w, bias: torch.Tensor | None, kind: str = "gemm", cfg: dict | None = None,
             asm: bool | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T (+ bias) for a gguf weight: a GGUFPrepared (the layout) or a
    QuantizedWeight (prepared on the fly). `asm` applies to the raw-byte kernel only."""
    p = _prepared(w, x.device)
    if p.gtype in REPACKED:
        return run_gguf_repacked(x, p, bias, kind, cfg)
    t, n, k, raw = p.gtype, p.n, p.k, p.raw
    qk, bpb = BLOCK[t]
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
    iters = n_blocks // blocks
    bn, bm, tiles, split = _launch_grid(kind, m, n, iters, x.device, cfg)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, cnt = _workspace(split, tiles, bn, bm, x.device, dummy=y)
    _gguf_kernel[(tiles, split)](
        x, raw, raw.view(torch.int16), bias if bias is not None else y, y, ws, cnt,
        m, n, n_blocks, raw.stride(0), x.stride(0), y.stride(0),
        TYPE=TYPE_IDS[t], QK=qk, BPB=bpb, BLOCKS=blocks, HAS_BIAS=bias is not None, DOT=dot,
        ASM=(1 if x.dtype == torch.bfloat16 else 2) if use_asm else 0, UPCAST=upcast, IEEE=ieee,
        BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=split, GROUP_N=cfg.get("GROUP_N", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


DEQUANT_MIN_M = 128


def dequantize_gguf(w, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The gguf weight [N, K] in `dtype` (each value rounded once from gguf-py's fp32), from a
    GGUFPrepared or a QuantizedWeight (prepared on `device`, default its own)."""
    if not isinstance(w, GGUFPrepared):
        w = prepare_gguf(w, device if device is not None else w.tensors["weight"].device)
    p = w
    if p.gtype in REPACKED:
        return _dequantize_repacked(p, dtype)
    t, n, k, raw = p.gtype, p.n, p.k, p.raw
    qk, bpb = BLOCK[t]
    out = torch.empty(n, k, dtype=dtype, device=raw.device)
    n_blocks = k // qk
    blocks = max(1, min(256 // qk, n_blocks))
    while n_blocks % blocks:
        blocks -= 1
    bn = 32
    _gguf_dequant_kernel[(-(-n // bn), n_blocks // blocks)](
        raw, raw.view(torch.int16), out, n, raw.stride(0), out.stride(0),
        TYPE=TYPE_IDS[t], QK=qk, BPB=bpb, BLOCKS=blocks, BLOCK_N=bn, num_warps=4)
    return out


def run_gguf_dequant_mm(x: torch.Tensor, w, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize (transient copy in x's dtype) then torch's dense matmul: large M."""
    wd = dequantize_gguf(_prepared(w, x.device), x.dtype)
    return torch.nn.functional.linear(x, wd, None if bias is None else bias.to(x.dtype))


def check_gguf_problem(scheme, n: int, k: int, act_dtype: torch.dtype) -> str | None:
    t = getattr(scheme, "type", None)
    if t not in TYPE_IDS:
        return f"gguf type {t!r} has no Triton kernel"
    if act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations must be bf16, fp16 or fp32, not {act_dtype}"
    if k % BLOCK[t][0]:
        return f"K={k} is not a multiple of the {t} block ({BLOCK[t][0]})"
    return None
