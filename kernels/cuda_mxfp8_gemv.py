"""MXFP8 GEMV for decode-size M (1..16) on NVIDIA tensor cores (CUDA C++, NVRTC), W8A8 and W8A16.

Reads the "triton.mxfp8.v1" layout in place (kernels/triton_mx.py; no second copy): the
checkpoint's e4m3 weight [N, K], relative E8M0 bytes srel = s - smax + 253 as [G, N] and the
row's rexp = smax - 127 (-128: a NaN scale in the row). One warp owns 16 output rows and a K
range; per 64-byte step of a row each lane loads 16 bytes of rows g and g + 8 (bytes 16t..16t+15,
g = lane / 4, t = lane % 4: 16 consecutive K inside one group of 32) and the same 16 K of x
(two 16-byte loads per token tile). As in cuda_fp4_mma, the MMA's k slots (2t, 2t+1) and
(2t+8, 2t+9) of `mma.sync.m16n8k16` take K 4q, 4q+1 and 4q+2, 4q+3 of word q of those loads for
both the weight (A) and x (B), so no shuffles or shared memory sit between the loads and the MMA.

Decode, exact: an e4m3 byte's low 7 bits shifted left by 4 (the sign moved to bit 15) are the
bf16 whose value is the e4m3 value x 2^-120, subnormals included (4 exponent bits land in the
low bits of bf16's 8, 3 mantissa bits on top of its 7). One packed bf16 fma by 2^(srel - 133),
the group's 2^(s - smax) x 2^120, gives e4m3 x 2^(s - smax): at most 4 significant bits, exact
in bf16 while its lowest bit is >= 2^-133, i.e. for every group at most 2^124 below the row's
largest (smaller groups lose low bits, as in triton.mxfp8.splitk's bf16 path). The products
with bf16 x are exact in the MMA's fp32 accumulation; 2^rexp multiplies the fp32 sum.

Loads: each warp keeps PF steps in flight (a ring of PF + 1 register buffers, the loop unrolled
by its size, so the loads of a round take constant offsets from pointers advanced once per
round), weight bytes with ld.global.nc.L1::no_allocate (read once), x through L1 (every warp of
the row tiles reads it); only a step crossing K takes the predicated, zero-filling loads. Split-K
across CTAs fills the SMs as in cuda_fp4_mma.

An e4m3 NaN code (0x7F / 0xFF) would decode to a finite number, so each 32-bit weight word
also feeds a NaN test ((w & 0x7F7F7F7F) + 0x01010101 carries into bit 7 of a byte exactly when
its low 7 bits are all ones); a row that saw one gets NaN partials (NANCHK 0 drops the test).

Activations: W8A8 (the scheme's per-32 E8M0 x e4m3 quantization of x) runs the exact Triton
pass `triton_mx.fake_quantize_mxfp8_activation` first; its bf16 P x 2^E feeds the bf16 MMA for
bf16 x. (Quantizing x inside the GEMV instead, to save that launch, measured 1.3-1.6x slower on
the H200 at M = 1-16: results/h200-2026-11-29b/probe_mxfp8_gemv.txt, "p2"; it was removed.)
W8A16 multiplies x as given. Activations are bf16 only: fp16's 11-bit significands do not fit
bf16's 8, and an fp16 W8A8 case overflowed differently from the reference on the H200; fp16
stays on the triton.mxfp8 kernels. y is written by the shared store_tile (split-K with a
deterministic, in-order sum).
"""
from __future__ import annotations

import torch

from omniq.kernels import cuda_common
from omniq.kernels.cuda_common import PRELUDE, TARGET_CTAS
from omniq.kernels.nvrtc import NvrtcKernel
from omniq.kernels.triton_mx import REXP_NAN, SREL_TOP

SOURCE = PRELUDE + r"""
__device__ __forceinline__ u32 word(const U4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
__device__ __forceinline__ float pow2i(int e) { return __uint_as_float((u32)(e + 127) << 23); }

// bf16 x, bf16 MMA, bf16 y (BF16 1 picks y's type for store_tile)
__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// relative E8M0 byte -> bf16x2 of 2^(srel - 133) (normal from srel 7, subnormal below)
__device__ __forceinline__ u32 factor2(u32 srel) {
    const u32 f = srel >= 7u ? (srel - 6u) << 7 : 1u << srel;
    return f | (f << 16);
}

// four e4m3 bytes -> bf16x2 of bytes (0, 1) and (2, 3), each e4m3 x 2^-120, times the factor f
__device__ __forceinline__ void decode4(u32 w, u32 f, u32& lo, u32& hi) {
    const u32 l = (w << 4) & 0xF0F0F0F0u;                        // bf16 low bytes: e0 m2 m1 m0 0000
    const u32 h = ((w >> 4) & 0x07070707u) | (w & 0x80808080u);  // bf16 high bytes: s 0000 e3 e2 e1
    lo = __byte_perm(l, h, 0x5140);
    hi = __byte_perm(l, h, 0x7362);
    asm("fma.rn.bf16x2 %0, %0, %1, %2;" : "+r"(lo) : "r"(f), "r"(0x80008000u));
    asm("fma.rn.bf16x2 %0, %0, %1, %2;" : "+r"(hi) : "r"(f), "r"(0x80008000u));
}

struct Step {
    U4 wa, wb;          // bytes 16t..16t+15 of the step in rows g and g+8
    U4 x[MT][2];        // x[m][k .. k+15] (bf16), m = 8 mt + g
    u32 sa, sb;         // relative scale bytes of that group in rows g and g+8
};

// 16 bytes, or with G (the last, partial step) zeros where ok is false (past K). Weight bytes
// are read once: kept out of L1 (x lives there), 256-byte L2 lines; x goes through L1 (every row
// tile reads it).
#define LD16(G, OP) /* the asm of a 16-byte load */ \
    U4 r; \
    if (G) asm("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n" \
               " mov.b32 %2, 0;\n mov.b32 %3, 0;\n @p " OP " {%0, %1, %2, %3}, [%4];\n}" \
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "r"((int)ok)); \
    else asm(OP " {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p)); \
    return r;
template <bool G> __device__ __forceinline__ U4 ld_weight(const unsigned char* p, bool ok) {
    LD16(G, "ld.global.nc.L1::no_allocate.L2::256B.v4.u32")
}
template <bool G> __device__ __forceinline__ U4 ld_x(const u16* p, bool ok) {
    LD16(G, "ld.global.nc.v4.u32")
}

// a lane's fixed pointers: its 16-byte column (16t) of rows g, g+8 and of tokens 8 mt + g (rows
// past N / M read the last one; their results are never stored), and its scale bytes
struct Ptrs {
    const unsigned char* wa;
    const unsigned char* wb;
    const unsigned char* sa;
    const unsigned char* sb;
    const u16* x[MT];
};

// P advanced by s steps: the loads of step s + j then take constant offsets (j 64 bytes)
__device__ __forceinline__ Ptrs advance(const Ptrs& P, int s, int N) {
    Ptrs Q;
    Q.wa = P.wa + (long)s * 64;
    Q.wb = P.wb + (long)s * 64;
    Q.sa = P.sa + (long)(2 * s) * N;
    Q.sb = P.sb + (long)(2 * s) * N;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) Q.x[mt] = P.x[mt] + (long)s * 64;
    return Q;
}

// step st = s + j (Q = P advanced by s): 64 K from st * 64; this lane's 16 lie in scale group
// 2 st + t / 2 (K % 16 == 0: a run of 16 is all in or all out)
template <bool G>
__device__ __forceinline__ void load_step(Step& B, const Ptrs& Q, int j, int st, int K, int N, int t) {
    const bool ok = !G || st * 64 + 16 * t < K;
    B.wa = ld_weight<G>(Q.wa + j * 64, ok);
    B.wb = ld_weight<G>(Q.wb + j * 64, ok);
    const long so = (long)(2 * j) * N;
    B.sa = ok ? Q.sa[so] : 1u;
    B.sb = ok ? Q.sb[so] : 1u;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        B.x[mt][0] = ld_x<G>(Q.x[mt] + j * 64, ok);
        B.x[mt][1] = ld_x<G>(Q.x[mt] + j * 64 + 8, ok);
    }
}
// the guarded form only for a step that crosses K (the last one when K % 64 != 0)
__device__ __forceinline__ void load_any(Step& B, const Ptrs& Q, int j, int st, int K, int N, int t) {
    if ((st + 1) * 64 <= K) load_step<false>(B, Q, j, st, K, N, t);
    else load_step<true>(B, Q, j, st, K, N, t);
}


__device__ __forceinline__ u32 nan_bits(const U4& v) {
    // bit 7 of a byte set: that byte's low 7 bits are all ones (e4m3 NaN)
    return ((v.x & 0x7F7F7F7Fu) + 0x01010101u) | ((v.y & 0x7F7F7F7Fu) + 0x01010101u) |
           ((v.z & 0x7F7F7F7Fu) + 0x01010101u) | ((v.w & 0x7F7F7F7Fu) + 0x01010101u);
}

__device__ __forceinline__ float row_factor(const signed char* rexp, int r) {
    const int e = rexp[r];
    if (e == REXP_NAN) return __int_as_float(0x7fc00000);
    const int h = e >> 1;                        // two normal halves: 2^-127 .. 2^127
    return pow2i(h) * pow2i(e - h);
}

extern "C" __global__ void __launch_bounds__(128, MINB) mxfp8_gemv(
        const u16* __restrict__ x, const unsigned char* __restrict__ qw,
        const unsigned char* __restrict__ scales, const signed char* __restrict__ rexp,
        const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
        int M, int N, int K, int sx, int bps, int S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = (blockIdx.x * 4 + warp) * 16;
    const int nst = (K + 63) / 64;
    const int s0 = blockIdx.y * bps;
    const int s1 = min(s0 + bps, nst);
    const int ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) { acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f; }
    u32 nana = 0u, nanb = 0u;

    // a ring of PF + 1 steps: step s lives in buf[(s - s0) % (PF + 1)], PF steps are in flight
    // while one is multiplied; the loop is unrolled by the ring size so every index is static
    Ptrs P;
    P.wa = qw + (long)ra * K + 16 * t;
    P.wb = qw + (long)rb * K + 16 * t;
    P.sa = scales + (long)(t >> 1) * N + ra;
    P.sb = scales + (long)(t >> 1) * N + rb;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) P.x[mt] = x + (long)min(mt * 8 + g, M - 1) * sx + 16 * t;
    Step buf[PF + 1];
    {
        const Ptrs Q = advance(P, s0, N);
#pragma unroll
        for (int j = 0; j < PF; ++j)
            if (s0 + j < s1) load_any(buf[j], Q, j, s0 + j, K, N, t);
    }
    for (int s = s0; s < s1; s += PF + 1) {
    const Ptrs Q = advance(P, s, N);
#pragma unroll
    for (int j = 0; j <= PF; ++j) {
        if (s + j >= s1) break;
        if (s + j + PF < s1) load_any(buf[(j + PF) % (PF + 1)], Q, j + PF, s + j + PF, K, N, t);
        Step& cur = buf[j];
        const u32 fa = factor2(cur.sa), fb = factor2(cur.sb);
#if NANCHK
        nana |= nan_bits(cur.wa);
        nanb |= nan_bits(cur.wb);
#endif
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            u32 la, ha, lb, hb;          // K 4q, 4q+1 (slots 2t, 2t+1) and 4q+2, 4q+3 (slots 2t+8, 2t+9)
            decode4(word(cur.wa, q), fa, la, ha);
            decode4(word(cur.wb, q), fb, lb, hb);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mma_bf16(acc[mt], la, lb, ha, hb, word(cur.x[mt][q >> 1], (2 * q) & 3),
                         word(cur.x[mt][q >> 1], (2 * q + 1) & 3));
        }
    }
    }
#if NANCHK
    // the row's four K lanes share what they saw; a NaN partial makes the split sum NaN
    nana |= __shfl_xor_sync(0xffffffffu, nana, 1); nana |= __shfl_xor_sync(0xffffffffu, nana, 2);
    nanb |= __shfl_xor_sync(0xffffffffu, nanb, 1); nanb |= __shfl_xor_sync(0xffffffffu, nanb, 2);
    const float qnan = __int_as_float(0x7fc00000);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        if (nana & 0x80808080u) acc[mt][0] = acc[mt][1] = qnan;
        if (nanb & 0x80808080u) acc[mt][2] = acc[mt][3] = qnan;
    }
#endif
    store_tile<MT>(acc, row_factor(rexp, ra), row_factor(rexp, rb), bias, y, ws, cnt, n0, g, t, M, N, S);
}
"""

# x, qw, scales, rexp, bias, y, ws, cnt | M, N, K, sx, bps, S
SIGNATURE = "p" * 8 + "i" * 6
MAX_M = 16
STEP_K = 64             # K (bytes of a weight row) per warp step
# knobs the probe sweeps: steps in flight (1..4; None: 3 for one token tile, 2 for two) and the NaN test
PREFETCH = None
NANCHK = True
# resident CTAs per SM the compiler must allow (registers <= 65536 / (128 MIN_BLOCKS)): the split
# target TARGET_CTAS assumes 4
MIN_BLOCKS = 4

_VARIANTS: dict = {}


def variant(mt: int, has_bias: bool, pf: int | None = None,
            nanchk: bool | None = None) -> NvrtcKernel:
    """One specialisation (x is bf16: the quantized activation, or x itself for W8A16)."""
    if pf is None:
        pf = PREFETCH if PREFETCH is not None else (3 if mt == 1 else 2)
    nanchk = NANCHK if nanchk is None else nanchk
    key = (mt, has_bias, pf, nanchk, MIN_BLOCKS)
    k = _VARIANTS.get(key)
    if k is None:
        k = NvrtcKernel(SOURCE, "mxfp8_gemv", SIGNATURE,
                        defines={"BF16": 1, "MT": mt, "HAS_BIAS": has_bias, "PF": pf,
                                 "NANCHK": nanchk, "REXP_NAN": f"({REXP_NAN})", "MINB": MIN_BLOCKS})
        _VARIANTS[key] = k
    return k


def launch_config(m: int, n: int, k: int, target_ctas: int | None = None,
                  capacity: int | None = None) -> tuple[int, int, int, int]:
    """(row tiles, splits, steps per split, token tiles) for M x N over K."""
    return cuda_common.launch_config(m, n, -(-k // STEP_K), target_ctas or TARGET_CTAS, capacity=capacity)


def activation_reason(scheme, act_dtype: torch.dtype) -> str | None:
    """Why x of this dtype cannot be fed exactly (W8A16 multiplies x itself on bf16 MMAs)."""
    if act_dtype != torch.bfloat16:
        return (f"activations must be bf16, not {act_dtype} (the bf16 MMA holds bf16 x and the quantized "
                f"activation exactly, not fp16's 11-bit significands); the triton.mxfp8 kernels serve it")
    return None


def unsupported(p) -> str | None:
    """Why this prepared triton.mxfp8.v1 weight cannot run here."""
    if p.scheme is None or p.scheme.name != "mxfp8":
        return "not an mxfp8 weight"
    if p.k % 16:
        return f"K={p.k}: needs K % 16 == 0 (16-byte weight and x loads)"
    w = p.weight
    if w.dim() != 2 or w.stride(1) != 1 or w.stride(0) != p.k or w.data_ptr() % 16:
        return "weight rows must be contiguous and 16-byte aligned"
    if p.scales.shape[0] < -(-p.k // 32) or not p.scales.is_contiguous():   # (strides of size-1 dims are free)
        return f"scales must be contiguous [G >= {-(-p.k // 32)}, N={p.n}]"
    return None


def _operand(x: torch.Tensor, p) -> torch.Tensor:
    """The bf16 x the MMA reads: the scheme's exact per-32 fake quantization (W8A8), else x."""
    if p.scheme.activation is not None:
        from omniq.kernels.triton_mx import fake_quantize_mxfp8_activation
        return fake_quantize_mxfp8_activation(x, p.scheme.scale_rule)
    return x


def run(x: torch.Tensor, p, bias: torch.Tensor | None) -> torch.Tensor:
    """y[M, N] = fq(x) @ W^T (+ bias) for M <= 16, x bf16 [M, K], W in triton.mxfp8.v1."""
    x = cuda_common.checked_input("cuda.mxfp8.gemv", p, x, unsupported, MAX_M)
    why = activation_reason(p.scheme, x.dtype)
    if why:
        from omniq.errors import KernelError, where
        raise KernelError(f"{where(p.name)}cuda.mxfp8.gemv: {why}")
    xk = _operand(x, p)
    (m, k), n = x.shape, p.n
    kern = variant(cuda_common.mma_tiles(m), bias is not None)
    tiles, splits, bps, _ = launch_config(m, n, k, TARGET_CTAS, kern.resident_ctas(x.device, 128))
    y, ws, cnt, bias = cuda_common.outputs(x, n, splits, tiles, bias)
    kern(x.device, (tiles, splits), (128,),
         [xk, p.weight.view(torch.uint8), p.scales, p.rexp, bias, y, ws, cnt, m, n, k, xk.stride(0), bps, splits])
    return y


def all_variants() -> list[NvrtcKernel]:
    """Every specialisation (compile checks)."""
    return [variant(mt, hb, pf, nc) for mt in (1, 2) for hb in (False, True) for pf in (1, 2, 3, 4)
            for nc in (True, False)]


assert SREL_TOP == 253   # factor2's 2^(srel - 133) assumes srel = s - smax + 253
