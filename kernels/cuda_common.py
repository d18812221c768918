"""What omniq's tensor-core GEMV kernels (CUDA C++, compiled by NVRTC) share.

`PRELUDE` goes in front of a kernel's source: 16-bit float conversions for the activation type
(`BF16` 1: bf16, 0: fp16), the `mma.sync.m16n8k16` wrapper with fp32 accumulators, and
`store_tile`, the one epilogue: a warp owns 16 output rows (n0 + g, n0 + g + 8) and 8*MT tokens
(8 mt + 2t, +1), and with S > 1 K splits each CTA parks its fp32 partial in a workspace and the
last CTA of the row tile to arrive (an atomic counter per tile, reset by that CTA) sums the
splits in order, so the result is deterministic. `splitk_buffers` makes the host side of it.
"""
from __future__ import annotations

import torch

from omniq.errors import KernelError, where

PRELUDE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct __align__(16) U4 { u32 x, y, z, w; };
struct __align__(8) U2 { u32 x, y; };

__device__ __forceinline__ float h2f(u16 h) {
#if BF16
    return __uint_as_float(((u32)h) << 16);
#else
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#endif
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
#if BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// acc[rt][mt][i]: row n0 + 16 rt + g (+8 for i >= 2), token 8 mt + 2t (+1 for odd i); fa[rt] /
// fb[rt] scale rows g / g + 8 of tile rt after the K sum; y[m][n] = acc * f (+ bias[n]) in the
// activation type. A warp owns NR tiles of 16 rows.
template <int NT, int NR>
__device__ __forceinline__ void store_tiles(const float (*acc)[NT][4], const float* fa, const float* fb,
                                            const u16* __restrict__ bias, u16* __restrict__ y,
                                            float* __restrict__ ws, int* __restrict__ cnt,
                                            int n0, int g, int t, int M, int N, int S) {
    if (S == 1) {
#pragma unroll
        for (int rt = 0; rt < NR; ++rt)
#pragma unroll
        for (int mt = 0; mt < NT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int n = n0 + 16 * rt + g + (i >> 1) * 8, m = mt * 8 + 2 * t + (i & 1);
                if (n < N && m < M) {
                    float v = acc[rt][mt][i] * (i < 2 ? fa[rt] : fb[rt]);
#if HAS_BIAS
                    v += h2f(bias[n]);
#endif
                    y[(long)m * N + n] = f2h(v);
                }
            }
        return;
    }
#pragma unroll
    for (int rt = 0; rt < NR; ++rt)
#pragma unroll
    for (int mt = 0; mt < NT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = n0 + 16 * rt + g + (i >> 1) * 8, m = mt * 8 + 2 * t + (i & 1);
            if (n < N && m < M) ws[((long)blockIdx.y * M + m) * N + n] = acc[rt][mt][i];
        }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = (atomicAdd(cnt + blockIdx.x, 1) == S - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int rt = 0; rt < NR; ++rt)
#pragma unroll
    for (int mt = 0; mt < NT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = n0 + 16 * rt + g + (i >> 1) * 8, m = mt * 8 + 2 * t + (i & 1);
            if (n < N && m < M) {
                float v = 0.f;
                for (int s = 0; s < S; ++s) v += __ldcg(ws + ((long)s * M + m) * N + n);
                v *= (i < 2 ? fa[rt] : fb[rt]);
#if HAS_BIAS
                v += h2f(bias[n]);
#endif
                y[(long)m * N + n] = f2h(v);
            }
        }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}
// one 16-row tile per warp: acc[mt][i], row n0 + g (+8 for i >= 2)
template <int NT>
__device__ __forceinline__ void store_tile(const float (*acc)[4], float fa, float fb,
                                           const u16* __restrict__ bias, u16* __restrict__ y,
                                           float* __restrict__ ws, int* __restrict__ cnt,
                                           int n0, int g, int t, int M, int N, int S) {
    store_tiles<NT, 1>((const float (*)[NT][4])acc, &fa, &fb, bias, y, ws, cnt, n0, g, t, M, N, S);
}
"""


ROWS_PER_CTA = 64        # 4 warps of 16 output rows
TARGET_CTAS = 4 * 132    # enough resident 4-warp CTAs to keep every H200 SM's loads in flight


def launch_config(m: int, n: int, steps: int, target_ctas: int = TARGET_CTAS,
                  rows_per_cta: int = ROWS_PER_CTA, capacity: int | None = None) -> tuple[int, int, int, int]:
    """(row tiles, K splits, K steps per split, MMA token tiles) for M tokens, N rows and
    `steps` K steps per row: enough CTAs to fill the GPU, no empty split. `capacity` (the CTAs
    resident at once, NvrtcKernel.resident_ctas) caps the splits so that the grid stays one wave
    when it can: rounding the splits up past it left a second wave of a few CTAs, which doubled
    the int4 GEMV's time from M = 8 to M = 16 (640 CTAs at 4 per SM; h200-2026-11-29e/ncu.txt)."""
    tiles = -(-n // rows_per_cta)
    want = max(1, min(steps, -(-target_ctas // tiles)))
    if capacity:
        want = max(1, min(want, capacity // tiles))
    per = -(-steps // want)
    return tiles, -(-steps // per), per, mma_tiles(m)


def mma_tiles(m: int) -> int:
    """8-token MMA tiles for M tokens (M <= 16): the kernels' MT."""
    return 1 if m <= 8 else 2


def prepared_reason(p, kernel: str, unsupported) -> str | None:
    """unsupported(p) once per prepared weight (cached on it): the forms of a shared layout
    this kernel does not decode."""
    key = "_unsupported_" + kernel
    if key not in p.__dict__:
        p.__dict__[key] = unsupported(p)
    return p.__dict__[key]


def checked_input(kernel: str, p, x: torch.Tensor, unsupported, max_m: int) -> torch.Tensor:
    """x [M, K] as the kernels read it (contiguous, 16-byte aligned), after the checks every
    GEMV makes: the prepared form (`unsupported(p)`, once per weight), M, the dtype."""
    why = prepared_reason(p, kernel, unsupported)
    if why:
        raise KernelError(f"{where(p.name)}{kernel}: {why}")
    if x.shape[0] > max_m:
        raise KernelError(f"{where(p.name)}{kernel}: M={x.shape[0]} > {max_m}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise KernelError(f"{where(p.name)}{kernel}: activations must be bf16 or fp16, not {x.dtype}")
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x


def outputs(x: torch.Tensor, n: int, splits: int, tiles: int, bias: torch.Tensor | None):
    """(y [M, N] in x's dtype, split-K workspace, counters, bias in x's dtype or None)."""
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, cnt = splitk_buffers(x.device, splits, m, n, tiles)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    return y, ws, cnt, bias


def splitk_buffers(device: torch.device, splits: int, m: int, n: int, tiles: int):
    """(workspace, counters) for store_tile with `splits` K splits over `tiles` row tiles, or
    (None, None) for one split. The counters are shared per stream and left at zero."""
    if splits <= 1:
        return None, None
    from omniq.kernels._common import tile_counters
    return torch.empty(splits * m * n, dtype=torch.float32, device=device), tile_counters(device, tiles)
