"""CPU kernels built on PyTorch's own CPU operators, chosen where they beat dequantize-then-matmul.

cpu.int8.int_mm / .int_mm_t   int8 W8A8 (int8 dynamic/static, sym/asym activations; msModelSlim
                              W8A8 static and W8A8 dynamic): the activation is quantized in torch
                              exactly as the scheme does it, `torch._int_mm` gives the exact int32
                              product, the scales (and zero-point / quant_bias terms) are applied
                              in an fp32 epilogue. `_t` computes (W @ x_q^T)^T, which oneDNN runs
                              faster for small M on a row-major [N, K] weight.
cpu.int8.int8pack             int8 weight-only (W8A16): `torch._weight_int8pack_mm`.
    all three share the layout "cpu.int8.nk": the checkpoint's int8 [N, K] weight, untouched.
cpu.int8.fbgemm               the same W8A8 schemes on fbgemm's packed weight ("cpu.int8.fbgemm"
                              layout, packed once by torch.ops.quantized.linear_prepack): the
                              fastest int8 GEMM here for small M (it packs once; _int_mm repacks
                              per call). Valid where a self-test shows its product exact (VNNI).
cpu.int4.tinygemm             4-bit grouped weight-only (GPTQ incl. act-order, AWQ, AutoRound):
                              `_weight_int4pack_mm_for_cpu` on one "cpu.int4.packed" layout
                              (`_convert_weight_to_int4pack_for_cpu` codes, bf16 scale/zero pairs,
                              the act-order permutation of K). The op dequantizes in registers
                              and multiplies with fp32 FMAs, 4 rows at a time: it beats the bf16
                              matmul while that is memory-bound (small M), not once it is
                              compute-bound (oneDNN's bf16 dot products do twice the work per
                              instruction).
cpu.int8.dequant_mm           int8 weight-only for large M (same layout): W_q -> bf16 * scale, one bf16 GEMM.
cpu.int4.dequant_mm           4-bit grouped weight-only for large M (same packed layout): decode the
                              nibbles and group scales per call, one bf16 GEMM.
cpu.fp8.scaled_mm             fp8 W8A8 through `torch._scaled_mm`: this build runs it on the CPU,
                              but without fp8 units it is far slower than dequantizing, so its
                              priority is below the reference; only a measurement can choose it.
cpu.dequant                   every omniq scheme: dequantize per call, then one bf16 (bf16 activations)
                              or fp32 matmul. Slow, valid, holds nothing but the checkpoint.
cpu.dequant.cached            every omniq scheme: a bf16 copy of the dequantized weight made once. It
                              breaks the one-copy memory rule, so it is an explicit opt-in:
                              OMNIQ_CPU_DEQUANT_CACHE=1.

Every kernel returns y in x's dtype; the tests hold each to `scheme.matmul`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omniq.dispatch import CHECKPOINT, Kernel, Layout, register_kernel
from omniq.errors import KernelError, where
from omniq.schemes.base import QuantizedWeight
from omniq.schemes.fp8 import fp8_activation_codes
from omniq.schemes.int8 import int8_azp_codes, int8_token_asym_params, int8_token_codes
from omniq.schemes.msmodelslim import quantize_per_token_int8

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CACHE_ENV = "OMNIQ_CPU_DEQUANT_CACHE"
MEMORY_SLACK = 1.05  # a prepared layout may hold this much over the scheme's nominal bytes


def cpu_reason(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"runs on the CPU, not on {device.type}"


class _Cpu(Kernel):
    backend = "cpu"
    aten_ops: tuple[str, ...] = ()  # torch.ops.aten operators the kernel needs

    def available(self, device):
        why = cpu_reason(device)
        if why:
            return why
        for op in self.aten_ops:
            if not hasattr(torch.ops.aten, op):
                return f"this torch ({torch.__version__}) has no torch.ops.aten.{op}"
        return None

    def can_implement(self, pr):
        if pr.act_dtype not in _ACT_DTYPES:
            return f"activations must be bf16, fp16 or fp32, not {pr.act_dtype}"
        return None


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp32 (or any) y -> + bias -> x's dtype, contiguous."""
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(dtype).contiguous()


# =============================================================================================
# int8 weights: W8A8 through torch._int_mm, W8A16 through torch._weight_int8pack_mm
# =============================================================================================
INT8_SCHEMES = ("int8", "w8a8", "w8a8_dynamic")
QMIN, QMAX = -128, 127


@dataclass
class Int8Prepared:
    """The int8 [N, K] weight as stored, with what the activation quantizer and epilogue need.

    act: "token_sym" | "token_asym" | "static_sym" | "static_asym"   (int8 scheme)
         "ms_static" | "ms_token"                                     (msModelSlim w8a8 / w8a8_dynamic)
         "none"                                                        (weight-only)
    """

    weight: torch.Tensor               # int8 [N, K]
    w_scale: torch.Tensor              # fp32 [N]: per-channel weight scale (ms_static: deq_scale)
    act: str
    in_scale: torch.Tensor | None = None   # fp32 (1,): static activation scale
    in_zp: torch.Tensor | None = None      # fp32 (1,): static zero point / msModelSlim input_offset
    colsum: torch.Tensor | None = None     # int32 [N]: sum_k W_q[n, k], for zero-point corrections
    quant_bias: torch.Tensor | None = None  # int32 [N] (ms_static)
    w_offset: torch.Tensor | None = None   # fp32 [N] (ms_token with non-zero weight_offset)


def _int8_act_mode(scheme) -> str:
    if scheme.name == "w8a8":
        return "ms_static"
    if scheme.name == "w8a8_dynamic":
        return "ms_token"
    if scheme.activation is None:
        return "none"
    kind = "token" if scheme.activation == "dynamic_token" else "static"
    return f"{kind}_{'sym' if scheme.act_symmetric else 'asym'}"


def _prepare_int8(qw: QuantizedWeight, device) -> Int8Prepared:
    s = qw.scheme
    n, _ = qw.shape
    t = {k: v.to(device) for k, v in qw.tensors.items()}
    w = t["weight"].contiguous()
    act = _int8_act_mode(s)
    p = Int8Prepared(weight=w, w_scale=t.get("weight_scale", torch.ones(1)).float().reshape(-1), act=act)
    if act == "ms_static":
        from omniq.schemes.msmodelslim import decode_deq_scale
        p.w_scale = decode_deq_scale(t["deq_scale"]).reshape(n)
        p.in_scale = t["input_scale"].float().reshape(1)
        p.in_zp = t["input_offset"].float().reshape(1)
        p.quant_bias = t["quant_bias"].to(torch.int32).reshape(n)
    elif act == "ms_token":
        off = t["weight_offset"].float().reshape(n)
        if bool(off.ne(0).any()):
            p.w_offset = off
    elif act.startswith("static"):
        p.in_scale = t["input_scale"].float().reshape(1)
        if act == "static_asym":
            p.in_zp = t["input_zero_point"].float().reshape(1)
    if act in ("token_asym", "static_asym"):
        p.colsum = w.sum(dim=1, dtype=torch.int32)
    return p


INT8_LAYOUT = Layout("cpu.int8.nk", _prepare_int8)


def quantize_int8_activation(x: torch.Tensor, p: Int8Prepared):
    """(codes int8 [M, K], scale fp32 [M, 1] or (1,) (None for ms_static, whose deq_scale holds it),
    zero point fp64 [M, 1] / (1,) or None), computed operation by operation as the scheme's
    `quantize_activation` does, so that the codes are the scheme's codes, ties included."""
    xf = x.float()
    act = p.act
    if act == "token_sym":  # int8.quantize_activation, dynamic_token, symmetric
        q, s = int8_token_codes(xf)
        return q.to(torch.int8), s, None
    if act == "token_asym":
        s, azp = int8_token_asym_params(xf)
        return int8_azp_codes(xf, s, azp).to(torch.int8), s, azp.double()
    if act == "static_sym":
        s = p.in_scale
        return torch.round(xf / s).clamp_(QMIN, QMAX).to(torch.int8), s, None
    if act == "static_asym":
        return int8_azp_codes(xf, p.in_scale, p.in_zp).to(torch.int8), p.in_scale, p.in_zp.double()
    if act == "ms_static":  # msmodelslim.quantize_static_int8
        q = torch.round(xf / p.in_scale + p.in_zp).clamp_(QMIN, QMAX).to(torch.int8)
        return q, None, None
    if act == "ms_token":
        q, s = quantize_per_token_int8(xf)
        return q.to(torch.int8), s, None
    raise KernelError(f"cpu.int8: activation mode {act!r} has no int8 activation codes")


def _int8_epilogue(acc: torch.Tensor, q: torch.Tensor, s, azp, p: Int8Prepared) -> torch.Tensor:
    """fp32 y [M, N] from the exact int32 product acc = q @ W_q^T."""
    if p.act == "ms_static":
        # (x_q @ W_q^T + quant_bias) * deq_scale; quant_bias carries the offset term
        return (acc.double() + p.quant_bias.double()).mul_(p.w_scale.double()).float()
    if azp is not None:
        # x = s (q - azp): y = s * w_scale * (acc - azp * colsum), exact in float64
        return ((acc.double() - azp * p.colsum.double()) * (s.double() * p.w_scale.double())).float()
    if p.w_offset is not None:
        # W = (W_q - offset) * scale: y = s * scale * (acc - offset * rowsum(q))
        rows = q.sum(dim=1, keepdim=True, dtype=torch.int32)
        return ((acc.double() - rows.double() * p.w_offset.double()) * (s.double() * p.w_scale.double())).float()
    y = acc.float()
    return y.mul_(s).mul_(p.w_scale)


class _Int8(_Cpu):
    schemes = INT8_SCHEMES
    layout = INT8_LAYOUT

    def serves(self, scheme):
        why = super().serves(scheme)
        if why:
            return why
        if scheme.name == "w8a8_dynamic" and scheme.group_size > 0:
            return (f"per-group weight scales (group_size={scheme.group_size}) must be applied inside the "
                    f"K loop, which an int8 GEMM (torch._int_mm, fbgemm) cannot do; cpu.dequant runs them")
        return None


class _Int8W8A8(_Int8):
    aten_ops = ("_int_mm",)

    def serves(self, scheme):
        why = super().serves(scheme)
        if why is None and not scheme.activation_quantized:
            why = "weight-only int8 (activation=None) runs on cpu.int8.int8pack"
        return why

    def gemm(self, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x, p, bias):
        q, s, azp = quantize_int8_activation(x, p)
        acc = self.gemm(q, p.weight)
        return _finish(_int8_epilogue(acc, q, s, azp, p), bias, x.dtype)


class _IntMM(_Int8W8A8):
    """The int8 W8A8 kernels on torch._int_mm."""

    def can_implement(self, pr):
        if pr.k == 1:
            # torch 2.13's CPU _int_mm returns garbage for K = 1 (either operand order, contiguous
            # or not; seen against an exact int32 matmul): fbgemm and the dequant path run it
            return "K=1: torch._int_mm on the CPU returns wrong sums for a single input feature"
        return super().can_implement(pr)


@register_kernel
class Int8IntMM(_IntMM):
    """int8 W8A8: y = epilogue(torch._int_mm(x_q, W_q^T))."""
    name = "cpu.int8.int_mm"
    priority = 30

    def gemm(self, q, w):
        return torch._int_mm(q, w.t())


@register_kernel
class Int8IntMMTransposed(_IntMM):
    """int8 W8A8 as (W_q @ x_q^T)^T: the weight is the row-major A operand, which oneDNN streams
    well for a handful of rows; the epilogue reads the [N, M] product transposed."""
    name = "cpu.int8.int_mm_t"
    priority = 31

    def gemm(self, q, w):
        return torch._int_mm(w, q.t()).t()


# ---- fbgemm: the same int8 GEMM on a weight packed once (torch.ops.quantized) ----------------
FBGEMM_ENGINES = ("x86", "fbgemm")


@dataclass
class FbgemmPrepared(Int8Prepared):
    """Int8Prepared whose weight lives in fbgemm's packed form (`packed`), with unit channel
    scales so that the op returns the exact int32 product as fp32; `weight` is None."""

    packed: object = None              # torch.classes.quantized.LinearPackedParamsBase
    packed_nbytes: int = 0

    @property
    def nbytes(self) -> int:  # the packed weight is opaque to tensor counting
        extra = [self.w_scale, self.in_scale, self.in_zp, self.colsum, self.quant_bias, self.w_offset]
        return self.packed_nbytes + sum(t.numel() * t.element_size() for t in extra if t is not None)


def _fbgemm_packed_nbytes(n: int, k: int) -> int:
    # PackBMatrix<int8>: K rounded to the 4-row interleave, N to 32-column blocks, plus per-column
    # offsets, scales and zero points (int32 / fp32 each); an estimate, the object is opaque
    return (-(-k // 4) * 4) * (-(-n // 32) * 32) + 12 * n


def _fbgemm_pack(w_int8: torch.Tensor):
    import warnings
    n = w_int8.shape[0]
    with warnings.catch_warnings():  # torch deprecates building quantized tensors; the op still needs one
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            w_int8.cpu(), torch.ones(n, dtype=torch.double), torch.zeros(n, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


def _fbgemm_linear(codes: torch.Tensor, packed) -> torch.Tensor:
    """fp32 [M, N] = codes @ W_q^T, exact below 2^24: the op quantizes its fp32 input with scale 1
    and zero point 128, which maps int8 codes onto uint8 without rounding."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, 128, packed)


_FBGEMM_STATUS: list = []


def fbgemm_reason() -> str | None:
    """None when fbgemm's int8 GEMM is exact here, else why not. Checked once, by running the
    worst case: without VNNI, fbgemm's u8 x s8 pairs saturate int16 (255*127*2 > 32767)."""
    if not _FBGEMM_STATUS:
        try:
            if torch.backends.quantized.engine not in FBGEMM_ENGINES:
                raise RuntimeError(f"the quantized engine is {torch.backends.quantized.engine!r}, not x86/fbgemm")
            k = 64
            packed = _fbgemm_pack(torch.full((16, k), -128, dtype=torch.int8))
            got = _fbgemm_linear(torch.full((2, k), 127.0), packed)
            want = -128.0 * 127.0 * k
            if not bool((got == want).all()):
                raise RuntimeError(f"its u8 x s8 product is not exact on this CPU (got {got[0, 0].item():.0f}, "
                                   f"want {want:.0f}: int16 saturation without VNNI)")
            _FBGEMM_STATUS.append(None)
        except Exception as e:  # op missing, engine absent, inexact
            _FBGEMM_STATUS.append(f"fbgemm int8 linear unusable here: {str(e).splitlines()[0][:160]}")
    return _FBGEMM_STATUS[0]


def _prepare_fbgemm(qw: QuantizedWeight, device) -> FbgemmPrepared:
    p = _prepare_int8(qw, device)
    n, k = qw.shape
    fields = {f: getattr(p, f) for f in ("w_scale", "act", "in_scale", "in_zp", "colsum", "quant_bias", "w_offset")}
    return FbgemmPrepared(weight=None, packed=_fbgemm_pack(p.weight), packed_nbytes=_fbgemm_packed_nbytes(n, k),
                          **fields)


FBGEMM_LAYOUT = Layout("cpu.int8.fbgemm", _prepare_fbgemm)


@register_kernel
class Int8Fbgemm(_Int8W8A8):
    """int8 W8A8 on fbgemm's packed weight (VNNI u8 x s8 GEMM), the activation quantized as the
    scheme does and the scales applied in the same fp32 epilogue as cpu.int8.int_mm. Several
    times faster than torch._int_mm for small M on AVX-512 CPUs, where _int_mm (oneDNN's
    gemm_api) repacks the weight on every call; _int_mm catches up from M ~ 256."""
    name = "cpu.int8.fbgemm"
    priority = 35
    layout = FBGEMM_LAYOUT
    aten_ops = ()

    def available(self, device):
        return super().available(device) or fbgemm_reason()

    def run(self, x, p, bias):
        q, s, azp = quantize_int8_activation(x, p)
        acc = _fbgemm_linear(q.float(), p.packed)
        return _finish(_int8_epilogue(acc, q, s, azp, p), bias, x.dtype)


# _weight_int8pack_mm reads K in blocks of 16 and returns wrong values (or crashes) otherwise.
INT8PACK_K_MULTIPLE = 16


class _Int8WeightOnly(_Int8):
    def serves(self, scheme):
        why = super().serves(scheme)
        if why is None and scheme.activation_quantized:
            why = "quantized activations run on cpu.int8.fbgemm or cpu.int8.int_mm"
        return why


@register_kernel
class Int8WeightOnly(_Int8WeightOnly):
    """int8 weight-only: torch._weight_int8pack_mm(x, W_q, scale). Runs in bf16 for fp32 inputs
    (the op's fp32 path is ~20x slower than its bf16 one on AVX-512 CPUs)."""
    name = "cpu.int8.int8pack"
    priority = 30
    aten_ops = ("_weight_int8pack_mm",)

    def can_implement(self, pr):
        why = super().can_implement(pr)
        if why:
            return why
        if pr.k % INT8PACK_K_MULTIPLE:
            return (f"K={pr.k} is not a multiple of {INT8PACK_K_MULTIPLE} "
                    f"(torch._weight_int8pack_mm reads K in blocks of 16)")
        return None

    def run(self, x, p, bias):
        cdt = torch.float16 if x.dtype == torch.float16 else torch.bfloat16
        y = torch._weight_int8pack_mm(x.to(cdt).contiguous(), p.weight, p.w_scale.to(cdt))
        return _finish(y, bias, x.dtype)


# Below these M a per-call dequantization costs more than the bf16 GEMM saves (measured on a
# 2-core AVX-512 CPU at 3072 x 12288: int8 crosses over near M = 100, int4 near M = 600, where
# decoding the packed nibbles in torch ops costs ~160 ms a call).
INT8_DEQUANT_MIN_M = 128
INT4_DEQUANT_MIN_M = 512


@register_kernel
class Int8WeightOnlyDequant(_Int8WeightOnly):
    """int8 weight-only for large M: W_q -> bf16 times the channel scale, then one bf16 matmul.
    The dequantized weight lives for the call only; _weight_int8pack_mm runs the weight through
    fp32 FMAs, which for large M costs more than the dequantization does."""
    name = "cpu.int8.dequant_mm"
    priority = 32

    def can_implement(self, pr):
        why = super().can_implement(pr)
        if why is None and pr.m < INT8_DEQUANT_MIN_M:
            why = f"M={pr.m} < {INT8_DEQUANT_MIN_M}: cpu.int8.int8pack is faster for fewer rows"
        return why

    def run(self, x, p, bias):
        cdt = _compute_dtype(x)
        w = p.weight.to(cdt).mul_(p.w_scale.to(cdt)[:, None])
        return _finish(F.linear(x.to(cdt), w), bias, x.dtype)


# =============================================================================================
# 4-bit grouped weights: torch's CPU tinygemm (_weight_int4pack_mm_for_cpu)
# =============================================================================================
INT4_SCHEMES = ("gptq", "awq")
TINYGEMM_GROUPS = (256, 128, 64, 32)   # group sizes the CPU op accepts, largest first
TINYGEMM_N_MULTIPLE = 16               # _convert_weight_to_int4pack_for_cpu packs N in 16s


@dataclass
class Int4Prepared:
    packed: torch.Tensor               # uint8 [N, K/2] from _convert_weight_to_int4pack_for_cpu
    scale_zeros: torch.Tensor          # bf16 [K/G, N, 2]: W = (q - 8) * scale + zero
    group_size: int
    perm: torch.Tensor | None = None   # int32 [K]: act-order columns sorted by group


def tinygemm_group(k: int, group: int) -> int | None:
    """The op's group size for a scheme group `group` over K inputs: the group itself, or for one
    group per channel (group == K) the largest supported size dividing K; None if none fits."""
    if group < k:
        return group if group in TINYGEMM_GROUPS and k % group == 0 else None
    return next((g for g in TINYGEMM_GROUPS if k % g == 0), None)


def int4_prepared_nbytes(n: int, k: int, group: int, act_order: bool) -> int:
    return n * k // 2 + (k // group) * n * 2 * 2 + (4 * k if act_order else 0)


def _int4_scheme_reason(scheme) -> str | None:
    if getattr(scheme, "bits", 4) != 4:
        return f"{scheme.bits}-bit codes: the CPU tinygemm op takes 4-bit codes only"
    g = scheme.group_size
    if g != -1 and g not in TINYGEMM_GROUPS:
        return f"group_size={g}: the CPU tinygemm op takes group sizes {sorted(TINYGEMM_GROUPS)}"
    if g != -1:
        # per weight: 4 bits + a bf16 scale and zero per group, against the format's own bytes
        big = 1 << 14
        need = int4_prepared_nbytes(big, big, g, getattr(scheme, "desc_act", False))
        nominal = scheme.nominal_nbytes(big, big)
        if need > MEMORY_SLACK * nominal:
            return (f"group_size={g}: a bf16 scale and zero per group would take {need / nominal:.3f}x the "
                    f"format's bytes (limit {MEMORY_SLACK}x); cpu.dequant runs it")
    return None


def _prepare_int4(qw: QuantizedWeight, device) -> Int4Prepared:
    s = qw.scheme
    n, k = qw.shape
    av = s.affine_view(qw)
    g = tinygemm_group(k, av.group_size)
    if g is None:
        raise KernelError(f"{where(qw.name)}cpu.int4: group size {av.group_size} over K={k} has no CPU "
                          f"tinygemm layout (sizes {TINYGEMM_GROUPS} dividing K)")
    codes = av.codes.to(device)
    if av.signed:
        codes = codes + (1 << (av.bits - 1))
    scales = av.scales.to(device).float()
    offsets = av.offsets.to(device).float() if av.offsets is not None else torch.zeros_like(scales)
    if g != av.group_size:  # one group per channel, split into op-sized groups of equal scale
        scales = scales.repeat_interleave(k // g, dim=1)
        offsets = offsets.repeat_interleave(k // g, dim=1)
    perm = None
    if av.g_idx is not None:
        gi = av.g_idx.to(device).long()
        counts = torch.bincount(gi, minlength=scales.shape[1])
        if counts.numel() != scales.shape[1] or bool((counts != g).any()):
            raise KernelError(f"{where(qw.name)}cpu.int4: g_idx does not put exactly {g} input features in each "
                              f"group, so sorting K by group cannot make groups contiguous; disable cpu.int4 "
                              f"kernels for this layer (OMNIQ_DISABLE_KERNELS)")
        order = torch.sort(gi, stable=True).indices
        codes = codes[:, order]
        perm = order.to(torch.int32)
    # the op computes (q - 8) * scale + zero; the view says q * scale + offset
    zeros = offsets + 8.0 * scales
    sz = torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return Int4Prepared(packed=packed, scale_zeros=sz, group_size=g, perm=perm)


INT4_LAYOUT = Layout("cpu.int4.packed", _prepare_int4)


@register_kernel
class Int4Tinygemm(_Cpu):
    """4-bit grouped weight-only: torch's CPU tinygemm, x in bf16 (permuted for act-order)."""
    name = "cpu.int4.tinygemm"
    priority = 30
    schemes = INT4_SCHEMES
    layout = INT4_LAYOUT
    aten_ops = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")

    def serves(self, scheme):
        return super().serves(scheme) or _int4_scheme_reason(scheme)

    def can_implement(self, pr):
        why = super().can_implement(pr)
        if why:
            return why
        if pr.n % TINYGEMM_N_MULTIPLE:
            return f"N={pr.n} is not a multiple of {TINYGEMM_N_MULTIPLE} (the CPU int4 packing works on 16 rows)"
        sch = pr.scheme
        group = sch.group(pr.k)
        g = tinygemm_group(pr.k, group)
        if g is None:
            if group < pr.k:
                return f"K={pr.k} is not a multiple of group_size={group} (a partial last group)"
            return f"K={pr.k} is not a multiple of 32, the smallest CPU tinygemm group"
        try:
            nominal = sch.nominal_nbytes(pr.n, pr.k)
        except Exception as e:  # the scheme rejects the shape itself
            return str(e)
        need = int4_prepared_nbytes(pr.n, pr.k, g, getattr(sch, "desc_act", False))
        if need > MEMORY_SLACK * nominal:
            return f"the packed layout would take {need / nominal:.3f}x the format's bytes (limit {MEMORY_SLACK}x)"
        return None

    def run(self, x, p, bias):
        # the op wants activations in the scale dtype (bf16); fp16/fp32 inputs are rounded to bf16
        xb = x.to(torch.bfloat16)
        if p.perm is not None:
            xb = xb.index_select(1, p.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), p.packed, p.group_size, p.scale_zeros)
        return _finish(y, bias, x.dtype)


def unpack_tinygemm(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """uint8 codes [N, K] from _convert_weight_to_int4pack_for_cpu's layout for N % 64 == 0:
    [N/64, K, 32] bytes, byte j of (block, k) holding row j (low nibble) and row j + 32 (high).
    This is torch's private layout, so int4_unpack_reason() checks it once per process."""
    b = packed.view(n // 64, k, 32)
    codes = torch.cat([b & 0xF, b >> 4], dim=-1)          # [N/64, K, 64]
    return codes.transpose(1, 2).reshape(n, k)


_UNPACK_STATUS: list = []


def int4_unpack_reason() -> str | None:
    """None when unpack_tinygemm reads this torch's packing back exactly, else why not."""
    if not _UNPACK_STATUS:
        try:
            g = torch.Generator().manual_seed(0)
            q = torch.randint(0, 16, (128, 96), generator=g, dtype=torch.int32)
            got = unpack_tinygemm(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), 128, 96)
            ok = torch.equal(got.to(torch.int32), q)
            _UNPACK_STATUS.append(None if ok else f"torch {torch.__version__} packs CPU int4 codes in a layout "
                                                  f"this kernel does not read")
        except Exception as e:
            _UNPACK_STATUS.append(f"cannot read the CPU int4 packing: {str(e).splitlines()[0][:160]}")
    return _UNPACK_STATUS[0]


@register_kernel
class Int4DequantMM(Int4Tinygemm):
    """4-bit grouped weight-only for large M, on the same packed layout: unpack the codes, apply
    the bf16 scale/zero pairs per group, one bf16 matmul. tinygemm re-decodes the weight for
    every 4 rows with fp32 FMAs; for large M one decode per call plus oneDNN's bf16 GEMM costs
    less (about 2x less from M = 1024). The decoded weight lives for the call only."""
    name = "cpu.int4.dequant_mm"
    priority = 32

    def available(self, device):
        return super().available(device) or int4_unpack_reason()

    def can_implement(self, pr):
        why = super().can_implement(pr)
        if why:
            return why
        if pr.n % 64:
            return f"N={pr.n} is not a multiple of 64 (the packed layout this kernel reads)"
        if pr.m < INT4_DEQUANT_MIN_M:
            return f"M={pr.m} < {INT4_DEQUANT_MIN_M}: cpu.int4.tinygemm is faster for fewer rows"
        return None

    def run(self, x, p, bias):
        n = p.scale_zeros.shape[1]
        k = p.packed.shape[1] * 2
        g = p.group_size
        codes = unpack_tinygemm(p.packed, n, k).view(n, k // g, g).to(torch.bfloat16)
        sz = p.scale_zeros.transpose(0, 1).contiguous()     # [N, K/G, 2], small
        scale = sz[..., :1]
        # (q - 8) * scale + zero = q * scale + (zero - 8 * scale)
        w = torch.addcmul(sz[..., 1:] - 8 * scale, codes, scale).reshape(n, k)
        xb = x.to(torch.bfloat16)
        if p.perm is not None:
            xb = xb.index_select(1, p.perm)
        return _finish(F.linear(xb, w), bias, x.dtype)


# =============================================================================================
# fp8 W8A8 through torch._scaled_mm
# =============================================================================================
@dataclass
class FP8Prepared:
    weight: torch.Tensor               # float8_e4m3fn [N, K]
    w_scale: torch.Tensor              # fp32 [1, N]
    act: str                           # dynamic_token | dynamic_tensor | static_tensor
    in_scale: torch.Tensor | None = None


def _prepare_fp8(qw: QuantizedWeight, device) -> FP8Prepared:
    n, _ = qw.shape
    t = qw.tensors
    ws = t["weight_scale"].to(device).float()
    ws = ws.reshape(1, n) if ws.numel() == n else ws.reshape(1, 1).expand(1, n)
    ins = t.get("input_scale")
    return FP8Prepared(weight=t["weight"].to(device), w_scale=ws, act=qw.scheme.activation,
                       in_scale=None if ins is None else ins.to(device).float().reshape(1, 1))


FP8_LAYOUT = Layout("cpu.fp8", _prepare_fp8)


@register_kernel
class FP8ScaledMM(_Cpu):
    """fp8 W8A8: activation quantized as fp8.quantize_activation does, then torch._scaled_mm with
    row-wise scales. Correct on the CPU but slower than the reference without fp8 hardware."""
    name = "cpu.fp8.scaled_mm"
    schemes = ("fp8",)
    priority = -150
    layout = FP8_LAYOUT
    aten_ops = ("_scaled_mm",)

    def serves(self, scheme):
        why = super().serves(scheme)
        if why:
            return why
        if scheme.weight_granularity == "block":
            return "128x128 block weight scales: torch._scaled_mm takes per-tensor or row-wise scales"
        if scheme.activation not in ("dynamic_token", "dynamic_tensor", "static_tensor"):
            return f"activation={scheme.activation!r}: needs per-token or per-tensor fp8 activations"
        return None

    def run(self, x, p, bias):
        xq, s = fp8_activation_codes(x.float(), p.act, p.in_scale)
        # one scale per row, materialized (torch._scaled_mm wants stride 1 along the last dim)
        s = torch.broadcast_to(s, (x.shape[0], 1)).clone(memory_format=torch.contiguous_format)
        y = torch._scaled_mm(xq, p.weight.t(), s,
                             p.w_scale.contiguous(), out_dtype=torch.float32)
        return _finish(y, bias, x.dtype)


# =============================================================================================
# dequantize-then-matmul, for every scheme
# =============================================================================================
# Schemes whose matmul is not "fake-quantized x @ dequantized W": dequantizing cannot reproduce it.
_OWN_MATMUL = {"w8a8": "its matmul adds quant_bias (a bias folded into integers), which fake-quantized "
                       "x @ dequantized W lacks; cpu.int8.int_mm or the reference runs it"}


# The families this backend knows to be plain "fake-quantized x @ dequantize(W)" (a scheme added
# later, e.g. a test's toy, runs on the reference until it is listed here).
DEQUANT_SCHEMES = ("fp8", "int8", "gptq", "awq", "mxfp8", "mxfp4", "mxfp4_dualscale", "nvfp4", "gguf",
                   "w8a8", "w8a8_dynamic", "w4a8_dynamic")


def _dequant_reason(scheme) -> str | None:
    return _OWN_MATMUL.get(scheme.name)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16 activations get a bf16 GEMM (several times faster than fp32 here); others run in fp32
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _activation(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    s = qw.scheme
    return s.quantize_activation(x.float(), qw) if s.activation_quantized else x


@register_kernel
class DequantMatmul(_Cpu):
    """Dequantize the checkpoint tensors on every call, then one dense matmul. Always valid."""
    name = "cpu.dequant"
    schemes = DEQUANT_SCHEMES
    priority = 0
    layout = CHECKPOINT

    def serves(self, scheme):
        return super().serves(scheme) or _dequant_reason(scheme)

    def run(self, x, qw, bias):
        cdt = _compute_dtype(x)
        w = qw.scheme.dequantize(qw).to(cdt)
        return _finish(F.linear(_activation(x, qw).to(cdt), w), bias, x.dtype)


@dataclass
class CachedDense:
    weight: torch.Tensor               # bf16 [N, K], dequantized once
    qw: QuantizedWeight                # the small tensors the activation quantizer reads


def _prepare_cached(qw: QuantizedWeight, device) -> CachedDense:
    n, k = qw.shape
    w = qw.scheme.dequantize(qw.to(device)).to(torch.bfloat16).contiguous()
    # keep only the small tensors (input scales, ...) for quantize_activation, not the payload
    small = {name: t.to(device) for name, t in qw.tensors.items() if t.numel() <= max(n, k)}
    return CachedDense(weight=w, qw=QuantizedWeight(qw.scheme, qw.shape, small, name=qw.name, validate=False))


CACHED_LAYOUT = Layout("cpu.dequant.cache", _prepare_cached)


def cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "0") not in ("", "0", "false", "False")


@register_kernel
class CachedDequantMatmul(_Cpu):
    """A bf16 copy of the dequantized weight, made once; each call is one bf16 matmul (after the
    scheme's activation fake-quantization). Breaks the one-copy rule: opt-in only."""
    name = "cpu.dequant.cached"
    schemes = DEQUANT_SCHEMES
    priority = 20
    layout = CACHED_LAYOUT

    def serves(self, scheme):
        return super().serves(scheme) or _dequant_reason(scheme)

    def available(self, device):
        why = super().available(device)
        if why:
            return why
        if not cache_enabled():
            return (f"opt-in: set {CACHE_ENV}=1 to keep a bf16 dequantized copy (2 bytes per weight, "
                    f"above the format's size)")
        return None

    def run(self, x, p, bias):
        xa = _activation(x, p.qw).to(torch.bfloat16)
        return _finish(F.linear(xa, p.weight), bias, x.dtype)
