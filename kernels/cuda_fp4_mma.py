"""MXFP4 / NVFP4 weight-only GEMV for small M on NVIDIA tensor cores (CUDA C++, NVRTC).

Reads the "triton.fp4.v1" layout as it is (kernels/triton_mx.py; no second copy): a row is
Kp/2 bytes of units of 2H elements, byte j of a unit holding element j (low nibble) and H + j
(high nibble). One warp owns 16 output rows and a K range; per 64-byte step of a row (128 K)
each lane loads 16 bytes of two rows (bytes 16t..16t+15 of rows g and g+8, g = lane / 4,
t = lane % 4). Those 16 bytes are 16 consecutive K of one half-unit ("lo", the low nibbles)
and the 16 K one half-unit later ("hi"), each inside one scale group. A byte pair decodes with
the PTX of triton_mx (PTX_FP4_BF16 / PTX_FP4_F16: the prmt/lop3 placement plus one packed fma
by the group factor; here the prmt picks the pair straight from a 32-bit word) into a lo and a
hi bf16x2 / f16x2 register, which are the A fragment's k-slots (2t, 2t+1) and (2t+8, 2t+9) of
`mma.sync.m16n8k16`. The B fragment (x) uses the same k for each slot: two consecutive x
values are one 32-bit word of a 16-byte x load, so neither shared memory nor byte permutes
are needed. fp32 accumulation; a tile of 8 x rows per MMA
(M <= 8 one, M <= 16 two).

Exactness (the same factors as triton.fp4.splitk): MXFP4 folds 2^(s - smax) into the decoded
weight (an E2M1 value times a power of two: exact in bf16 unless it underflows 2^-133, i.e. a
group 2^-130 below the row's largest; in fp16 groups below 2^-28 of it are dropped, as there);
NVFP4 folds E4M3 scale / 2^rexp (rexp = floor(log2 row max scale)): an E2M1 significand has 2
bits and an E4M3 one 4, so the product has at most 6 significant bits, lies in
[2^-18, 12) and is a multiple of 2^-18: exact in bf16 and in fp16 (subnormals included). The
row's 2^rexp (NaN for a flagged row) and NVFP4's weight_scale_2 multiply the fp32 sum.

Split-K across CTAs fills the SMs when N is small, as in cuda_affine_mma: each CTA parks its
fp32 partial in a workspace and the last to arrive (a counter per tile) sums them in order.
"""
from __future__ import annotations

import torch

from omniq.kernels.nvrtc import NvrtcKernel
from omniq.kernels import cuda_common
from omniq.kernels.cuda_common import PRELUDE, ROWS_PER_CTA, TARGET_CTAS  # noqa: F401 - read here by tests, probes
from omniq.kernels.triton_mx import FMT_MXFP4, FMT_NVFP4, PTX_FP4_BF16, PTX_FP4_F16, REXP_NAN


_PAIR_IN = "cvt.u32.u16 t, $2;\nprmt.b32 t, t, 0, 0x1404;"


def word_decoder(ptx: str) -> str:
    """A triton_mx decoder taking a 32-bit word ($2) and a prmt selector ($5) instead of a 16-bit
    pair: 0x1404 spreads bytes 0, 1 and 0x3424 bytes 2, 3 as [0, b, 0, b'] (saves a convert)."""
    assert _PAIR_IN in ptx
    return ptx.replace(_PAIR_IN, "prmt.b32 t, $2, 0, $5;")


def _c_string(ptx: str) -> str:
    """A decoder ($i operands) as a C string literal for CUDA inline asm (%i)."""
    return '"' + ptx.replace("$", "%").replace("\n", "\\n") + '"'


SOURCE = PRELUDE + r"""
__device__ __forceinline__ u32 word(const U4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
// 2^e in fp32 for -126 <= e <= 127
__device__ __forceinline__ float pow2i(int e) { return __uint_as_float((u32)(e + 127) << 23); }

// The in-loop group factor of one scale byte, twice (a packed pair), in the placement the
// decoder expects (triton_mx._group_factor with ASM 1 / 2). mulr = 2^-rexp (NVFP4).
__device__ __forceinline__ u32 factor2(u32 s, float mulr) {
    u32 f;
#if FMT == 0
#if BF16
    f = s << 7;                                  // bf16 exponent field: 2^(s - smax + 126)
#else
    f = (u32)min(max((int)s - (253 - 29), 0), 30) << 10;
#endif
#else
    const u32 e = (s >> 3) & 15u, mt = s & 7u;
    float v = e ? __uint_as_float(((s & 0x7Fu) << 20) + (120u << 23))   // (1 + mt/8) 2^(e-7)
                : (float)mt * 0.001953125f;                            // mt 2^-9
    if (s & 0x80u) v = -v;
    if ((s & 0x7Fu) == 0x7Fu) v = __int_as_float(0x7fc00000);
    v *= mulr;                                   // E4M3 / 2^rexp: exact (fp32 normal range)
#if BF16
    v *= 8.507059173023462e+37f;                 // * 2^126, the PTX placement of bf16
#else
    v *= 16384.0f;                               // * 2^14, that of fp16
#endif
    f = f2h(v);
#endif
    return f | (f << 16);
}
// split-halves bytes 2h, 2h+1 of w -> lo and hi pairs, times the factor pairs
template <int h>
__device__ __forceinline__ void decode(u32 w, u32 flo, u32 fhi, u32& lo, u32& hi) {
#if BF16
    asm(PTX_BF16 : "=r"(lo), "=r"(hi) : "r"(w), "r"(flo), "r"(fhi), "n"(h ? 0x3424 : 0x1404));
#else
    asm(PTX_F16 : "=r"(lo), "=r"(hi) : "r"(w), "r"(flo), "r"(fhi), "n"(h ? 0x3424 : 0x1404));
#endif
}
struct Step {
    U4 wa, wb;              // bytes 16t..16t+15 of the step in rows g and g+8
    U4 xl[MT][2], xh[MT][2];// x[m][klo .. klo+15] and x[m][khi .. khi+15], m = 8 mt + g
    u32 sla, sha, slb, shb; // scale bytes of the lo / hi groups of rows g and g+8
};

// one 64-byte step of both rows, with its x and scales, issued together so the loads overlap
// the previous step's math
__device__ __forceinline__ void load_step(Step& B, const unsigned char* __restrict__ qw,
                                          const unsigned char* __restrict__ scales, const u16* __restrict__ x,
                                          int st, int M, int N, int K, int KB, int sx, int ra, int rb,
                                          int g, int t) {
    const int off = st * 64 + 16 * t;           // byte offset in the row
    const int klo = (off / H) * (2 * H) + off % H, khi = klo + H;
    if (off < KB) {
        B.wa = *(const U4*)(qw + (long)ra * KB + off);
        B.wb = *(const U4*)(qw + (long)rb * KB + off);
        const long gl = (long)(klo / GROUP) * N, gh = (long)(khi / GROUP) * N;
        B.sla = scales[gl + ra]; B.sha = scales[gh + ra];
        B.slb = scales[gl + rb]; B.shb = scales[gh + rb];
    } else {
        B.wa.x = B.wa.y = B.wa.z = B.wa.w = 0u;
        B.wb = B.wa;
        B.sla = B.sha = B.slb = B.shb = 0u;      // zero factors for zero codes
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int m = mt * 8 + g;
        const U4* xr = (const U4*)(x + (long)min(m, M - 1) * sx);
        // K % 16 == 0 and the runs start at multiples of 16: a run is all in or all out
        if (m < M && klo < K) { B.xl[mt][0] = xr[klo / 8]; B.xl[mt][1] = xr[klo / 8 + 1]; }
        else { B.xl[mt][0].x = B.xl[mt][0].y = B.xl[mt][0].z = B.xl[mt][0].w = 0u; B.xl[mt][1] = B.xl[mt][0]; }
        if (m < M && khi < K) { B.xh[mt][0] = xr[khi / 8]; B.xh[mt][1] = xr[khi / 8 + 1]; }
        else { B.xh[mt][0].x = B.xh[mt][0].y = B.xh[mt][0].z = B.xh[mt][0].w = 0u; B.xh[mt][1] = B.xh[mt][0]; }
    }
}

__device__ __forceinline__ float row_factor(const signed char* rexp, int r, float gscale) {
    const int e = rexp[r];
    if (e == REXP_NAN) return __int_as_float(0x7fc00000);
    const int h = e >> 1;                        // two normal halves: 2^-127 .. 2^127
    return pow2i(h) * pow2i(e - h) * gscale;
}

extern "C" __global__ void __launch_bounds__(128) fp4_mma_gemv(
        const u16* __restrict__ x, const unsigned char* __restrict__ qw,
        const unsigned char* __restrict__ scales, const signed char* __restrict__ rexp,
        const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
        int M, int N, int K, int KB, int sx, int bps, int S, float gscale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = (blockIdx.x * 4 + warp) * 16;
    const int nst = (KB + 63) / 64;
    const int s0 = blockIdx.y * bps;
    const int s1 = min(s0 + bps, nst);
    const int ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);
#if FMT == 1
    const float mra = pow2i(-(int)rexp[ra]), mrb = pow2i(-(int)rexp[rb]);
#else
    const float mra = 1.f, mrb = 1.f;
#endif

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) { acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f; }

    // multiply-accumulate the step in `cur`
    auto mul_step = [&](const Step& cur) {
        const u32 fla = factor2(cur.sla, mra), fha = factor2(cur.sha, mra);
        const u32 flb = factor2(cur.slb, mrb), fhb = factor2(cur.shb, mrb);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const u32 wa = word(cur.wa, q), wb = word(cur.wb, q);
            u32 la0, ha0, lb0, hb0, la1, ha1, lb1, hb1;   // byte pair i = 2q + h: K klo + 2i, +1 / khi + 2i, +1
            decode<0>(wa, fla, fha, la0, ha0);
            decode<0>(wb, flb, fhb, lb0, hb0);
            decode<1>(wa, fla, fha, la1, ha1);
            decode<1>(wb, flb, fhb, lb1, hb1);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma(acc[mt], la0, lb0, ha0, hb0, word(cur.xl[mt][q >> 1], (2 * q) & 3),
                    word(cur.xh[mt][q >> 1], (2 * q) & 3));
                mma(acc[mt], la1, lb1, ha1, hb1, word(cur.xl[mt][q >> 1], (2 * q + 1) & 3),
                    word(cur.xh[mt][q >> 1], (2 * q + 1) & 3));
            }
        }
    };
#define LOAD(B, ss) load_step(B, qw, scales, x, ss, M, N, K, KB, sx, ra, rb, g, t)
    // PF steps requested ahead of the one being multiplied, in PF + 1 buffers used in turn (a
    // loop body of PF + 1 steps), so no registers are copied from one buffer to another
    int s = s0;
    Step p0, p1;
    if (s < s1) LOAD(p0, s);
#if PF == 2
    Step p2;
    if (s + 1 < s1) LOAD(p1, s + 1);
    for (; s + 2 < s1; s += 3) {
        LOAD(p2, s + 2);
        mul_step(p0);
        if (s + 3 < s1) LOAD(p0, s + 3);
        mul_step(p1);
        if (s + 4 < s1) LOAD(p1, s + 4);
        mul_step(p2);
    }
    if (s < s1) mul_step(p0);
    if (s + 1 < s1) mul_step(p1);
#else
    for (; s + 1 < s1; s += 2) {
        LOAD(p1, s + 1);
        mul_step(p0);
        if (s + 2 < s1) LOAD(p0, s + 2);
        mul_step(p1);
    }
    if (s < s1) mul_step(p0);
#endif
#undef LOAD

    // acc[mt][i]: row n0 + g (+8 for i >= 2), column m = 8 mt + 2t (+1 for odd i)
    const float rfa = row_factor(rexp, ra, gscale), rfb = row_factor(rexp, rb, gscale);
    store_tile<MT>(acc, rfa, rfb, bias, y, ws, cnt, n0, g, t, M, N, S);
}
"""

# x, qw, scales, rexp, bias, y, ws, cnt | M, N, K, KB, sx, bps, S | gscale
SIGNATURE = "p" * 8 + "i" * 7 + "f"
MAX_M = 16
STEP_BYTES = 64           # bytes of a row per K step of a warp (128 K)
# K steps requested ahead of the one being multiplied (1 or 2). With the buffers used in turn,
# depth 1 was faster at M = 1 and 8 on 8192^2 and 12288x3072 (7-13 %) and within 3 % on 3072x12288
# (H200, benchmarks/results/h200-2026-11-29d/probe_fp4_mma.txt); two m tiles with depth 2 take
# ~165 registers: 3 CTAs per SM instead of the 4 TARGET_CTAS assumes
PREFETCH = 1

_VARIANTS: dict = {}


def variant(bf16: bool, mt: int, fmt: int, h: int, has_bias: bool, pf: int | None = None) -> NvrtcKernel:
    if pf is None:
        pf = PREFETCH
    key = (bf16, mt, fmt, h, has_bias, pf)
    k = _VARIANTS.get(key)
    if k is None:
        k = NvrtcKernel(SOURCE, "fp4_mma_gemv", SIGNATURE,
                        defines={"BF16": bf16, "MT": mt, "FMT": fmt, "H": h, "GROUP": 32 if fmt == FMT_MXFP4 else 16,
                                 "HAS_BIAS": has_bias, "PF": pf, "REXP_NAN": f"({REXP_NAN})",
                                 "PTX_BF16": _c_string(word_decoder(PTX_FP4_BF16)),
                                 "PTX_F16": _c_string(word_decoder(PTX_FP4_F16))})
        _VARIANTS[key] = k
    return k


def launch_config(m: int, n: int, kb: int, target_ctas: int | None = None,
                  capacity: int | None = None) -> tuple[int, int, int, int]:
    """(row tiles, splits, steps per split, m tiles) for an M x N problem over kb bytes per row."""
    return cuda_common.launch_config(m, n, -(-kb // STEP_BYTES), target_ctas or TARGET_CTAS, capacity=capacity)


def unsupported(p) -> str | None:
    """Why this prepared triton.fp4.v1 weight cannot run here."""
    if p.dual is not None:
        return "mxfp4_dualscale's per-512 coarse scales are not applied here (triton.fp4.splitk does)"
    if getattr(p.scheme, "activation", None) is not None:
        return f"activation={p.scheme.activation!r}: this kernel is weight-only (activation=None)"
    if p.fmt not in (FMT_MXFP4, FMT_NVFP4):
        return f"format code {p.fmt}: MXFP4 / NVFP4 only"
    if p.k % 16:
        return f"K={p.k}: needs K % 16 == 0 (16-element x loads)"
    if p.fmt == FMT_NVFP4 and p.h != 16 or p.h not in (16, 32):
        return f"split-halves unit H={p.h} with format {p.fmt}: not a triton.fp4.v1 combination"
    if p.qweight.shape[1] % 16 or p.qweight.stride(1) != 1 or p.qweight.stride(0) != p.qweight.shape[1]:
        return "qweight rows must be contiguous multiples of 16 bytes"
    return None


def run(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    """y[M, N] = x @ W^T (+ bias) for M <= 16, x bf16 / fp16 [M, K], W in triton.fp4.v1."""
    x = cuda_common.checked_input("cuda.fp4.mma_gemv", p, x, unsupported, MAX_M)
    (m, k), n, kb = x.shape, p.n, p.qweight.shape[1]
    kern = variant(x.dtype == torch.bfloat16, cuda_common.mma_tiles(m), p.fmt, p.h, bias is not None)
    tiles, splits, bps, _ = launch_config(m, n, kb, TARGET_CTAS, kern.resident_ctas(x.device, 128))
    y, ws, cnt, bias = cuda_common.outputs(x, n, splits, tiles, bias)
    kern(x.device, (tiles, splits), (128,),
         [x, p.qweight, p.scales, p.rexp, bias, y, ws, cnt,
          m, n, k, kb, x.stride(0), bps, splits, float(p.gscale)])
    return y


def all_variants() -> list[NvrtcKernel]:
    """Every specialisation (compile checks)."""
    return [variant(bf, mt, fmt, h, hb, pf) for bf in (True, False) for mt in (1, 2)
            for fmt, h in ((FMT_MXFP4, 32), (FMT_MXFP4, 16), (FMT_NVFP4, 16))
            for hb in (False, True) for pf in (1, 2)]
