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

Measured on the H200 (benchmarks/results/h200-2026-11-29d/probe_mma.txt): 1.72-1.88x the bf16
matmul at M = 1 and 1.40-1.57x at M = 8, in 8-15 % less time than the previous version, whose loop
copied the prefetch buffer and found the scale group by an integer division; at M = 16 (two MMA
tiles) the Triton split-K kernel is faster and the dispatcher picks it. Two 16-row tiles per
warp (ROW_TILES = 2, sharing each x fragment) were slower at every M <= 8. Loading the next
block's scales and zero points with its weights, and prefetching two blocks ahead, were slower.

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
// -(MAGIC + z) twice, as packed half bits, with integer ops only: -(128 + z) for 0 <= z <= 127
// is bf16 0xC300 | z (exponent 2^7, the 7 mantissa bits are z), -(1024 + z) for 0 <= z <= 1023
// fp16 0xE400 | z (the callers guarantee those ranges)
__device__ __forceinline__ u32 neg_magic(int z) {
#if BF16
    const u32 b = 0xC300u | (u32)z;
#else
    const u32 b = 0xE400u | (u32)z;
#endif
    return b * 0x10001u;
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
    U4 wa[RT], wb[RT];  // words 4t..4t+3 of rows g and g+8 of each of the warp's RT row tiles
    U2 xv[MT][8];       // x[m][blk*128 + 16 s + 4t .. +3] for m = 8 mt + g, slot s
};

// xr[mt]: x row min(8 mt + g, M - 1) from element 4t (a row past M reads a real row: it feeds
// only output columns that are never stored); only a block that ends past K checks k < K (x
// rows are padded to 4 elements, so a 4-element run is all in or all out)
__device__ __forceinline__ void load_block(Block& B, const U4* const* wa, const U4* const* wb,
                                           const u16* const* xr, int b, int K, int t) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) { B.wa[rt] = wa[rt][b * 4]; B.wb[rt] = wb[rt][b * 4]; }
    const bool full = (b + 1) * 128 <= K;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            if (full || b * 128 + 16 * s + 4 * t < K) {
                B.xv[mt][s] = *(const U2*)(xr[mt] + b * 128 + 16 * s);
            } else {
                B.xv[mt][s].x = 0u; B.xv[mt][s].y = 0u;
            }
        }
    }
}

// the scale group of K block b without a division: GMODE 0 one group, 1 2^gshift blocks per group
__device__ __forceinline__ int group_of(int b, int gshift, int NG) {
#if GMODE == 0
    return 0;
#else
    return min(b >> gshift, NG - 1);
#endif
}

#if MINB
#define BOUNDS __launch_bounds__(128, MINB)
#else
#define BOUNDS __launch_bounds__(128)
#endif
extern "C" __global__ void BOUNDS affine_mma_gemv(
        const u16* __restrict__ x, const U4* __restrict__ qw, const void* __restrict__ scales,
        const unsigned char* __restrict__ zeros, const u16* __restrict__ bias, u16* __restrict__ y,
        float* __restrict__ ws, int* __restrict__ cnt,
        int M, int N, int K, int KW, int gshift, int NG, int sx, int zc, int bps, int S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = (blockIdx.x * 4 + warp) * 16 * RT;
    const int nblk = KW / 16;
    const int b0 = blockIdx.y * bps;
    const int b1 = min(b0 + bps, nblk);
    int ra[RT], rb[RT];
    const U4* wa[RT];
    const U4* wb[RT];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
        ra[rt] = min(n0 + 16 * rt + g, N - 1);
        rb[rt] = min(n0 + 16 * rt + g + 8, N - 1);
        wa[rt] = qw + (long)ra[rt] * (KW / 4) + t;
        wb[rt] = qw + (long)rb[rt] * (KW / 4) + t;
    }

    const u16* xr[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) xr[mt] = x + (long)min(mt * 8 + g, M - 1) * sx + 4 * t;

    float acc[RT][MT][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) { acc[rt][mt][0] = acc[rt][mt][1] = acc[rt][mt][2] = acc[rt][mt][3] = 0.f; }

    // multiply-accumulate K block b, whose words and x are in `cur`
    auto mul_block = [&](const Block& cur, int b) {
        const long gi = (long)group_of(b, gshift, NG) * N;
        float sa[RT], sb[RT];
        u32 na[RT], nb[RT];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
#if ZMODE == 1
            na[rt] = neg_magic((int)zeros[gi + ra[rt]]);
            nb[rt] = neg_magic((int)zeros[gi + rb[rt]]);
#else
            na[rt] = nb[rt] = neg_magic(zc);
#endif
            sa[rt] = scale_at(scales, gi + ra[rt]);
            sb[rt] = scale_at(scales, gi + rb[rt]);
        }
        float c[RT][MT][4];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) { c[rt][mt][0] = c[rt][mt][1] = c[rt][mt][2] = c[rt][mt][3] = 0.f; }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                // the x fragment of (q, j), built once and shared by the warp's RT row tiles
                u32 B0[MT], B1[MT];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const u32 lo = q ? cur.xv[mt][j].y : cur.xv[mt][j].x;
                    const u32 hi = q ? cur.xv[mt][j + 4].y : cur.xv[mt][j + 4].x;
                    B0[mt] = __byte_perm(lo, hi, 0x5410);
                    B1[mt] = __byte_perm(lo, hi, 0x7632);
                }
#pragma unroll
                for (int rt = 0; rt < RT; ++rt) {
                    const u32 a_ra = q ? cur.wa[rt].z : cur.wa[rt].x, a_rb = q ? cur.wa[rt].w : cur.wa[rt].y;
                    const u32 b_ra = q ? cur.wb[rt].z : cur.wb[rt].x, b_rb = q ? cur.wb[rt].w : cur.wb[rt].y;
                    const u32 A0 = dq(a_ra >> (4 * j), na[rt]), A1 = dq(b_ra >> (4 * j), nb[rt]);
                    const u32 A2 = dq(a_rb >> (4 * j), na[rt]), A3 = dq(b_rb >> (4 * j), nb[rt]);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma(c[rt][mt], A0, A1, A2, A3, B0[mt], B1[mt]);
                }
            }
        }
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                acc[rt][mt][0] += sa[rt] * c[rt][mt][0]; acc[rt][mt][1] += sa[rt] * c[rt][mt][1];
                acc[rt][mt][2] += sb[rt] * c[rt][mt][2]; acc[rt][mt][3] += sb[rt] * c[rt][mt][3];
            }
    };

    // one block requested ahead of the one being multiplied (measured: deeper prefetch, or the
    // scales loaded with it, cost more in occupancy than they gained), in two buffers used in
    // turn (a two-block loop body), so no registers are copied from one buffer to the other
    Block p0, p1;
    int b = b0;
    if (b < b1) load_block(p0, wa, wb, xr, b, K, t);
    for (; b + 1 < b1; b += 2) {
        load_block(p1, wa, wb, xr, b + 1, K, t);
        mul_block(p0, b);
        if (b + 2 < b1) load_block(p0, wa, wb, xr, b + 2, K, t);
        mul_block(p1, b + 1);
    }
    if (b < b1) mul_block(p0, b);

    float ones[RT];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) ones[rt] = 1.f;
    store_tiles<MT, RT>(acc, ones, ones, bias, y, ws, cnt, n0, g, t, M, N, S);
}
"""

SIGNATURE = "p" * 8 + "i" * 10
MAX_M = 16
ROW_TILES = 1       # 16-row tiles per warp (1 or 2): two share each x fragment between them
MIN_BLOCKS = 0      # __launch_bounds__ minimum CTAs per SM (0: none; 6 caps registers at 80)
# Launch choices measured better than the defaults for one (N, K, MMA token tiles), H200
# (benchmarks/results/h200-2026-11-29d/probe_mma.txt). A few row tiles over a long K want more,
# smaller splits, and 6 resident CTAs per SM to run them in one wave.
TUNED: dict = {
    (3072, 12288, 1): dict(target_ctas=792, min_blocks=6),   # M = 1: 12.2 us vs 13.6 us default
}


def launch_choice(m: int, n: int, k: int) -> dict:
    """target_ctas, row_tiles and min_blocks for an M x N x K call: the module defaults, then TUNED."""
    cfg = dict(target_ctas=TARGET_CTAS, row_tiles=ROW_TILES, min_blocks=MIN_BLOCKS)
    cfg.update(TUNED.get((n, k, cuda_common.mma_tiles(m)), {}))
    return cfg

_VARIANTS: dict = {}


def _scale_code(dtype: torch.dtype) -> int:
    return {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[dtype]


def variant(bf16: bool, mt: int, zmode: int, scale_dtype: torch.dtype, has_bias: bool,
            rt: int = 1, gmode: int = 1, minb: int | None = None) -> NvrtcKernel:
    minb = MIN_BLOCKS if minb is None else minb
    key = (bf16, mt, zmode, scale_dtype, has_bias, rt, gmode, minb)
    k = _VARIANTS.get(key)
    if k is None:
        k = NvrtcKernel(SOURCE, "affine_mma_gemv", SIGNATURE,
                        defines={"BF16": bf16, "MT": mt, "ZMODE": zmode, "SCALE_T": _scale_code(scale_dtype),
                                 "HAS_BIAS": has_bias, "RT": rt, "GMODE": gmode, "MINB": minb})
        _VARIANTS[key] = k
    return k


def launch_config(m: int, n: int, kw: int, target_ctas: int | None = None,
                  row_tiles: int = 1, capacity: int | None = None) -> tuple[int, int, int, int]:
    """(CTA row tiles, splits, blocks per split, m tiles) for an M x N problem over kw words per
    row, with `row_tiles` 16-row tiles per warp (capacity: cuda_common.launch_config)."""
    return cuda_common.launch_config(m, n, kw // 16, target_ctas or TARGET_CTAS, ROWS_PER_CTA * row_tiles,
                                     capacity)


def group_args(p) -> tuple[int, int]:
    """(GMODE, gshift): one scale group (0, 0), or 2^gshift K blocks per group (1, gshift)."""
    if p.n_groups <= 1:
        return 0, 0
    return 1, (p.group_size // 128).bit_length() - 1


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
    if p.n_groups > 1 and (p.group_size % 128 or (p.group_size // 128) & (p.group_size // 128 - 1)):
        return f"group size {p.group_size}: needs a power-of-two multiple of 128 (one scale per 128-wide K block)"
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
    cfg = launch_choice(m, n, k)
    rt = cfg["row_tiles"]
    gmode, gshift = group_args(p)
    kern = variant(x.dtype == torch.bfloat16, cuda_common.mma_tiles(m), p.zmode, p.scales.dtype, bias is not None, rt,
                   gmode, cfg["min_blocks"])
    tiles, splits, bps, _ = launch_config(m, n, kw, cfg["target_ctas"], rt, kern.resident_ctas(x.device, 128))
    y, ws, cnt, bias = cuda_common.outputs(x, n, splits, tiles, bias)
    kern(x.device, (tiles, splits), (128,),
         [x, p.qweight, p.scales, p.zeros, bias, y, ws, cnt,
          m, n, k, kw, gshift, p.n_groups, x.stride(0), p.zc, bps, splits])
    return y


def all_variants() -> list[NvrtcKernel]:
    """Every specialisation (compile checks)."""
    return [variant(bf, mt, zm, sd, hb) for bf in (True, False) for mt in (1, 2) for zm in (0, 1)
            for sd in (torch.float16, torch.bfloat16, torch.float32) for hb in (False, True)] + \
        [variant(bf, mt, zm, torch.float16, hb, rt, gm) for bf in (True, False) for mt in (1, 2) for zm in (0, 1)
         for hb in (False, True) for rt in (1, 2) for gm in (0, 1) if (rt, gm) != (1, 1)] + \
        [variant(bf, 1, zm, torch.float16, hb, 1, gm, minb) for bf in (True, False) for zm in (0, 1)
         for hb in (False, True) for gm in (0, 1)
         for minb in sorted({6} | {c["min_blocks"] for c in TUNED.values() if c.get("min_blocks")})]
