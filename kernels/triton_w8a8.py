"""FP8 and INT8 W8A8 in Triton: a fused activation quantizer and GEMMs with the scales in the
epilogue, over one prepared layout ("triton.w8a8.v1").

Layout (shared with the cuda backend's torch._scaled_mm / torch._int_mm kernels):
  weight      int8 | float8_e4m3fn [N, K]   as stored in the checkpoint (K contiguous)
  w_scale     fp32 [N] (per-tensor scales broadcast to N), or [ceil(N/128), ceil(K/128)]
              for DeepSeek-style 128x128 blocks
  colsum      int32 [N] = sum_k W_q[n, k], only for asymmetric int8 activations
  input_scale / input_zero_point: static activation parameters (scalars)

`quantize_activation` computes, per row, exactly what the scheme's `quantize_activation`
does, operation by operation (true division vs multiplication by a reciprocal, round half
to even, saturation before the cast), in one kernel: amax (and min), scale, cast. Rounding
goes through the 1.5 * 2^23 trick and FP8 values are put on the E4M3 grid before the cast,
so the interpreter and every GPU round alike; the launch disables FMA contraction so that
x * (1/s) is rounded before it is rounded to an integer, as in the reference.

The GEMM computes acc[n, m] = W[n, :] . xq[m, :] (swap-AB, int32 or fp32 accumulation),
then y = acc * s_x[m] * s_w[n] (minus azp[m] * colsum[n] first when asymmetric) + bias;
block scales are applied per 128-wide K tile.

fp8 accumulation on sm_90: Hopper's fp8 MMAs add their products into the accumulator with fewer
bits than fp32 (DeepSeek-V3 report, section 3.3.2; Triton accumulates all of K that way by
default there). Measured on the H200 (benchmarks/results/h200-2026-11-29e/probe_fp8_accuracy.txt),
max |y - exact| / sum_k |x_q| |W| over K = 3072..12288: 2^-10.5..-15 with the whole K in the MMA's
accumulator, 2^-14.6..-17 with PROMOTE (each K tile's products into a fresh accumulator, then one
fp32 add, Triton's max_num_imprecise_acc = BLOCK_K). Split-K promotes: no cost measured there
(-7 % to +4 %). The GEMM does not by default, as vLLM's CUTLASS fp8 kernels use Hopper's fast
accumulation: promoting cost it 3-18 % at M = 16-64 and up to 2.4x at M = 512. Pass
cfg PROMOTE=True, or disable the kernel (OMNIQ_DISABLE_KERNELS=triton.w8a8.gemm: cuBLAS's
_scaled_mm, which accumulates in fp32, takes large M), where fp32 accumulation matters. Even one
MMA instruction (K <= 32) rounds its sum: up to about 2^-13 of sum |x_q| |W| (measured 2^-13.6).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.dispatch import Layout
from omniq.errors import KernelError, where
from omniq.kernels._common import (float_dot_dtype, interpreting, launch_grid, layered_config, next_pow2,
                                   sm_count, split_workspace, tl, triton)
from omniq.kernels.triton_affine import tile_counters

if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents
    from omniq.kernels.triton_affine import _tile_epilogue

LAYOUT_NAME = "triton.w8a8.v1"
E4M3_MAX = 448.0
TOKEN_SCALE_MIN = 1.0 / (448.0 * 512.0)   # vLLM's floor on fp8 per-token scales
GROUP_EPS = 1e-10
BLOCK = 128

# activation modes (constexpr ACT of the quantizer)
ACT_TOKEN, ACT_STATIC, ACT_TENSOR, ACT_BLOCK, ACT_TOKEN_DIV, ACT_STATIC_OFFSET = 0, 1, 2, 3, 4, 5
_ACT_CODES = {"dynamic_token": ACT_TOKEN, "static_tensor": ACT_STATIC, "dynamic_tensor": ACT_TENSOR,
              "block": ACT_BLOCK}
# weight scale modes (constexpr WMODE of the GEMM)
W_CHANNEL, W_BLOCK, W_GROUP = 0, 1, 2


@dataclass(eq=False)
class W8A8Prepared:
    """The one device copy of an 8-bit weight for W8A8 (and fp8 W8A16) kernels."""

    weight: torch.Tensor
    w_scale: torch.Tensor                  # [N] | [ceil(N/128), ceil(K/128)] | [G, N]
    w_offset: torch.Tensor | None = None   # [G, N] (W_GROUP only): W = (W_q - offset) * scale
    colsum: torch.Tensor | None = None     # int32 [N] for asymmetric int8 activations
    quant_bias: torch.Tensor | None = None  # int32 [N] (msModelSlim static), added to the int32 sum
    input_scale: torch.Tensor | None = None
    input_zero_point: torch.Tensor | None = None   # int32 [1], or fp32 [1] for ACT_STATIC_OFFSET
    n: int = 0
    k: int = 0
    fp8: bool = True
    act: int | None = ACT_TOKEN            # ACT_* code, None = weight-only
    act_symmetric: bool = True
    wmode: int = W_CHANNEL
    group_size: int = 0                    # W_GROUP
    name: str | None = None


def _adopt_ms_w8a8(qw, dev) -> W8A8Prepared:
    from omniq.schemes.msmodelslim import decode_deq_scale
    t = qw.tensors
    n, k = qw.shape
    return W8A8Prepared(
        weight=t["weight"].contiguous().to(dev), w_scale=decode_deq_scale(t["deq_scale"]).reshape(n).to(dev),
        quant_bias=t["quant_bias"].to(torch.int32).reshape(n).to(dev),
        input_scale=t["input_scale"].float().reshape(1).to(dev),
        input_zero_point=t["input_offset"].float().reshape(1).to(dev),
        n=n, k=k, fp8=False, act=ACT_STATIC_OFFSET, name=qw.name)


def _adopt_ms_w8a8_dynamic(qw, dev) -> W8A8Prepared:
    t = qw.tensors
    n, k = qw.shape
    s = t["weight_scale"].float().reshape(n, -1)
    off = t["weight_offset"].float().reshape(n, -1)
    g = s.shape[1]
    grouped = g > 1 or bool(off.ne(0).any())
    return W8A8Prepared(
        weight=t["weight"].contiguous().to(dev),
        w_scale=(s.t().contiguous() if grouped else s.reshape(n)).to(dev),
        w_offset=off.t().contiguous().to(dev) if grouped and bool(off.ne(0).any()) else None,
        n=n, k=k, fp8=False, act=ACT_TOKEN_DIV, wmode=W_GROUP if grouped else W_CHANNEL,
        group_size=k // g, name=qw.name)


def prepare_w8a8(qw, device) -> W8A8Prepared:
    """Adopt an fp8 / int8 / msModelSlim W8A8 checkpoint weight for the W8A8 kernels."""
    sch = qw.scheme
    t = qw.tensors
    n, k = qw.shape
    dev = torch.device(device)
    if sch.name == "w8a8":
        return _adopt_ms_w8a8(qw, dev)
    if sch.name == "w8a8_dynamic":
        return _adopt_ms_w8a8_dynamic(qw, dev)
    if sch.name not in ("fp8", "int8"):
        raise KernelError(f"{where(qw.name)}{sch.name}: the triton.w8a8 layout takes fp8, int8, w8a8 and "
                          f"w8a8_dynamic weights")
    w = t.get("weight")
    fp8 = w is not None and w.dtype == torch.float8_e4m3fn
    if w is None or (not fp8 and w.dtype != torch.int8):
        raise KernelError(f"{where(qw.name)}{sch.name}: no int8 / float8_e4m3fn `weight` for the triton.w8a8 layout")
    block = getattr(sch, "weight_granularity", "channel") == "block"
    if block:
        ws = t["weight_scale_inv"].float().contiguous()
    else:
        ws = t["weight_scale"].float().reshape(-1)
        ws = (ws.expand(n) if ws.numel() == 1 else ws).contiguous()
    act = getattr(sch, "activation", None)
    sym = getattr(sch, "act_symmetric", True)
    colsum = None
    if not fp8 and act is not None and not sym:
        colsum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
    ins = t.get("input_scale")
    zp = t.get("input_zero_point")
    return W8A8Prepared(
        weight=w.contiguous().to(dev), w_scale=ws.to(dev),
        colsum=None if colsum is None else colsum.to(dev),
        input_scale=None if ins is None else ins.float().reshape(1).to(dev),
        input_zero_point=None if zp is None else zp.to(torch.int32).reshape(1).to(dev),
        n=n, k=k, fp8=fp8, act=None if act is None else _ACT_CODES[act], act_symmetric=sym,
        wmode=W_BLOCK if block else W_CHANNEL, name=qw.name)


LAYOUT = Layout(LAYOUT_NAME, prepare_w8a8)


if triton is not None:

    _TOKEN_MIN = tl.constexpr(TOKEN_SCALE_MIN)
    _GROUP_EPS = tl.constexpr(GROUP_EPS)
    _INV_E4M3 = tl.constexpr(1.0 / E4M3_MAX)
    _TINY = tl.constexpr(1.1754943508222875e-38)   # torch.finfo(float32).tiny (exactly fp32)
    _BIG = tl.constexpr(3.0e38)

    @triton.jit
    def _rint(v):
        """Round half to even (rint) of fp32 v: below 2^23, adding and removing 2^23 rounds to
        an integer; from 2^23 on every fp32 value already is one."""
        a = tl.abs(v)
        r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _e4m3_grid(v):
        """v (fp32, |v| <= 448) rounded half-to-even onto the E4M3 grid, still fp32: the cast
        that follows is then exact on every backend."""
        a = tl.abs(v)
        e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.maximum(e, 121)                       # below 2^-6 the grid step stays 2^-9
        step = ((e - 3) << 23).to(tl.float32, bitcast=True)
        inv = ((257 - e) << 23).to(tl.float32, bitcast=True)
        r = _rint(a * inv) * step
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _remainder(q, s, x):
        """x - q s, exact for a quotient q of x / s rounded to fp32 (one fma)."""
        return tl.fma(-q, tl.zeros_like(q) + s, x)

    @triton.jit
    def _quantize_values(x, s, inv, zp, ACT: tl.constexpr, FP8: tl.constexpr, SYM: tl.constexpr):
        """x (fp32) -> codes (fp32 holding the int8 / e4m3 value), as each scheme does it."""
        if FP8:
            if ACT == 0:
                # x / s correctly rounded without a division per element: with inv = RN(1 / s),
                # q = RN(x inv) and the exact remainder r = x - q s (an fma), RN(q + r inv) is
                # RN(x / s) wherever the quotient is a normal fp32 (Markstein's theorem); below
                # that it rounds to a signed zero on the e4m3 grid either way
                q = x * inv
                v = tl.fma(_remainder(q, s, x), inv, q)
            else:
                v = x * inv
            return _e4m3_grid(tl.clamp(v, -448.0, 448.0))
        if ACT == 4:      # msModelSlim dynamic: x / s, with s = 1 for an all-zero row
            v = _rint(tl.div_rn(x, tl.zeros_like(x) + tl.where(s == 0, 1.0, s)))
        elif ACT == 5:    # msModelSlim static: round(x / s + offset)
            v = _rint(tl.div_rn(x, tl.zeros_like(x) + s) + zp)
        elif ACT == 1 and SYM:
            v = _rint(tl.div_rn(x, tl.zeros_like(x) + s))
        else:
            v = _rint(x * inv) + zp
        return tl.clamp(v, -128.0, 127.0)

    @triton.jit
    def _quant_act_kernel(x_ptr, q_ptr, s_ptr, azp_ptr, in_s_ptr, in_z_ptr,
                          K, stride_xm, stride_qm, n_kb,
                          ACT: tl.constexpr, FP8: tl.constexpr, SYM: tl.constexpr,
                          BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, EARLY_TRIGGER: tl.constexpr = False,
                          SPLIT: tl.constexpr = 1):
        """Statistics, scale (and zero point), then the cast, per row. ONE_PASS keeps the whole row
        in registers (BLOCK_K >= K): one read of x. SPLIT (ONE_PASS only) programs share a row:
        each computes the row's statistics from the whole row (the same arithmetic, so the same
        scale) and casts its BLOCK_K / SPLIT columns, so a decode-size M is not one SM's work.
        EARLY_TRIGGER (sm_90+ only): let a kernel launched after it with Programmatic Dependent
        Launch start at once; that kernel's griddepcontrol.wait still waits for this whole grid
        and its writes."""
        if EARLY_TRIGGER:
            gdc_launch_dependents()
        row = tl.program_id(0)
        part = tl.program_id(1)
        xrow = x_ptr + row * stride_xm
        qrow = q_ptr + row * stride_qm
        offs = tl.arange(0, BLOCK_K)
        if ACT == 3:
            # fp8 1 x 128 groups: one group per step (BLOCK_K == 128)
            for kb in range(0, n_kb):
                kk = kb * BLOCK_K + offs
                ok = kk < K
                x = tl.load(xrow + kk, mask=ok, other=0.0).to(tl.float32)
                amax = tl.max(tl.abs(x), axis=0)
                s = tl.maximum(amax, _GROUP_EPS) * _INV_E4M3
                v = tl.clamp(tl.div_rn(x, tl.zeros_like(x) + s), -448.0, 448.0)
                tl.store(qrow + kk, _e4m3_grid(v).to(q_ptr.dtype.element_ty), mask=ok)
                tl.store(s_ptr + row * n_kb + kb, s)
        else:
            # the row's statistics (dynamic modes)
            amax = 0.0
            lo = _BIG
            hi = -_BIG
            if ONE_PASS:
                ok1 = offs < K
                x1 = tl.load(xrow + offs, mask=ok1, other=0.0).to(tl.float32)
                if ACT == 0 or ACT == 4:
                    amax = tl.max(tl.abs(x1), axis=0)
                    if not SYM:
                        lo = tl.min(tl.where(ok1, x1, _BIG), axis=0)
                        hi = tl.max(tl.where(ok1, x1, -_BIG), axis=0)
            elif ACT == 0 or ACT == 4:
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + offs
                    ok = kk < K
                    x = tl.load(xrow + kk, mask=ok, other=0.0).to(tl.float32)
                    amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
                    if not SYM:
                        lo = tl.minimum(lo, tl.min(tl.where(ok, x, _BIG), axis=0))
                        hi = tl.maximum(hi, tl.max(tl.where(ok, x, -_BIG), axis=0))
            # the scale, its reciprocal and the zero point, as each scheme computes them
            zp = 0.0
            inv = 1.0
            if FP8:
                if ACT == 0:
                    s = tl.maximum(tl.div_rn(amax, 448.0), _TOKEN_MIN)
                    inv = tl.div_rn(1.0, s)
                elif ACT == 1:
                    s = tl.load(in_s_ptr)
                    inv = tl.div_rn(1.0, s)
                else:
                    s = tl.div_rn(tl.load(in_s_ptr), 448.0)      # in_s holds amax(x)
                    inv = tl.where(s > 0, tl.div_rn(1.0, tl.where(s > 0, s, 1.0)), 0.0)
            else:
                if ACT == 0:
                    if SYM:
                        s = tl.div_rn(amax, 127.0)
                        inv = tl.where(amax > 0, tl.div_rn(127.0, tl.where(amax > 0, amax, 1.0)), 0.0)
                    else:
                        s = tl.div_rn(hi - lo, 255.0)
                        s = tl.where(s > 0, s, tl.div_rn(tl.maximum(tl.abs(hi), _TINY), 127.0))
                        inv = tl.div_rn(1.0, s)
                        zp = tl.clamp(_rint(-128.0 - tl.div_rn(lo, s)), -2147483648.0, 2147483648.0)
                elif ACT == 4:
                    s = tl.div_rn(amax, 127.0)
                elif ACT == 5:
                    s = tl.load(in_s_ptr)
                    zp = tl.load(in_z_ptr)
                else:
                    s = tl.load(in_s_ptr)
                    inv = tl.div_rn(1.0, s)
                    if not SYM:
                        zp = tl.load(in_z_ptr).to(tl.float32)
            # quantize
            if SPLIT > 1:
                cols = part * (BLOCK_K // SPLIT) + tl.arange(0, BLOCK_K // SPLIT)
                okc = cols < K
                xc = tl.load(xrow + cols, mask=okc, other=0.0).to(tl.float32)
                q = _quantize_values(xc, s, inv, zp, ACT, FP8, SYM)
                tl.store(qrow + cols, q.to(q_ptr.dtype.element_ty), mask=okc)
            elif ONE_PASS:
                q = _quantize_values(x1, s, inv, zp, ACT, FP8, SYM)
                tl.store(qrow + offs, q.to(q_ptr.dtype.element_ty), mask=ok1)
            else:
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + offs
                    ok = kk < K
                    x = tl.load(xrow + kk, mask=ok, other=0.0).to(tl.float32)
                    q = _quantize_values(x, s, inv, zp, ACT, FP8, SYM)
                    tl.store(qrow + kk, q.to(q_ptr.dtype.element_ty), mask=ok)
            if part == 0:
                if ACT == 5:
                    tl.store(s_ptr + row, 1.0)   # input_scale is inside deq_scale
                else:
                    tl.store(s_ptr + row, s)
                if not FP8:
                    tl.store(azp_ptr + row, zp)

    @triton.jit
    def _w8a8_dot_kernel(
            x_ptr, w_ptr, ws_ptr, wo_ptr, xs_ptr, azp_ptr, colsum_ptr, qb_ptr, bias_ptr, y_ptr,
            wsp_ptr, cnt_ptr,
            M, N, K, stride_xm, stride_wn, stride_ym, n_kb, n_kb_w, GW,
            IS_INT: tl.constexpr, ASYM: tl.constexpr, WMODE: tl.constexpr, HAS_WOFF: tl.constexpr,
            HAS_QBIAS: tl.constexpr, WEIGHT_ONLY: tl.constexpr, DOT_DTYPE: tl.constexpr,
            IEEE: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
            SPLIT_K, USE_SPLIT: tl.constexpr, GROUP_N: tl.constexpr, PROMOTE: tl.constexpr = 0):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        grid_n = tl.cdiv(N, BLOCK_N)
        grid_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_N * grid_m
        first_n = (pid // width) * GROUP_N
        gsize = tl.minimum(grid_n - first_n, GROUP_N)
        pid_n = first_n + (pid % width) % gsize
        pid_m = (pid % width) // gsize
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)
        rm = tl.minimum(offs_m, M - 1)

        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        t0 = pid_k * per_split
        t1 = tl.minimum(t0 + per_split, k_tiles)

        if IS_INT and not WEIGHT_ONLY and WMODE == 0:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for t in range(t0, t1):
            kk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            ok = kk < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=ok[None, :], other=0.0)
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=ok[:, None], other=0.0)
            if WEIGHT_ONLY:
                acc += tl.dot(w.to(DOT_DTYPE), xt.to(DOT_DTYPE), input_precision="ieee" if IEEE else None)
            elif WMODE == 1:     # 128 x 128 weight blocks, 1 x 128 activation groups (BLOCK_K == 128)
                part = tl.dot(w, xt)
                sw = tl.load(ws_ptr + (rn // 128) * n_kb_w + t)
                sx = tl.load(xs_ptr + rm * n_kb + t)
                acc += part * sw[:, None] * sx[None, :]
            elif WMODE == 2:     # per-(channel, group) weight scales; the K tile lies in one group
                if IS_INT:
                    part = tl.dot(w, xt, out_dtype=tl.int32).to(tl.float32)
                else:
                    part = tl.dot(w, xt)
                grp = (t * BLOCK_K) // GW
                if HAS_WOFF:
                    xsum = tl.sum(xt.to(tl.float32), axis=0)
                    part = part - tl.load(wo_ptr + grp * N + rn)[:, None] * xsum[None, :]
                acc += part * tl.load(ws_ptr + grp * N + rn)[:, None]
            elif IS_INT:
                acc = tl.dot(w, xt, acc, out_dtype=tl.int32)
            elif PROMOTE > 0:
                # the tile's products into a fresh MMA accumulator, then one fp32 add (docstring)
                acc = tl.dot(w, xt, acc, max_num_imprecise_acc=PROMOTE)
            else:
                acc = tl.dot(w, xt, acc)

        accf = acc.to(tl.float32)
        if ASYM or HAS_QBIAS:
            if pid_k == 0:  # per-channel constants enter once, not once per split
                if ASYM:
                    cs = tl.load(colsum_ptr + rn).to(tl.float32)
                    az = tl.load(azp_ptr + rm)
                    accf = accf - cs[:, None] * az[None, :]
                if HAS_QBIAS:
                    accf = accf + tl.load(qb_ptr + rn).to(tl.float32)[:, None]
        if WMODE == 0:
            sw = tl.load(ws_ptr + rn)
            if WEIGHT_ONLY:
                accf = accf * sw[:, None]
            else:
                sx = tl.load(xs_ptr + rm)
                accf = accf * sw[:, None] * sx[None, :]
        elif WMODE == 2:
            accf = accf * tl.load(xs_ptr + rm)[None, :]
        _tile_epilogue(accf, y_ptr, bias_ptr, wsp_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                       pid_n * grid_m + pid_m, grid_n * grid_m, pid_k, SPLIT_K, USE_SPLIT, HAS_BIAS, BLOCK_N, BLOCK_M)


# --------------------------------------------------------------------------------------------
# Activation quantization
# --------------------------------------------------------------------------------------------
ONE_PASS_MAX_K = 16384   # rows up to this K stay in registers: x is read once
SPLIT_CHUNK = 1024       # columns cast per program when programs share a row (quant_split)


def quant_split(act: int, m: int, k: int, sms: int = 132) -> int:
    """Programs per row for the activation quantizer: 1, or for a decode-size M of a one-pass mode
    enough that each casts about SPLIT_CHUNK columns (a power of two, so they tile BLOCK_K), while
    the grid keeps to about one program per SM (`sms`; 132 on an H200)."""
    if act == ACT_BLOCK or next_pow2(k) > ONE_PASS_MAX_K:
        return 1
    split = max(1, next_pow2(k) // SPLIT_CHUNK)
    while split > 1 and m * split > sms:
        split //= 2
    return split


def quantize_activation(x: torch.Tensor, act: int, fp8: bool, symmetric: bool = True,
                        input_scale: torch.Tensor | None = None, input_zero_point: torch.Tensor | None = None,
                        early_trigger: bool = False, split: int | None = None):
    """(x_q [M, K] int8 | e4m3, s_x fp32 [M] or [M, ceil(K/128)], azp fp32 [M] or None) for an
    ACT_* mode, in one kernel launch (plus a torch amax for dynamic per-tensor). early_trigger:
    the kernel lets a Programmatic-Dependent-Launch successor start at once (sm_90+ GPUs only;
    the caller checks, see kernels.nvrtc.pdl_reason). split: programs per row (quant_split by
    default; a power of two, one-pass modes only); any split gives the same bits."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    n_kb = -(-k // BLOCK)
    s = torch.empty((m, n_kb) if act == ACT_BLOCK else (m,), dtype=torch.float32, device=x.device)
    azp = torch.empty(m, dtype=torch.float32, device=x.device) if not fp8 else s
    if act == ACT_TENSOR:
        in_s = x.abs().amax().float().reshape(1)
    else:
        in_s = input_scale if input_scale is not None else s
    in_z = input_zero_point if input_zero_point is not None else in_s
    one_pass = act != ACT_BLOCK and next_pow2(k) <= ONE_PASS_MAX_K
    bk = BLOCK if act == ACT_BLOCK else (next_pow2(k) if one_pass else 4096)
    split = quant_split(act, m, k, sm_count(x.device)) if split is None else split
    if split < 1 or split & (split - 1) or (split > 1 and not one_pass) or split > bk:
        raise ValueError(f"quantize_activation: split={split} must be a power of two <= {bk}, and 1 unless the "
                         f"row is cast in one pass (K={k}, act={act})")
    _quant_act_kernel[(m, split)](x, q, s, azp, in_s, in_z, k, x.stride(0), q.stride(0), n_kb,
                            ACT=act, FP8=fp8, SYM=symmetric, BLOCK_K=bk, ONE_PASS=one_pass,
                            EARLY_TRIGGER=early_trigger, SPLIT=split,
                            num_warps=4 if bk <= 1024 else (8 if bk <= 4096 else 16), enable_fp_fusion=False)
    return q, s, (None if fp8 or symmetric or act in (ACT_TOKEN_DIV, ACT_STATIC_OFFSET) else azp)


def quantize_prepared_activation(x: torch.Tensor, p: W8A8Prepared, early_trigger: bool = False):
    return quantize_activation(x, p.act, p.fp8, p.act_symmetric, p.input_scale, p.input_zero_point,
                               early_trigger)


# --------------------------------------------------------------------------------------------
# GEMM configurations (defaults per kernel and M bucket; TUNED: measured bests per shape)
# --------------------------------------------------------------------------------------------
DEFAULTS = {
    # PROMOTE (fp8): see the module docstring; free for split-K on the H200, not for the GEMM
    "splitk": {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "GROUP_N": 1,
               "PROMOTE": True},
    "gemm": {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3,
             "GROUP_N": 8, "SPLIT_K": 1},
}
BY_M = {
    ("gemm", 32): {"BLOCK_M": 32, "num_warps": 4},
    ("gemm", 64): {"BLOCK_M": 64, "num_warps": 4},
    ("gemm", 128): {"BLOCK_M": 64},
    ("splitk", 32): {"BLOCK_M": 32},
    ("splitk", 64): {"BLOCK_M": 64, "BLOCK_K": 128},
}
TUNED: dict = {
    # (kind, fp8|int8, N, K, M bucket): best of benchmarks/probe_int.py on an H200 (dynamic
    # per-token activations, bf16 x, activation quantization included in the time)
    ('gemm', 'fp8', 3072, 12288, 64): {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 30.8 us
    ('gemm', 'fp8', 3072, 12288, 512): {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 62.7 us
    ('gemm', 'fp8', 3072, 12288, 2048): {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 207.8 us
    ('gemm', 'fp8', 8192, 8192, 64): {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 31.6 us
    ('gemm', 'fp8', 8192, 8192, 512): {"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "GROUP_N": 8, "SPLIT_K": 1},  # 57.6 us
    ('gemm', 'fp8', 8192, 8192, 2048): {"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "GROUP_N": 8, "SPLIT_K": 1},  # 241.7 us
    ('gemm', 'fp8', 12288, 3072, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 13.7 us
    ('gemm', 'fp8', 12288, 3072, 512): {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 44.2 us
    ('gemm', 'fp8', 12288, 3072, 2048): {"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "GROUP_N": 8, "SPLIT_K": 1},  # 143.3 us
    ('splitk', 'fp8', 3072, 12288, 1): {"BLOCK_N": 128, "BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 19.5 us
    ('splitk', 'fp8', 3072, 12288, 16): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "GROUP_N": 1},  # 17.2 us
    ('splitk', 'fp8', 3072, 12288, 64): {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "GROUP_N": 1},  # 26.8 us
    ('splitk', 'fp8', 8192, 8192, 1): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 24.6 us
    ('splitk', 'fp8', 8192, 8192, 16): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 24.3 us
    ('splitk', 'fp8', 8192, 8192, 64): {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 30.0 us
    ('splitk', 'fp8', 12288, 3072, 1): {"BLOCK_N": 128, "BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 16.6 us
    ('splitk', 'fp8', 12288, 3072, 16): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 12.0 us
    ('splitk', 'fp8', 12288, 3072, 64): {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 17.0 us
    ('gemm', 'int8', 3072, 12288, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 36.3 us
    ('gemm', 'int8', 3072, 12288, 512): {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 56.6 us
    ('gemm', 'int8', 3072, 12288, 2048): {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 183.3 us
    ('gemm', 'int8', 8192, 8192, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 33.3 us
    ('gemm', 'int8', 8192, 8192, 512): {"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "GROUP_N": 8, "SPLIT_K": 1},  # 67.4 us
    ('gemm', 'int8', 8192, 8192, 2048): {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 302.7 us
    ('gemm', 'int8', 12288, 3072, 64): {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 12.7 us
    ('gemm', 'int8', 12288, 3072, 512): {"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "GROUP_N": 8, "SPLIT_K": 1},  # 49.3 us
    ('gemm', 'int8', 12288, 3072, 2048): {"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "GROUP_N": 8, "SPLIT_K": 1},  # 157.5 us
    ('splitk', 'int8', 3072, 12288, 1): {"BLOCK_N": 128, "BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 16.3 us
    ('splitk', 'int8', 3072, 12288, 16): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "GROUP_N": 1},  # 14.0 us
    ('splitk', 'int8', 3072, 12288, 64): {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "GROUP_N": 1},  # 23.2 us
    ('splitk', 'int8', 8192, 8192, 1): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 24.7 us
    ('splitk', 'int8', 8192, 8192, 16): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 24.0 us
    ('splitk', 'int8', 8192, 8192, 64): {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "GROUP_N": 1},  # 30.1 us
    ('splitk', 'int8', 12288, 3072, 1): {"BLOCK_N": 128, "BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 14.7 us
    ('splitk', 'int8', 12288, 3072, 16): {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 10.3 us
    ('splitk', 'int8', 12288, 3072, 64): {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "waves": 2, "GROUP_N": 1},  # 16.2 us
}
SPLITK_MAX_M = 64


def config_for(kind: str, m: int, n: int, k: int, fp8: bool = True) -> dict:
    return layered_config(DEFAULTS, BY_M, TUNED, kind, m, (kind, "fp8" if fp8 else "int8", n, k))


MIN_BLOCK_K = 32   # 8-bit tensor-core dots need K >= 32 per instruction


def group_block_k(bk: int, k: int, g: int) -> int | None:
    """A BLOCK_K (>= 32) that keeps every K tile inside one weight group, or None."""
    bk = max(MIN_BLOCK_K, min(bk, next_pow2(k)))
    if g >= k:
        return bk
    while bk >= MIN_BLOCK_K and g % bk:
        bk //= 2
    return bk if bk >= MIN_BLOCK_K else None


def run_dot(x: torch.Tensor, p: W8A8Prepared, bias: torch.Tensor | None, kind: str = "gemm",
            cfg: dict | None = None, xq=None) -> torch.Tensor:
    """y[M, N] in x.dtype: quantize x (unless weight-only, or given as xq), then the Triton GEMM."""
    m = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = dict(cfg or config_for(kind, m, p.n, p.k, p.fp8))
    weight_only = p.act is None
    if weight_only:
        if p.wmode != W_CHANNEL:
            raise KernelError(f"{where(p.name)}block-scaled fp8 weights without activation quantization are "
                              f"not supported by the triton.w8a8 kernels")
        xq, xs, azp = x, p.w_scale, None
        dot_dtype, ieee = float_dot_dtype(x.dtype)
    else:
        xq, xs, azp = xq if xq is not None else quantize_prepared_activation(x, p)
        dot_dtype, ieee = tl.float32, False
    if p.wmode == W_BLOCK:
        bk = BLOCK
    elif p.wmode == W_GROUP:
        bk = group_block_k(cfg["BLOCK_K"], p.k, p.group_size)
        if bk is None:
            raise KernelError(f"{where(p.name)}weight group size {p.group_size} is not a multiple of {MIN_BLOCK_K}")
    else:
        bk = max(MIN_BLOCK_K, min(cfg["BLOCK_K"], next_pow2(p.k)))
    bn, bm, tiles, split = launch_grid(cfg, p.n, m, -(-p.k // bk), x.device)
    y = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    wsp, cnt = split_workspace(split, tiles, bn, bm, x.device, tile_counters)
    n_kb_w = p.w_scale.shape[1] if p.wmode == W_BLOCK else 1

    def opt(t):
        return t if t is not None else xs

    _w8a8_dot_kernel[(tiles, split)](
        xq, p.weight, p.w_scale, opt(p.w_offset), xs, opt(azp), opt(p.colsum), opt(p.quant_bias), opt(bias),
        y, wsp, cnt,
        m, p.n, p.k, xq.stride(0), p.weight.stride(0), y.stride(0), -(-p.k // BLOCK), n_kb_w, max(p.group_size, 1),
        IS_INT=not p.fp8, ASYM=azp is not None, WMODE=p.wmode, HAS_WOFF=p.w_offset is not None,
        HAS_QBIAS=p.quant_bias is not None, WEIGHT_ONLY=weight_only,
        DOT_DTYPE=dot_dtype, IEEE=ieee, HAS_BIAS=bias is not None,
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split, USE_SPLIT=split > 1, GROUP_N=cfg.get("GROUP_N", 1),
        PROMOTE=bk if p.fp8 and cfg.get("PROMOTE") else 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


# --------------------------------------------------------------------------------------------
# Epilogue for an int32 product computed elsewhere (torch._int_mm)
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _int_epilogue_kernel(acc_ptr, ws_ptr, xs_ptr, azp_ptr, colsum_ptr, qb_ptr, bias_ptr, y_ptr, M, N,
                             ASYM: tl.constexpr, HAS_QBIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.float32)
        rmc = tl.minimum(rm, M - 1)
        rnc = tl.minimum(rn, N - 1)
        if ASYM:
            acc = acc - tl.load(azp_ptr + rmc)[:, None] * tl.load(colsum_ptr + rnc).to(tl.float32)[None, :]
        if HAS_QBIAS:
            acc = acc + tl.load(qb_ptr + rnc).to(tl.float32)[None, :]
        acc = acc * tl.load(xs_ptr + rmc)[:, None] * tl.load(ws_ptr + rnc)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rnc).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def int_epilogue(acc: torch.Tensor, p: W8A8Prepared, xs: torch.Tensor, azp: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = ((acc - azp*colsum + quant_bias) * s_x * s_w + bias).to(out_dtype), one pass over acc."""
    m, n = acc.shape
    if triton is None or (acc.device.type == "cpu" and not interpreting()):
        y = acc.float()
        if azp is not None:
            y = y - azp.reshape(-1, 1) * p.colsum.float().reshape(1, -1)
        if p.quant_bias is not None:
            y = y + p.quant_bias.float().reshape(1, -1)
        y = y * xs.reshape(-1, 1) * p.w_scale.reshape(1, -1)
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)
    y = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    acc = acc.contiguous()
    bm, bn = 32, 128
    _int_epilogue_kernel[(-(-m // bm), -(-n // bn))](
        acc, p.w_scale, xs, azp if azp is not None else xs, p.colsum if p.colsum is not None else xs,
        p.quant_bias if p.quant_bias is not None else xs, bias if bias is not None else xs, y, m, n,
        ASYM=azp is not None, HAS_QBIAS=p.quant_bias is not None, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y
