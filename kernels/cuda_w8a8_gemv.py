"""fp8 / int8 W8A8 for decode-size M (1..16) as one hand-written CUDA kernel, compiled at run
time with NVRTC (omniq.kernels.nvrtc), over the "triton.w8a8.v1" layout.

The activation is quantized first (bit-exact with the schemes' `quantize_activation`); this kernel
then computes y[m, n] = s_x[m] * s_w[n] * sum_k q[m, k] W[n, k] (+ bias) in x's dtype.

Hiding the quantizer (cfg 'quant', 'pdl'). The quantizer's time (2-6 us at decode M on an H200,
against a 13-20 us GEMV) is mostly latency: a launch, one pass over a short row, a block
reduction. Two things take it off the critical path:
  * a quantizer that executes `griddepcontrol.launch_dependents` first thing: for int8
    QUANT_SOURCE, a CUDA quantizer with several CTAs per row (each reads the whole row for the
    amax, from L2 after the first, and casts only its share of 16-byte vectors: no CTA waits on
    another); for fp8 (see quantize_cuda for why it keeps the Triton quantizer) and
    quant='triton', the Triton quantizer with its EARLY_TRIGGER;
  * the GEMV launched with Programmatic Dependent Launch (omniq.kernels.nvrtc, `pdl=True`): its
    CTAs start while the quantizer runs, issue their first round of weight loads, then
    `griddepcontrol.wait` until the quantizer grid has finished
    and its writes are visible, and only then read the codes and scales. Every write of the GEMV
    (partials, counters, y) comes after the wait, so the result is bitwise the same as with a
    plain launch, and the split-K counters shared per stream are never touched early.

Why mma.sync and not FMA: at M = 16 a CUDA-core dot costs 16 FFMA per weight byte for fp8
(256 per 16-byte load), twice what an SM can issue while streaming 16 B/clk from HBM; a
warp-level tensor-core instruction (mma.sync, register operands, no shared memory) does
16 x 8 x 16..32 MACs at once, so the dot costs a few instructions per 16 weight bytes for any
M <= 16 and the kernel stays memory bound. The weight is the MMA's A operand (swap-AB: the
16 weight rows are the MMA's M, the tokens its N = 8 or 16), so the weight never goes through
shared memory: every thread loads 16 contiguous bytes of a weight row straight into the
registers the MMA reads.

The trick that makes those loads 16 bytes wide: a dot product does not care in which order
the K terms are summed, so the kernel feeds the MMA a permutation of K in which each thread's
fragment slots hold 16 *consecutive* bytes of its row; the activation fragment uses the same
permutation, so every product still pairs W[n, k] with q[m, k]. Concretely, in one step of 64
K-bytes, lane (g = lane / 4, t = lane % 4) loads W[n0 + g, k0 + 16t : +16], W[n0 + g + 8, same]
and q[g, same] (and q[g + 8, same] when M > 8):
  int8 (and native fp8): those 16 bytes are 4 words x0..x3; MMA m16n8k32 #1 takes
      a = (Wg.x0, Wh.x0, Wg.x1, Wh.x1), b = (q.x0, q.x1); #2 takes the words x2, x3;
  fp8 via f16: the 16 bytes become 8 f16x2 words (cvt.rn.f16x2.e4m3x2, exact); MMA m16n8k16
      #j (j < 4) takes a = (Wg[2j], Wh[2j], Wg[2j+1], Wh[2j+1]), b = (q[2j], q[2j+1]).
Per the PTX fragment layout (m16n8k32 8-bit: a0 = row g, k 4t..4t+3; a1 = row g+8; a2 = row g,
k 16+4t..; b0 = k 4t.., column g; m16n8k16 f16: a0 = row g, k 2t, 2t+1; a2 = k 8+2t..) the
A slot (row, s) and the B slot (s, column) that the hardware multiplies come from the same
physical k, which is all a dot product needs.

Per 16 weight bytes a thread issues: int8 1 load + 1 MMA (x MT); fp8 1 load + 8 cvt (+ 8 cvt
of the activation per 32 weight bytes x MT) + 2 MMA (x MT). Accumulation: int32 (exact) for
int8, fp32 for fp8 (the f16 products of e4m3 values are exact).

Work split: a CTA holds WN x WK warps; each warp owns a 16-row tile (WN tiles per CTA) and
every WK-th round of UNROLL steps of the CTA's K range, double-buffered in registers (16-byte
`ld.global.nc.L1::no_allocate.L2::256B` weight loads; the activation codes come through L1);
gridDim.y splits K across CTAs (about `ctas_per_sm` CTAs per SM, one resident wave). The WK
partial tiles meet in shared memory; with a K split, each CTA parks its partial and the last one
to arrive (per-tile arrival counter) sums them in split order (deterministic), applies the
scales and the bias and writes y, then resets the counter.

An in-kernel activation quantizer (lowest-id CTAs quantize, the others wait on a flag) was
measured no faster on the H200 than the Triton quantizer launched first, and it relied on those
CTAs being scheduled while others spin; it was removed. PDL needs no such assumption: the
hardware launches the GEMV only once every quantizer CTA is resident (has triggered), and the
wait is on grid completion, not on a flag.
"""
from __future__ import annotations

import threading

import torch

from omniq.errors import KernelError, where

MAX_M = 16          # this kernel's M range; larger M runs on the tensor-core GEMMs
K_ALIGN = 16        # 16-byte loads of a K-contiguous weight row
STEP_K = 64         # K bytes one warp consumes per step (4 lanes x 16 B per row)
TILE_N = 16         # weight rows per warp tile (the MMA's M)
INT8_MAX_K = (1 << 17) - 1   # int32 accumulator: |sum| <= K * 128 * 128 < 2^31
FP8_F16, FP8_NATIVE = 0, 2   # FP8_MODE: e4m3 -> f16 (exact cvt) + f16 MMA, or the e4m3 MMA itself

CUDA_SOURCE = r"""
// omniq W8A8 GEMV for M <= 16 (see omniq/kernels/cuda_w8a8_gemv.py for the layout argument).
// Defines: IS_FP8, FP8_MODE (0: cvt to f16 + f16 MMA, 2: e4m3 MMA), MT (1: M <= 8, 2: M <= 16),
// OUT_KIND (0 fp16, 1 bf16, 2 fp32), WN, WK, UNROLL, MINB.
typedef unsigned int u32;
typedef unsigned short u16;
struct U4 { u32 x, y, z, w; };

#define THREADS (WN * WK * 32)
#define MCOLS (MT * 8)
#define ROWS (WN * 16)
#define OUTS (MCOLS * ROWS)
#define STEP 64
#define STRIDE (WK * UNROLL)

#if IS_FP8
typedef float acc_t;
#else
typedef int acc_t;
#endif

// ---- memory ------------------------------------------------------------------------------
// 16 weight bytes, streamed once: not kept in L1 (the activation lives there), 256 B L2 lines.
// FIRST: the round issued before griddepcontrol.wait, volatile so that it stays before it
#define LD_WEIGHT_PTX "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n" \
    " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n" \
    " @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n" \
    : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "r"(ok)
template <bool FIRST>
__device__ __forceinline__ U4 ld_weight(const unsigned char* p, int ok) {
    U4 r;
    if constexpr (FIRST) asm volatile(LD_WEIGHT_PTX);
    else asm(LD_WEIGHT_PTX);
    return r;
}

// 16 activation-code bytes, read by every CTA: cached in L1
__device__ __forceinline__ U4 ld_act(const unsigned char* p, int ok) {
    U4 r;
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
                 " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
                 " @p ld.global.ca.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "r"(ok) : "memory");
    return r;
}

// Programmatic Dependent Launch: under a PDL launch this CTA may run before the previous kernel
// on the stream (the activation quantizer) has finished; everything that kernel writes, and
// every write of this one, comes after the wait. Without PDL it returns at once.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];\n" : "=f"(v) : "l"(p) : "memory");
    return v;
}

// ---- MMA ---------------------------------------------------------------------------------
#if !IS_FP8
__device__ __forceinline__ void mma8(int* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#elif FP8_MODE == 2
__device__ __forceinline__ void mma8(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#else
__device__ __forceinline__ void mma16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// four e4m3 bytes -> two f16x2 words (bytes 0,1 and bytes 2,3), exactly
__device__ __forceinline__ void e4m3x4_to_f16(u32 w, u32& lo, u32& hi) {
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n"
        " cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(lo), "=r"(hi) : "r"(w));
}

__device__ __forceinline__ void to_f16x8(const U4& v, u32* h) {
    e4m3x4_to_f16(v.x, h[0], h[1]);
    e4m3x4_to_f16(v.y, h[2], h[3]);
    e4m3x4_to_f16(v.z, h[4], h[5]);
    e4m3x4_to_f16(v.w, h[6], h[7]);
}
#endif

// one step (64 K-bytes) of a 16-row tile: rows g (wa) and g + 8 (wb), tokens g (xa) and g + 8 (xb)
__device__ __forceinline__ void mma_step(acc_t (*c)[4], const U4& wa, const U4& wb, const U4& xa, const U4& xb) {
#if !IS_FP8 || FP8_MODE == 2
    mma8(c[0], wa.x, wb.x, wa.y, wb.y, xa.x, xa.y);
    mma8(c[0], wa.z, wb.z, wa.w, wb.w, xa.z, xa.w);
#if MT == 2
    mma8(c[1], wa.x, wb.x, wa.y, wb.y, xb.x, xb.y);
    mma8(c[1], wa.z, wb.z, wa.w, wb.w, xb.z, xb.w);
#endif
#else
    u32 ha[8], hb[8], qa[8];
    to_f16x8(wa, ha);
    to_f16x8(wb, hb);
    to_f16x8(xa, qa);
#pragma unroll
    for (int j = 0; j < 4; ++j)
        mma16(c[0], ha[2 * j], hb[2 * j], ha[2 * j + 1], hb[2 * j + 1], qa[2 * j], qa[2 * j + 1]);
#if MT == 2
    u32 qb[8];
    to_f16x8(xb, qb);
#pragma unroll
    for (int j = 0; j < 4; ++j)
        mma16(c[1], ha[2 * j], hb[2 * j], ha[2 * j + 1], hb[2 * j + 1], qb[2 * j], qb[2 * j + 1]);
#endif
#endif
}

// ---- epilogue ------------------------------------------------------------------------------
__device__ __forceinline__ float acc_bits(acc_t v) {
#if IS_FP8
    return v;
#else
    return __int_as_float(v);
#endif
}

__device__ __forceinline__ acc_t bits_acc(float v) {
#if IS_FP8
    return v;
#else
    return __float_as_int(v);
#endif
}

__device__ __forceinline__ void epilogue(acc_t v, int m, int n, int N, const float* __restrict__ w_scale,
                                         const float* x_scale, const void* __restrict__ bias,
                                         int bias_kind, void* __restrict__ Y) {
    float y = (float)v;
    y = y * ld_cg(x_scale + m);
    y = y * w_scale[n];
    if (bias_kind == 1) {
        y += ((const float*)bias)[n];
    } else if (bias_kind == 2) {
        y += __uint_as_float(((u32)((const u16*)bias)[n]) << 16);
    } else if (bias_kind == 3) {
        float b;
        asm("cvt.f32.f16 %0, %1;\n" : "=f"(b) : "h"(((const u16*)bias)[n]));
        y += b;
    }
#if OUT_KIND == 2
    ((float*)Y)[(long long)m * N + n] = y;
#else
    u16 h;
#if OUT_KIND == 1
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(h) : "f"(y));
#else
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(y));
#endif
    ((u16*)Y)[(long long)m * N + n] = h;
#endif
}

// ---- the kernel ----------------------------------------------------------------------------
struct Frag {
    U4 wa[UNROLL];      // weight row n0 + g
    U4 wb[UNROLL];      // weight row n0 + g + 8
    U4 xa[UNROLL];      // activation row g
#if MT == 2
    U4 xb[UNROLL];      // activation row g + 8
#endif
};

template <bool FIRST>
__device__ __forceinline__ void load_w(Frag& f, int s, int s_end, int K, int kt, const unsigned char* wa,
                                       const unsigned char* wb) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int ss = s + u;
        const int ok = (ss < s_end) && (ss * STEP + kt < K);
        const long long off = (long long)ss * STEP;
        f.wa[u] = ld_weight<FIRST>(wa + off, ok);
        f.wb[u] = ld_weight<FIRST>(wb + off, ok);
    }
}

__device__ __forceinline__ void load_x(Frag& f, int s, int s_end, int K, int kt, const unsigned char* xa,
                                       const unsigned char* xb) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int ss = s + u;
        const int ok = (ss < s_end) && (ss * STEP + kt < K);
        const long long off = (long long)ss * STEP;
        f.xa[u] = ld_act(xa + off, ok);
#if MT == 2
        f.xb[u] = ld_act(xb + off, ok);
#endif
    }
}

__device__ __forceinline__ void compute_frag(const Frag& f, acc_t (*acc)[MT][4]) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)   // two accumulator sets: shorter dependent MMA chains
#if MT == 2
        mma_step(acc[u & 1], f.wa[u], f.wb[u], f.xa[u], f.xb[u]);
#else
        mma_step(acc[u & 1], f.wa[u], f.wb[u], f.xa[u], f.xa[u]);
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS, MINB)
w8a8_gemv(const unsigned char* __restrict__ W, unsigned char* Xq,
          const float* __restrict__ w_scale, float* x_scale, const void* __restrict__ bias,
          void* __restrict__ Y, float* __restrict__ partials, int* __restrict__ counters,
          int M, int N, int K, int steps_per_split, int bias_kind) {
    __shared__ acc_t red[WK * OUTS];
    __shared__ int flag_sh;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wn = warp % WN, wk = warp / WN;
    const int g = lane >> 2, t = lane & 3, kt = 16 * t;
    const int row0 = (blockIdx.x * WN + wn) * 16;
    // rows past N / M read a valid row (the last); their results are never stored
    const unsigned char* wa = W + (long long)min(row0 + g, N - 1) * K + kt;
    const unsigned char* wb = W + (long long)min(row0 + g + 8, N - 1) * K + kt;
    const unsigned char* xa = Xq + (long long)min(g, M - 1) * K + kt;
#if MT == 2
    const unsigned char* xb = Xq + (long long)min(g + 8, M - 1) * K + kt;
#else
    const unsigned char* xb = xa;
#endif
    const int steps = (K + STEP - 1) / STEP;
    const int s_begin = blockIdx.y * steps_per_split;
    const int s_end = min(s_begin + steps_per_split, steps);

    Frag cur, nxt;
    int s = s_begin + wk * UNROLL;
    load_w<true>(cur, s, s_end, K, kt, wa, wb);   // the weight stream starts first (it needs no quantizer)
    grid_dependency_wait();

    acc_t acc[2][MT][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

    // double buffer: the next round's loads are in flight while this one is multiplied
    load_x(cur, s, s_end, K, kt, xa, xb);
    for (; s < s_end; s += STRIDE) {
        load_w<false>(nxt, s + STRIDE, s_end, K, kt, wa, wb);
        load_x(nxt, s + STRIDE, s_end, K, kt, xa, xb);
        compute_frag(cur, acc);
        cur = nxt;
    }

    // C fragment: c0, c1 = (row g, columns 2t, 2t+1), c2, c3 = (row g+8, same columns); red is [WK][MCOLS][ROWS]
#pragma unroll
    for (int j = 0; j < MT; ++j) {
        const int col = 8 * j + 2 * t, r = wn * 16 + g;
        red[(wk * MCOLS + col) * ROWS + r] = acc[0][j][0] + acc[1][j][0];
        red[(wk * MCOLS + col + 1) * ROWS + r] = acc[0][j][1] + acc[1][j][1];
        red[(wk * MCOLS + col) * ROWS + r + 8] = acc[0][j][2] + acc[1][j][2];
        red[(wk * MCOLS + col + 1) * ROWS + r + 8] = acc[0][j][3] + acc[1][j][3];
    }
    __syncthreads();

    const int nbase = blockIdx.x * ROWS;
    if (gridDim.y == 1) {
        for (int o = tid; o < OUTS; o += THREADS) {
            const int m = o / ROWS, r = o % ROWS;
            acc_t v = red[o];
#pragma unroll
            for (int w = 1; w < WK; ++w) v += red[w * OUTS + o];
            if (m < M && nbase + r < N) epilogue(v, m, nbase + r, N, w_scale, x_scale, bias, bias_kind, Y);
        }
        return;
    }

    float* mine = partials + ((long long)blockIdx.y * gridDim.x + blockIdx.x) * OUTS;
    for (int o = tid; o < OUTS; o += THREADS) {
        acc_t v = red[o];
#pragma unroll
        for (int w = 1; w < WK; ++w) v += red[w * OUTS + o];
        mine[o] = acc_bits(v);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) flag_sh = atomicAdd(counters + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!flag_sh) return;
    __threadfence();
    for (int o = tid; o < OUTS; o += THREADS) {
        const int m = o / ROWS, r = o % ROWS;
        acc_t v = 0;
        for (int sp = 0; sp < (int)gridDim.y; ++sp)
            v += bits_acc(ld_cg(partials + ((long long)sp * gridDim.x + blockIdx.x) * OUTS + o));
        if (m < M && nbase + r < N) epilogue(v, m, nbase + r, N, w_scale, x_scale, bias, bias_kind, Y);
    }
    if (tid == 0) counters[blockIdx.x] = 0;   // ready for the next launch on this stream
}
"""

# W, Xq, w_scale, x_scale, bias, Y, partials, counters; M, N, K, steps_per_split, bias_kind
SIGNATURE = "p" * 8 + "i" * 5

QUANT_SOURCE = r"""
// omniq dynamic per-token activation quantizer for cuda.w8a8.gemv (symmetric int8), bit-exact with
// the schemes' quantize_activation. Grid (C, M): every CTA of row m reads the whole row for its
// amax (no CTA waits on another), then casts the 16-byte vectors v = tid + QT (c + C i).
// Defines: BF16 (x is bf16, else fp16), QT (threads).
typedef unsigned int u32;

__device__ __forceinline__ float lo_f(u32 w) {
#if BF16
    return __uint_as_float(w << 16);
#else
    float f; asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %1;\n cvt.f32.f16 %0, l;\n}\n" : "=f"(f) : "r"(w)); return f;
#endif
}
__device__ __forceinline__ float hi_f(u32 w) {
#if BF16
    return __uint_as_float(w & 0xffff0000u);
#else
    float f; asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %1;\n cvt.f32.f16 %0, h;\n}\n" : "=f"(f) : "r"(w)); return f;
#endif
}
__device__ __forceinline__ float amax2(u32 w, float a) { return fmaxf(a, fmaxf(fabsf(lo_f(w)), fabsf(hi_f(w)))); }

__device__ __forceinline__ u32 code1(float x, float inv) {
    const int r = __float2int_rn(__fmul_rn(x, inv));   // x * (127 / amax), rounded once, then rint
    return (u32)(min(max(r, -128), 127) & 0xff);
}
__device__ __forceinline__ u32 code2(u32 w, float s, float inv) {
    return code1(lo_f(w), inv) | (code1(hi_f(w), inv) << 8);
}

extern "C" __global__ void __launch_bounds__(QT)
w8a8_quant_act(const unsigned short* __restrict__ X, unsigned char* __restrict__ Q, float* __restrict__ S,
               int K, int ldx) {
#if __CUDA_ARCH__ >= 900
    // a GEMV launched with PDL may start now and stream its weights; its griddepcontrol.wait
    // still waits for this whole grid to finish and its writes to be visible
    asm volatile("griddepcontrol.launch_dependents;\n");
#endif
    __shared__ float part[QT / 32];
    const int m = blockIdx.y, c = blockIdx.x, C = gridDim.x, tid = threadIdx.x;
    const uint4* xr = (const uint4*)(X + (long long)m * ldx);
    const int V = K >> 3;
    float a = 0.f;
#pragma unroll 4
    for (int v = tid; v < V; v += QT) {
        const uint4 d = __ldg(xr + v);
        a = amax2(d.x, a); a = amax2(d.y, a); a = amax2(d.z, a); a = amax2(d.w, a);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if ((tid & 31) == 0) part[tid >> 5] = a;
    __syncthreads();
    a = part[0];
#pragma unroll
    for (int w = 1; w < QT / 32; ++w) a = fmaxf(a, part[w]);
    const float s = __fdiv_rn(a, 127.f), inv = a > 0.f ? __fdiv_rn(127.f, a) : 0.f;
    if (c == 0 && tid == 0) S[m] = s;
    uint2* qr = (uint2*)(Q + (long long)m * K);
    for (int v = tid + c * QT; v < V; v += C * QT) {
        const uint4 d = __ldg(xr + v);
        uint2 o;
        o.x = code2(d.x, s, inv) | (code2(d.y, s, inv) << 16);
        o.y = code2(d.z, s, inv) | (code2(d.w, s, inv) << 16);
        qr[v] = o;
    }
}
"""
# X, Q, S; K, ldx
QUANT_SIGNATURE = "ppp" + "ii"
QUANT_THREADS = 256
QUANTIZERS = ("cuda", "triton")
BIAS_KINDS = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
OUT_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
SMEM_LIMIT = 48 * 1024        # static shared memory of one CTA


# --------------------------------------------------------------------------------------------
# Launch configuration (plain Python: tested on the CPU)
# --------------------------------------------------------------------------------------------
# WN x WK warps per CTA; UNROLL steps (of 64 K-bytes) per warp round, double-buffered in registers;
# ctas_per_sm sizes the K split (about one resident wave)
# pdl: launch the GEMV with Programmatic Dependent Launch (sm_90+; elsewhere a plain launch);
# quant: "cuda" (QUANT_SOURCE: several CTAs per row, lets the PDL GEMV start at once) or "triton"
# (triton_w8a8's quantizer). H200 (benchmarks/results/h200-2026-11-29b/probe_w8a8_pdl.txt): cuda + PDL
# is the fastest or within 2 % of it in 17 of 18 cells (int8 12288x3072 M=1: 14.3 -> 13.9 us);
# sending 2-4 more weight rounds to L2 before the wait cost up to 2 us, so the GEMV sends none.
DEFAULT = {"WN": 1, "WK": 4, "UNROLL": 2, "ctas_per_sm": 4, "MINB": 1, "FP8_MODE": FP8_F16,
           "pdl": True, "quant": "cuda"}
# (fp8|int8, N, K, MT): measured bests on an H200 (benchmarks/probe_w8a8_gemv.py --sweep, whole call
# with the activation quantizer; the sweep's timings vary by ~5 % between runs)
_M16 = {"WN": 2, "WK": 4, "UNROLL": 1, "ctas_per_sm": 2}
TUNED: dict = {
    ("fp8", 3072, 12288, 2): _M16,     # 22.5 us vs 26.1 us default
    ("int8", 3072, 12288, 2): _M16,    # 20.7 us
    ("fp8", 12288, 3072, 2): _M16,     # 17.4 us vs 19.1 us default
    ("int8", 12288, 3072, 2): _M16,    # 16.6 us vs 16.9 us default
}


def m_tiles(m: int) -> int:
    """MMA N-tiles of 8 tokens: 1 for M <= 8, 2 for M <= 16."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"cuda.w8a8.gemv takes 1 <= M <= {MAX_M}, not {m}")
    return 1 if m <= 8 else 2


def config_for(m: int, n: int, k: int, fp8: bool) -> dict:
    cfg = dict(DEFAULT)
    cfg.update(TUNED.get(("fp8" if fp8 else "int8", n, k, m_tiles(m)), {}))
    return cfg


def smem_bytes(cfg: dict, mt: int) -> int:
    """Static shared memory of a variant: the WK-way reduction of the CTA's [8 MT, 16 WN] tile."""
    threads = cfg["WN"] * cfg["WK"] * 32
    return cfg["WK"] * 8 * mt * TILE_N * cfg["WN"] * 4 + 4 * (threads // 32) + 8


def launch_config(m: int, n: int, k: int, sms: int, cfg: dict) -> dict:
    """Grid, block and K split of one launch: (N / 16 / WN) row-tile groups times `split` K
    ranges, each range a whole number of (WK x UNROLL)-step rounds, about cfg['ctas_per_sm']
    CTAs per SM, and no empty split."""
    wn, wk, unroll = cfg["WN"], cfg["WK"], cfg["UNROLL"]
    if wn * wk > 32 or min(wn, wk, unroll) < 1:
        raise ValueError(f"cuda.w8a8.gemv: WN x WK = {wn} x {wk} warps is not a CTA (1..32 warps)")
    mt = m_tiles(m)
    if smem_bytes(cfg, mt) > SMEM_LIMIT:
        raise ValueError(f"cuda.w8a8.gemv: {smem_bytes(cfg, mt)} bytes of shared memory > {SMEM_LIMIT} "
                         f"(fewer warps per CTA)")
    steps = -(-k // STEP_K)
    groups = -(-n // (TILE_N * wn))
    chunk = wk * unroll                       # steps one CTA round consumes
    chunks = -(-steps // chunk)
    want = max(1, round(cfg["ctas_per_sm"] * sms / groups))
    split = max(1, min(want, chunks, cfg.get("max_split", 64)))
    per = -(-chunks // split) * chunk         # steps per split, a whole number of rounds
    split = -(-steps // per)                  # drop splits that would be empty
    return {"grid": (groups, split), "block": (wn * wk * 32,), "split": split, "steps_per_split": per,
            "mt": mt, "rows_per_cta": TILE_N * wn, "outs_per_cta": 8 * mt * TILE_N * wn, "steps": steps}


# --------------------------------------------------------------------------------------------
# Compiled variants
# --------------------------------------------------------------------------------------------
_KERNELS: dict = {}
_LOCK = threading.Lock()


def defines_for(fp8: bool, mt: int, out_dtype: torch.dtype, cfg: dict) -> dict:
    return {"IS_FP8": int(fp8), "FP8_MODE": int(cfg["FP8_MODE"]) if fp8 else 0, "MT": mt,
            "OUT_KIND": OUT_KINDS[out_dtype], "WN": cfg["WN"], "WK": cfg["WK"], "UNROLL": cfg["UNROLL"],
            "MINB": cfg["MINB"]}


def quant_defines(x_dtype: torch.dtype, threads: int = QUANT_THREADS) -> dict:
    return {"BF16": int(x_dtype == torch.bfloat16), "QT": threads}


def kernel_for(defines: dict, source: str = CUDA_SOURCE, name: str = "w8a8_gemv", signature: str = SIGNATURE):
    key = (name, tuple(sorted(defines.items())))
    kern = _KERNELS.get(key)
    if kern is None:
        from omniq.kernels.nvrtc import NvrtcKernel
        with _LOCK:
            kern = _KERNELS.get(key)
            if kern is None:
                kern = _KERNELS[key] = NvrtcKernel(source, name, signature, defines)
    return kern


def quant_kernel_for(x_dtype: torch.dtype, threads: int = QUANT_THREADS):
    return kernel_for(quant_defines(x_dtype, threads), QUANT_SOURCE, "w8a8_quant_act", QUANT_SIGNATURE)


def all_variants() -> list:
    """Every GEMV define set the dispatcher can pick (DEFAULT and TUNED, M tiles, output dtypes,
    PDL on / off) and every quantizer, for tools/nvrtc_offline.py."""
    out, seen = [], set()
    for fp8 in (True, False):
        for mt in (1, 2):
            for dt in (torch.bfloat16, torch.float16):
                for c in [DEFAULT, dict(DEFAULT, pdl=False), *(dict(DEFAULT, **v) for v in TUNED.values())]:
                    for mode in ((FP8_F16, FP8_NATIVE) if fp8 else (FP8_F16,)):
                        d = defines_for(fp8, mt, dt, dict(c, FP8_MODE=mode))
                        key = tuple(sorted(d.items()))
                        if key not in seen:
                            seen.add(key)
                            out.append(kernel_for(d))
    return out + [quant_kernel_for(dt) for dt in (torch.bfloat16, torch.float16)]


def quant_grid(m: int, k: int, sms: int, threads: int = QUANT_THREADS) -> tuple[int, int]:
    """(CTAs per row, M): about one CTA per SM in all, at most one per QT-vector round of the row."""
    rounds = -(-(k // 8) // threads)
    return max(1, min(rounds, sms // m)), m


def quantize_cuda(x: torch.Tensor, fp8: bool, threads: int = QUANT_THREADS):
    """(codes [M, K] int8, s_x fp32 [M], None): dynamic symmetric per-token int8 quantization,
    bit-exact with the schemes' quantize_activation for finite x (NaN / inf are not reproduced:
    fmaxf drops a NaN from the amax).

    int8 only: an e4m3 version of this kernel gave codes that differed from the Triton quantizer's
    on some rows on the H200 (tests/test_gpu_w8a8_gemv.py, 2026-11-29; cause not found), so fp8
    keeps the Triton quantizer, which the schemes' oracle backs."""
    from omniq.kernels._common import sm_count
    if fp8:
        raise KernelError("cuda.w8a8.gemv quantizer: int8 only; fp8 activations use the Triton quantizer "
                          "(triton_w8a8.quantize_activation)")
    m, k = x.shape
    if k % 8 or x.dtype not in (torch.bfloat16, torch.float16):
        raise KernelError(f"cuda.w8a8.gemv quantizer: x [M, K] bf16 / fp16 with K % 8 == 0, got {tuple(x.shape)} "
                          f"{x.dtype}")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s, None
    quant_kernel_for(x.dtype, threads)(x.device, quant_grid(m, k, sm_count(x.device), threads), (threads,),
                                       [x, q, s, k, x.stride(0)])
    return q, s, None


def run_gemv(x: torch.Tensor, p, bias: torch.Tensor | None, cfg: dict | None = None, xq=None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y[M, N] in x.dtype (or out_dtype: fp32 for diagnostics) for a prepared fp8 / int8 W8A8 weight
    with dynamic per-token activations; x is quantized first by cfg['quant'] (or given as
    xq = (q, s_x, azp)), and the GEMV launched with PDL when cfg['pdl'] and xq is None."""
    from omniq.kernels import triton_w8a8 as w8a8
    from omniq.kernels._common import sm_count, tile_counters
    m, k = x.shape
    if not 1 <= m <= MAX_M:
        raise KernelError(f"{where(p.name)}cuda.w8a8.gemv takes 1..{MAX_M} rows, got M={m}")
    if p.act != w8a8.ACT_TOKEN or not p.act_symmetric or p.wmode != w8a8.W_CHANNEL:
        raise KernelError(f"{where(p.name)}cuda.w8a8.gemv serves per-channel weights with dynamic symmetric "
                          f"per-token activations only")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise KernelError(f"{where(p.name)}cuda.w8a8.gemv takes bf16 / fp16 activations, not {x.dtype}")
    if k % K_ALIGN or p.weight.data_ptr() % 16 or p.weight.stride() != (k, 1):
        raise KernelError(f"{where(p.name)}cuda.w8a8.gemv needs a contiguous, 16-byte aligned weight with "
                          f"K % {K_ALIGN} == 0 (K={k})")
    cfg = dict(cfg or config_for(m, p.n, k, p.fp8))
    if cfg.get("quant", "triton") not in QUANTIZERS:
        raise KernelError(f"{where(p.name)}cuda.w8a8.gemv: quant={cfg['quant']!r}, not one of {QUANTIZERS}")
    dev = x.device
    # PDL only right after this call's own quantizer: the GEMV reads the weight before it waits,
    # which is safe because the quantizer (a plain launch) began after every earlier kernel ended.
    # Both quantizers trigger their dependents at once: the CUDA one (int8 only) always, the
    # Triton one (fp8, or quant='triton') when asked, which needs sm_90+ as PDL itself does
    # (without the trigger PDL gained nothing: results/h200-2026-11-29b/probe_w8a8_pdl.txt)
    from omniq.kernels.nvrtc import pdl_reason
    cuda_quant = cfg.get("quant") == "cuda" and not p.fp8
    pdl = bool(cfg.get("pdl")) and xq is None and pdl_reason(dev) is None
    if xq is None:
        xq = quantize_cuda(x, False) if cuda_quant else w8a8.quantize_prepared_activation(x, p, early_trigger=pdl)
    q, xs, _ = xq
    if not q.is_contiguous():
        q = q.contiguous()
    lc = launch_config(m, p.n, k, sm_count(dev), cfg)
    y = torch.empty(m, p.n, dtype=out_dtype or x.dtype, device=dev)
    bias_kind = 0
    if bias is not None:
        if bias.dtype not in BIAS_KINDS or not bias.is_contiguous() or bias.numel() != p.n:
            bias = bias.reshape(-1).float().contiguous()
        bias_kind = BIAS_KINDS[bias.dtype]
    partials = None
    counters = tile_counters(dev, lc["grid"][0])
    if lc["split"] > 1:
        partials = torch.empty(lc["split"] * lc["grid"][0] * lc["outs_per_cta"], dtype=torch.float32, device=dev)
    kern = kernel_for(defines_for(p.fp8, lc["mt"], y.dtype, cfg))
    kern(dev, lc["grid"], lc["block"],
         [p.weight, q, p.w_scale, xs, bias, y, partials, counters, m, p.n, k, lc["steps_per_split"], bias_kind],
         pdl=pdl)
    return y
