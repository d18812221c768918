"""4-bit grouped weight-only GEMV for small M on NVIDIA tensor cores (CUDA C++, NVRTC).

Reads the "triton.affine.v1" layout as it is (no second copy): word r of each 16-word K block
holds k = 16*i + r in nibble slot i. One warp owns 16 output rows and a K range; per 128-wide
block each lane loads 16 bytes of two rows (words 4t..4t+3 of rows g and g+8, g = lane / 4,
t = lane % 4), turns nibble pairs (slot j, slot j+4) into bf16x2 / f16x2 registers with one
`lop3` each (u | 0x4300 reads as 128 + u; a packed fma takes off 128 + z exactly), and feeds
them straight into `mma.sync.m16n8k16` as the A fragment. The product's reduction index is a
permutation of k: the B fragment (x) is built with the same permutation from 8-byte loads of x
and two byte-permutes per register pair, so no shared memory and no layout shuffles are needed.
Group scales (group size a multiple of 128, or one group) multiply the fp32 block sums, so the
dot is exact in fp32. A tile of 8 x rows per MMA: M <= 8 takes one, M <= 16 two.

Measured on the H200 (benchmarks/results/h200-2026-11-29/probe_mma_*.json): 1.40-1.65x the bf16
matmul at M = 1 and 1.24-1.43x at M = 8; at M = 16 (two MMA tiles, 128 registers) the Triton
split-K kernel is faster and the tuning table picks it. Loading the next block's scales and zero
points with its weights (more registers) and prefetching two blocks ahead were both slower.

Split-K across CTAs fills the 132 SMs when N is small: each CTA parks its fp32 partial in a
workspace and the last to arrive (an atomic counter per tile) sums the splits in order.
"""
from __future__ import annotations

import torch

from omniq.kernels import cuda_common
from omniq.kernels.cuda_common import PRELUDE, ROWS_PER_CTA, TARGET_CTAS  # noqa: F401 - read here by tests, probes
from omniq.kernels.nvrtc import NvrtcKernel

SOURCE = PRELUDE + r"""
__device__ __forceinline__ float scale_at(const void* s, long i) {
#if SCALE_T == 0
    u16 h = ((const u16*)s)[i]; float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#elif SCALE_T == 1
    return __uint_as_float(((u32)((const u16*)s)[i]) << 16);
#else
    return ((const float*)s)[i];
#endif
}
// -(MAGIC + z) twice, as packed half bits (exact: z <= 127 for bf16, any uint8 for fp16)
__device__ __forceinline__ u32 neg_magic(int z) {
#if BF16
    u32 b = __float_as_uint(-(128.0f + (float)z)) >> 16;
#else
    u16 hb; float f = -(1024.0f + (float)z);
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hb) : "f"(f));
    u32 b = hb;
#endif
    return b | (b << 16);
}
// nibbles 0 and 16 of w -> packed (u0 - z, u4 - z) with no int->float conversion
__device__ __forceinline__ u32 dq(u32 w, u32 neg) {
    u32 v, r;
#if BF16
    asm("lop3.b32 %0, %1, 0x000f000f, 0x43004300, 0xea;" : "=r"(v) : "r"(w));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3F803F80u), "r"(neg));
#else
    asm("lop3.b32 %0, %1, 0x000f000f, 0x64006400, 0xea;" : "=r"(v) : "r"(w));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3C003C00u), "r"(neg));
#endif
    return r;
}
struct Block {
    U4 wa, wb;          // words 4t..4t+3 of rows g and g+8
    U2 xv[MT][8];       // x[m][blk*128 + 16 s + 4t .. +3] for m = 8 mt + g, slot s
};

__device__ __forceinline__ void load_block(Block& B, const U4* wa, const U4* wb, const u16* x, int b,
                                           int M, int K, int sx, int g, int t) {
    B.wa = wa[b * 4];
    B.wb = wb[b * 4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int m = mt * 8 + g;
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            const int k = b * 128 + 16 * s + 4 * t;
            if (m < M && k < K) {
                B.xv[mt][s] = *(const U2*)(x + (long)m * sx + k);
            } else {
                B.xv[mt][s].x = 0u; B.xv[mt][s].y = 0u;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) affine_mma_gemv(
        const u16* __restrict__ x, const U4* __restrict__ qw, const void* __restrict__ scales,
        const unsigned char* __restrict__ zeros, const u16* __restrict__ bias, u16* __restrict__ y,
        float* __restrict__ ws, int* __restrict__ cnt,
        int M, int N, int K, int KW, int G, int NG, int sx, int zc, int bps, int S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = (blockIdx.x * 4 + warp) * 16;
    const int nblk = KW / 16;
    const int b0 = blockIdx.y * bps;
    const int b1 = min(b0 + bps, nblk);
    const int ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);
    const U4* wa = qw + (long)ra * (KW / 4) + t;
    const U4* wb = qw + (long)rb * (KW / 4) + t;

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) { acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f; }

    // one block requested ahead of the one being multiplied (measured: deeper prefetch, or the
    // scales loaded with it, cost more in occupancy than they gained)
    Block cur, nxt;
    if (b0 < b1) load_block(cur, wa, wb, x, b0, M, K, sx, g, t);
    for (int b = b0; b < b1; ++b) {
        if (b + 1 < b1) load_block(nxt, wa, wb, x, b + 1, M, K, sx, g, t);
        const long gi = (long)min((b * 128) / G, NG - 1) * N;
#if ZMODE == 1
        const u32 na = neg_magic((int)zeros[gi + ra]), nb = neg_magic((int)zeros[gi + rb]);
#else
        const u32 na = neg_magic(zc), nb = na;
#endif
        const float sa = scale_at(scales, gi + ra), sb = scale_at(scales, gi + rb);
        float c[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) { c[mt][0] = c[mt][1] = c[mt][2] = c[mt][3] = 0.f; }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const u32 a_ra = q ? cur.wa.z : cur.wa.x, a_rb = q ? cur.wa.w : cur.wa.y;
            const u32 b_ra = q ? cur.wb.z : cur.wb.x, b_rb = q ? cur.wb.w : cur.wb.y;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 A0 = dq(a_ra >> (4 * j), na), A1 = dq(b_ra >> (4 * j), nb);
                const u32 A2 = dq(a_rb >> (4 * j), na), A3 = dq(b_rb >> (4 * j), nb);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const u32 lo = q ? cur.xv[mt][j].y : cur.xv[mt][j].x;
                    const u32 hi = q ? cur.xv[mt][j + 4].y : cur.xv[mt][j + 4].x;
                    mma(c[mt], A0, A1, A2, A3, __byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632));
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            acc[mt][0] += sa * c[mt][0]; acc[mt][1] += sa * c[mt][1];
            acc[mt][2] += sb * c[mt][2]; acc[mt][3] += sb * c[mt][3];
        }
        cur = nxt;
    }

    store_tile<MT>(acc, 1.f, 1.f, bias, y, ws, cnt, n0, g, t, M, N, S);
}
"""

SIGNATURE = "p" * 8 + "i" * 10
MAX_M = 16

_VARIANTS: dict = {}


def _scale_code(dtype: torch.dtype) -> int:
    return {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[dtype]


def variant(bf16: bool, mt: int, zmode: int, scale_dtype: torch.dtype, has_bias: bool) -> NvrtcKernel:
    key = (bf16, mt, zmode, scale_dtype, has_bias)
    k = _VARIANTS.get(key)
    if k is None:
        k = NvrtcKernel(SOURCE, "affine_mma_gemv", SIGNATURE,
                        defines={"BF16": bf16, "MT": mt, "ZMODE": zmode, "SCALE_T": _scale_code(scale_dtype),
                                 "HAS_BIAS": has_bias})
        _VARIANTS[key] = k
    return k


def launch_config(m: int, n: int, kw: int, target_ctas: int | None = None) -> tuple[int, int, int, int]:
    """(row tiles, splits, blocks per split, m tiles) for an M x N problem over kw words per row."""
    return cuda_common.launch_config(m, n, kw // 16, target_ctas or TARGET_CTAS)


def unsupported(p) -> str | None:
    """Why this prepared weight cannot run here (the layout holds forms this kernel skips)."""
    if p.bits != 4:
        return f"{p.bits}-bit codes: this kernel decodes 4-bit nibbles only"
    if p.g_idx is not None:
        return "an irregular g_idx (per-element groups) needs triton.affine kernels"
    if p.zmode == 2:
        return "float zero offsets need triton.affine kernels (integer zero points only here)"
    if p.act_int8:
        return "int8 activations (W4A8) run on triton.affine.splitk / .gemm"
    if p.n_groups > 1 and p.group_size % 128:
        return f"group size {p.group_size}: needs a multiple of 128 (one scale per 128-wide K block)"
    if p.zmode == 1 and p.zero_max > 127:
        return f"zero points up to {p.zero_max}: above 127 they do not fit the bf16 exponent trick"
    return None


def run(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    """y[M, N] = x @ W^T (+ bias) for M <= 16, x bf16 / fp16 [M, K]."""
    k = x.shape[1]
    if p.perm is not None:
        x = x.index_select(1, p.perm)
    if k % 4:  # 8-byte x loads: rows padded to 4 elements (the padding meets zero codes)
        x = torch.nn.functional.pad(x, (0, 4 - k % 4))
    x = cuda_common.checked_input("cuda.affine.mma_gemv", p, x, unsupported, MAX_M)
    m, n, kw = x.shape[0], p.n, p.qweight.shape[1]
    tiles, splits, bps, mt = launch_config(m, n, kw, TARGET_CTAS)
    y, ws, cnt, bias = cuda_common.outputs(x, n, splits, tiles, bias)
    kern = variant(x.dtype == torch.bfloat16, mt, p.zmode, p.scales.dtype, bias is not None)
    g = p.group_size if p.n_groups > 1 else 1 << 30
    kern(x.device, (tiles, splits), (128,),
         [x, p.qweight, p.scales, p.zeros, bias, y, ws, cnt,
          m, n, k, kw, g, p.n_groups, x.stride(0), p.zc, bps, splits])
    return y


def all_variants() -> list[NvrtcKernel]:
    """Every specialisation (compile checks)."""
    return [variant(bf, mt, zm, sd, hb) for bf in (True, False) for mt in (1, 2) for zm in (0, 1)
            for sd in (torch.float16, torch.bfloat16, torch.float32) for hb in (False, True)]
