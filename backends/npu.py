"""Ascend NPU kernels: torch_npu's quantized matmuls behind omniq's dispatcher.

Op signatures and argument conventions: vllm-kernels.md §4.3, vllm-omni.md §1.4 and the
torch_npu / CANN ops-nn docs. torch_npu is imported lazily (inside functions): on a machine
without it every kernel here is registered, explained as unavailable, and never chosen.

  kernel                                    schemes                               torch_npu ops
  npu.w8a8_dynamic.quant_matmul             int8 (dynamic_token, symmetric),      npu_dynamic_quant + npu_quant_matmul
                                            w8a8_dynamic (per channel),           (pertoken_scale)
                                            w4a8_dynamic (version 1.0.0)
  npu.w8a8_static.quant_matmul              w8a8 (msModelSlim), int8 (static)     npu_quantize + npu_quant_matmul
                                                                                  (deq_scale, quant_bias)
  npu.weight_only.weight_quant_bmm          gptq, awq, int8 (weight-only)         npu_weight_quant_batchmatmul
  npu.mxfp8.quant_matmul                    mxfp8 (W8A8)                          npu_dynamic_mx_quant + npu_quant_matmul
  npu.mxfp4.quant_matmul                    mxfp4 (W4A4, W4A8)                    npu_dynamic_mx_quant + npu_quant_matmul
  npu.mxfp4_dualscale.dual_level_matmul     mxfp4_dualscale (W4A4)                npu_dynamic_dual_level_mx_quant +
                                                                                  npu_dual_level_quant_matmul
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

import torch

from omniq.dispatch import Kernel, Layout, Problem, register_kernel
from omniq.errors import OmniqError, where
from omniq.formats.packing import pack_nibbles
from omniq.schemes.base import QuantizedWeight, QuantScheme

DEVICE_TYPE = "npu"
NZ_FORMAT = 29              # ACL_FORMAT_FRACTAL_NZ, the layout the matmul ops read fastest
MAX_DIM = 65535             # npu_quant_matmul / npu_weight_quant_batchmatmul: K and N at most this
MX_BLOCK = 32
HALF = (torch.float16, torch.bfloat16)


# ---- availability ---------------------------------------------------------------------------
_import_failure: list[str] = []   # the reason, once an import of torch_npu has failed


def _import_torch_npu():
    """(torch_npu module or None, reason). A failed import is remembered (it is slow to retry);
    a module placed in sys.modules later (tests install an emulation there) is still found."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod, None
    if _import_failure:
        return None, _import_failure[0]
    try:
        return importlib.import_module("torch_npu"), None
    except ImportError:
        reason = "unavailable: torch_npu is not installed"
    except Exception as e:  # a broken install must not break omniq: report it
        reason = f"unavailable: importing torch_npu failed ({type(e).__name__}: {e})"
    _import_failure.append(reason)
    return None, reason


def _torch_npu():
    mod, reason = _import_torch_npu()
    if mod is None:
        raise OmniqError(f"npu backend: {reason}")
    return mod


def _device_ok(device: torch.device) -> bool:
    """True for an Ascend device. Tests replace this hook: a CPU tensor stands in for an NPU one."""
    return torch.device(device).type == DEVICE_TYPE


def npu_unavailable(device, ops: tuple[str, ...] = ()) -> str | None:
    """None when torch_npu is importable, `device` is an NPU and torch_npu has `ops`."""
    tnpu, reason = _import_torch_npu()
    if tnpu is None:
        return reason
    device = torch.device(device)
    if not _device_ok(device):
        return f"device is {device.type}, not {DEVICE_TYPE}"
    missing = [op for op in ops if not hasattr(tnpu, op)]
    if missing:
        return (f"unavailable: this torch_npu has no {', '.join(missing)} (MX ops need an Ascend 950 and a "
                f"recent torch_npu / CANN)" if any("mx" in op or "dual" in op for op in missing)
                else f"unavailable: this torch_npu has no {', '.join(missing)}; update torch_npu / CANN")
    return None


def _half_only(problem: Problem, op: str) -> str | None:
    if problem.act_dtype not in HALF:
        return f"{op} takes float16/bfloat16 activations, not {str(problem.act_dtype).replace('torch.', '')}"
    return None


def _dims_ok(problem: Problem, op: str) -> str | None:
    if problem.n > MAX_DIM or problem.k > MAX_DIM:
        dim, size = ("N (output features)", problem.n) if problem.n > MAX_DIM else ("K (input features)", problem.k)
        return f"{op} takes at most {MAX_DIM} along K and N; {dim}={size} (split the layer, or raise TP)"
    return None


class _NpuKernel(Kernel):
    backend = "npu"
    priority = 60
    ops: tuple[str, ...] = ()

    def available(self, device) -> str | None:
        return npu_unavailable(device, self.ops)

    def _params_reason(self, scheme: QuantScheme) -> str | None:
        """Scheme parameters this kernel cannot compute (None when fine)."""
        return None

    def serves(self, scheme: QuantScheme) -> str | None:
        return super().serves(scheme) or self._params_reason(scheme)


def _fail(qw: QuantizedWeight, kernel: str, msg: str):
    raise OmniqError(f"{where(qw.name)}{kernel}: {msg}")


def _per_dtype(t: torch.Tensor | None) -> dict:
    """A small tensor in both half dtypes: ops that want it in x's dtype get it without a cast per call."""
    if t is None:
        return {d: None for d in HALF}
    return {d: t.to(d).contiguous() for d in HALF}


def _nz(tnpu, w: torch.Tensor) -> torch.Tensor:
    # FRACTAL_NZ is a physical tiling; the logical shape and values stay as they are
    return tnpu.npu_format_cast(w.contiguous(), NZ_FORMAT)


def _float_bias(bias: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor | None:
    return None if bias is None else bias.to(dtype).contiguous()


# ---- INT8 W8A8 dynamic (per-token activations) -----------------------------------------------
@dataclass
class _Int8KN:
    weight: torch.Tensor        # int8 [K, N] (NZ), codes of a signed 8- or 4-bit weight
    scale: torch.Tensor         # fp32 [N], per output channel


def _prepare_int8_kn(qw: QuantizedWeight, device) -> _Int8KN:
    name = "npu.w8a8_dynamic.quant_matmul"
    av = qw.scheme.affine_view(qw)
    n, k = qw.shape
    if av is None or av.g_idx is not None or av.scales.shape[1] != 1 or not av.signed:
        _fail(qw, name, "needs signed integer codes with one scale per output channel")
    if av.offsets is not None:
        _fail(qw, name, "the weight has nonzero offsets (weight_offset); npu_quant_matmul has no weight "
                        "offset. Disable this kernel for the layer (omniq.disable_kernels) to use another")
    tnpu = _torch_npu()
    w = av.codes.to(device=device, dtype=torch.int8).T.contiguous()   # int4 codes fit in int8 as they are
    return _Int8KN(weight=_nz(tnpu, w), scale=av.scales.reshape(n).to(device=device, dtype=torch.float32))


INT8_KN = Layout("npu.int8_kn_nz", _prepare_int8_kn)


@register_kernel
class NpuW8A8Dynamic(_NpuKernel):
    """x_q, s_t = npu_dynamic_quant(x); y = npu_quant_matmul(x_q, W[K,N], weight_scale,
    pertoken_scale=s_t, bias=fp32). W4A8 v1.0.0 weights run with their int4 codes widened to
    int8 (the prepared copy is int8 [K, N], twice the packed checkpoint)."""

    name = "npu.w8a8_dynamic.quant_matmul"
    schemes = ("int8", "w8a8_dynamic", "w4a8_dynamic")
    layout = INT8_KN
    ops = ("npu_dynamic_quant", "npu_quant_matmul", "npu_format_cast")

    def _params_reason(self, s):
        if s.name == "int8" and (s.activation != "dynamic_token" or not s.act_symmetric):
            return ("npu_dynamic_quant quantizes activations per token, symmetric; int8 with "
                    f"activation={s.activation!r}, act_symmetric={s.act_symmetric} is not that")
        if s.name == "w8a8_dynamic" and s.group_size != -1:
            return (f"npu_quant_matmul applies one weight scale per output channel; w8a8_dynamic "
                    f"group_size={s.group_size} has per-group scales")
        if s.name == "w4a8_dynamic" and not s.packed:
            return ("npu_quant_matmul applies one weight scale per output channel; w4a8_dynamic version "
                    f"{s.version!r} has per-group scales (weight_scale_second)")
        return None

    def can_implement(self, problem):
        return _half_only(problem, "npu_dynamic_quant") or _dims_ok(problem, "npu_quant_matmul")

    def run(self, x, p: _Int8KN, bias):
        tnpu = _torch_npu()
        xq, s_t = tnpu.npu_dynamic_quant(x.contiguous())
        return tnpu.npu_quant_matmul(xq, p.weight, p.scale, pertoken_scale=s_t, bias=_float_bias(bias),
                                     output_dtype=x.dtype)


# ---- INT8 W8A8 static (msModelSlim W8A8; int8 static_tensor) ---------------------------------
@dataclass
class _StaticInt8:
    weight: torch.Tensor        # int8 [K, N] (NZ)
    deq_scale: torch.Tensor     # fp32 [N]: bf16 outputs take it as is
    deq_scale_i64: torch.Tensor  # int64 [N] (npu_trans_quant_param): fp16 outputs take this form
    quant_bias: torch.Tensor    # int32 [N]
    q_scale: torch.Tensor       # fp32 [K]: npu_quantize's scale (1/s with div_mode=False)
    q_zero: torch.Tensor        # [K]: npu_quantize's zero point
    div_mode: bool


def _prepare_static(qw: QuantizedWeight, device) -> _StaticInt8:
    name = "npu.w8a8_static.quant_matmul"
    s, t = qw.scheme, qw.tensors
    n, k = qw.shape
    tnpu = _torch_npu()
    wq = t["weight"]
    if s.name == "w8a8":
        from omniq.schemes.msmodelslim import decode_deq_scale
        deq = decode_deq_scale(t["deq_scale"]).float().reshape(n)
        quant_bias = t["quant_bias"].to(torch.int32).reshape(n)
        s_in = t["input_scale"].float().reshape(1)
        o = t["input_offset"].float().reshape(1)
        if float(o) != round(float(o)):
            _fail(qw, name, f"input_offset={float(o)} is not an integer; it is an int8 zero point")
        # x / s + o: the division the reference makes (div_mode=True), integer zero point
        q_scale, q_zero, div_mode = s_in, o.to(torch.int32), True
    else:  # int8 static_tensor: fold the zero point into an int32 bias over the full K
        ws = t["weight_scale"].float().reshape(n)
        s_in = t["input_scale"].float().reshape(1)
        deq = (s_in * ws).float()
        if s.act_symmetric:
            quant_bias = torch.zeros(n, dtype=torch.int32)
            q_scale, q_zero, div_mode = s_in, torch.zeros(1, dtype=torch.int32), True
        else:
            azp = t["input_zero_point"].to(torch.int64).reshape(1)
            quant_bias = (-azp * wq.to(torch.int64).sum(dim=1)).to(torch.int32)
            # int8 asymmetric multiplies by the reciprocal, as vLLM does: div_mode=False
            q_scale, q_zero, div_mode = (1.0 / s_in).float(), azp.float(), False
    deq = deq.to(device)
    w = wq.to(device=device, dtype=torch.int8).T.contiguous()
    return _StaticInt8(weight=_nz(tnpu, w), deq_scale=deq, deq_scale_i64=tnpu.npu_trans_quant_param(deq),
                       quant_bias=quant_bias.to(device),
                       q_scale=q_scale.to(device).expand(k).contiguous(),
                       q_zero=q_zero.to(device).expand(k).contiguous(), div_mode=div_mode)


STATIC_INT8 = Layout("npu.static_int8_kn_nz", _prepare_static)


@register_kernel
class NpuW8A8Static(_NpuKernel):
    """x_q = npu_quantize(x, scale, zero, qint8, axis=-1); y = npu_quant_matmul(x_q, W[K,N],
    deq_scale, bias=quant_bias) = (x_q @ W + quant_bias) * deq_scale. deq_scale goes in as fp32
    for bf16 outputs and as npu_trans_quant_param's int64 for fp16 outputs (never fp16: the op
    rejects it, vllm-ascend#7443). A layer bias joins quant_bias in one fp32 bias for bf16
    outputs; fp16 outputs (int32 bias only) add it after."""

    name = "npu.w8a8_static.quant_matmul"
    schemes = ("w8a8", "int8")
    layout = STATIC_INT8
    ops = ("npu_quantize", "npu_quant_matmul", "npu_trans_quant_param", "npu_format_cast")

    def _params_reason(self, s):
        if s.name == "int8" and s.activation != "static_tensor":
            return f"static activations only (npu_quantize); int8 activation={s.activation!r}"
        return None

    def can_implement(self, problem):
        return _half_only(problem, "npu_quant_matmul (fp16/bf16 output)") or _dims_ok(problem, "npu_quant_matmul")

    def run(self, x, p: _StaticInt8, bias):
        tnpu = _torch_npu()
        xq = tnpu.npu_quantize(x.contiguous(), p.q_scale, p.q_zero, torch.qint8, -1, p.div_mode)
        if x.dtype == torch.float16:   # fp16 output without pertoken_scale: int64 scale, int32 bias only
            y = tnpu.npu_quant_matmul(xq, p.weight, p.deq_scale_i64, bias=p.quant_bias, output_dtype=x.dtype)
            return y if bias is None else (y.float() + bias.float()).to(x.dtype)
        if bias is None:
            return tnpu.npu_quant_matmul(xq, p.weight, p.deq_scale, bias=p.quant_bias, output_dtype=x.dtype)
        # bf16 output takes an fp32 bias: (acc + qb) * deq + b = acc * deq + (qb * deq + b), one rounding
        b = p.quant_bias.float() * p.deq_scale + bias.float()
        return tnpu.npu_quant_matmul(xq, p.weight, p.deq_scale, bias=b, output_dtype=x.dtype)


# ---- weight-only int8 / int4 ------------------------------------------------------------------
WEIGHT_ONLY_SCHEMES = ("gptq", "awq", "int8")


@dataclass
class _WeightOnly:
    weight: torch.Tensor               # int8 [N, K], or int32 [N, K/8] (int4pack); passed transposed
    scale: dict = field(default_factory=dict)    # x dtype -> [N] or [G, N]
    offset: dict = field(default_factory=dict)   # x dtype -> same shape, or None
    group_size: int = 0                # antiquant_group_size (0: per channel)


def _prepare_weight_only(qw: QuantizedWeight, device) -> _WeightOnly:
    name = "npu.weight_only.weight_quant_bmm"
    av = qw.scheme.affine_view(qw)
    n, k = qw.shape
    if av is None or av.g_idx is not None:
        _fail(qw, name, "needs integer codes with contiguous groups along K (no act-order g_idx)")
    # stored values w = codes - shift in the signed range; W = codes*s + off = (w + aoff) * s
    shift = 0 if av.signed else 1 << (av.bits - 1)
    s = av.scales.float()                                      # [N, G]
    aoff = torch.full_like(s, float(shift))
    if av.offsets is not None:
        if bool(((s == 0) & (av.offsets != 0)).any()):
            _fail(qw, name, "a group has scale 0 but a nonzero offset; (w + offset) * scale cannot express it")
        aoff = aoff + torch.where(s == 0, torch.zeros_like(s), av.offsets.float() / torch.where(s == 0, 1, s))
    tnpu = _torch_npu()
    w = (av.codes - shift).to(device)
    if av.bits == 8:
        w = w.to(torch.int8).contiguous()
    else:
        w = tnpu.npu_convert_weight_to_int4pack(w.to(torch.int32).contiguous())   # [N, K/8]
    per_channel = av.group_size >= k
    sc = s.reshape(n) if per_channel else s.T.contiguous()
    off = aoff.reshape(n) if per_channel else aoff.T.contiguous()
    return _WeightOnly(weight=w, scale=_per_dtype(sc.to(device)),
                       offset=_per_dtype(None if bool((aoff == 0).all()) else off.to(device)),
                       group_size=0 if per_channel else av.group_size)


WEIGHT_ONLY = Layout("npu.weight_only_nk", _prepare_weight_only)


def _group_of(scheme: QuantScheme, k: int) -> int:
    g = getattr(scheme, "group_size", -1)
    return k if g in (-1, None) or g >= k else g


@register_kernel
class NpuWeightOnly(_NpuKernel):
    """y = npu_weight_quant_batchmatmul(x, W^T, antiquant_scale, antiquant_offset, bias,
    antiquant_group_size): W = (w + offset) * scale with scale/offset in x's dtype, int4
    through npu_convert_weight_to_int4pack."""

    name = "npu.weight_only.weight_quant_bmm"
    schemes = WEIGHT_ONLY_SCHEMES
    layout = WEIGHT_ONLY
    ops = ("npu_weight_quant_batchmatmul", "npu_convert_weight_to_int4pack")

    def _params_reason(self, s):
        if s.activation_quantized:
            return f"weight-only kernel; {s.name} here quantizes activations"
        if getattr(s, "bits", 8) not in (4, 8):
            return f"npu_weight_quant_batchmatmul takes int8 or int4 weights, not {s.bits}-bit"
        if getattr(s, "desc_act", False):
            return "act-order (desc_act) g_idx is not supported: the op needs contiguous groups along K"
        return None

    def can_implement(self, problem):
        why = _half_only(problem, "npu_weight_quant_batchmatmul") or _dims_ok(problem, "npu_weight_quant_batchmatmul")
        if why:
            return why
        s, k = problem.scheme, problem.k
        g = _group_of(s, k)
        if g < k and (g % 32 or g < 32):
            return f"antiquant_group_size must be a multiple of 32 in [32, K-1]; group_size={g}"
        if getattr(s, "bits", 8) == 4 and k % 8:
            return f"int4 weights pack 8 values per int32 along K; K={k} is not a multiple of 8"
        return None

    def run(self, x, p: _WeightOnly, bias):
        tnpu = _torch_npu()
        # bias: fp32 for bf16 x, fp16 for fp16 x (the op's rule)
        b = _float_bias(bias, torch.float32 if x.dtype == torch.bfloat16 else torch.float16)
        return tnpu.npu_weight_quant_batchmatmul(x.contiguous(), p.weight.T, p.scale[x.dtype],
                                                 antiquant_offset=p.offset[x.dtype], bias=b,
                                                 antiquant_group_size=p.group_size)


# ---- MX (Ascend 950) --------------------------------------------------------------------------
def _pair_scales(b: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes [N, G] -> [N, ceil(G/2), 2], padding G to even with 0 (the ops read scales in pairs)."""
    n, g = b.shape
    if g % 2:
        b = torch.cat([b, torch.zeros(n, 1, dtype=b.dtype, device=b.device)], dim=1)
    return b.reshape(n, -1, 2).contiguous()


def _mx_scale_ok(s: QuantScheme) -> str | None:
    if getattr(s, "scale_rule", "floor") != "floor":
        return (f"npu_dynamic_mx_quant picks activation exponents with the OCP floor rule (scale_alg=0); "
                f"scale_rule={s.scale_rule!r} activations would differ")
    if getattr(s, "act_rounding", "rne") != "rne":
        return f"npu_dynamic_mx_quant rounds to nearest even (round_mode='rint'); act_rounding={s.act_rounding!r}"
    return None


@dataclass
class _MX:
    weight: torch.Tensor    # mxfp8: e4m3 [K, N]; mxfp4: int8 bytes [N, K/2] (two E2M1 each, low nibble first)
    scale: torch.Tensor     # mxfp8: [G/2, N, 2]; mxfp4: [N, G/2, 2] (transposed at the call)
    w4a8: bool = False      # mxfp4 with activation="mxfp8": E4M3 activations


def _fp4_bytes(qw: QuantizedWeight) -> torch.Tensor:
    """The weight's E2M1 codes packed two per byte [N, K/2], whichever storage the checkpoint used."""
    return pack_nibbles(qw.scheme.unpack(qw))


def _prepare_mx(qw: QuantizedWeight, device) -> _MX:
    from omniq.schemes.mx import e8m0_bytes
    b = _pair_scales(e8m0_bytes(qw.tensors["weight_scale"])).to(device)
    if qw.scheme.name == "mxfp8":
        return _MX(weight=qw.tensors["weight"].to(device).T.contiguous(), scale=b.transpose(0, 1).contiguous())
    return _MX(weight=_fp4_bytes(qw).to(device).view(torch.int8), scale=b, w4a8=qw.scheme.activation == "mxfp8")


MX_LAYOUT = Layout("npu.mx", _prepare_mx)


@register_kernel
class NpuMXFP8(_NpuKernel):
    """x_q, x_s = npu_dynamic_mx_quant(x, dst_type=float8_e4m3fn); y = npu_quant_matmul(x_q,
    W[K,N] e4m3, w_scale[G/2,N,2], scale_dtype=float8_e8m0fnu, pertoken_scale=x_s,
    pertoken_scale_dtype=float8_e8m0fnu, bias=fp32, group_sizes=[1, 1, 32])."""

    name = "npu.mxfp8.quant_matmul"
    schemes = ("mxfp8",)
    layout = MX_LAYOUT
    ops = ("npu_dynamic_mx_quant", "npu_quant_matmul")

    def _params_reason(self, s):
        if s.activation != "mxfp8":
            return "W8A8 only: mxfp8 weight-only (activation=None) has no torch_npu kernel"
        return _mx_scale_ok(s)

    def can_implement(self, problem):
        why = _half_only(problem, "npu_dynamic_mx_quant") or _dims_ok(problem, "npu_quant_matmul")
        if why:
            return why
        if problem.k % MX_BLOCK:
            return f"K={problem.k} is not a multiple of {MX_BLOCK}: the activation quantizer needs whole blocks"
        return None

    def run(self, x, p: _MX, bias):
        tnpu = _torch_npu()
        xq, xs = tnpu.npu_dynamic_mx_quant(x.contiguous(), dst_type=tnpu.float8_e4m3fn)
        return tnpu.npu_quant_matmul(xq, p.weight, p.scale, scale_dtype=tnpu.float8_e8m0fnu,
                                     pertoken_scale=xs, pertoken_scale_dtype=tnpu.float8_e8m0fnu,
                                     bias=_float_bias(bias), output_dtype=x.dtype, group_sizes=[1, 1, MX_BLOCK])


@register_kernel
class NpuMXFP4(_NpuKernel):
    """W4A4: x_q, x_s = npu_dynamic_mx_quant(x, dst_type=float4_e2m1fn_x2, round_mode="rint",
    scale_alg=0); y = npu_quant_matmul(x_q, W.T, w_scale.transpose(0, 1), x1_dtype/x2_dtype =
    float4_e2m1fn_x2, e8m0 scales, bias fp32, group_sizes=[1, 1, 32]). W4A8 (activation="mxfp8"):
    E4M3 activations, group_sizes=[0, 0, 32], bf16 bias and output (vLLM-Omni's fallback)."""

    name = "npu.mxfp4.quant_matmul"
    schemes = ("mxfp4",)
    layout = MX_LAYOUT
    ops = ("npu_dynamic_mx_quant", "npu_quant_matmul")

    def _params_reason(self, s):
        if s.activation is None:
            return "W4A4 and W4A8 only: mxfp4 weight-only (activation=None) has no torch_npu kernel"
        return _mx_scale_ok(s)

    def can_implement(self, problem):
        return _half_only(problem, "npu_dynamic_mx_quant") or _dims_ok(problem, "npu_quant_matmul")

    def run(self, x, p: _MX, bias):
        tnpu = _torch_npu()
        w, ws = p.weight.transpose(0, 1), p.scale.transpose(0, 1)   # [K/2, N], [G/2, N, 2] views
        e8m0, fp4 = tnpu.float8_e8m0fnu, tnpu.float4_e2m1fn_x2
        if p.w4a8:
            xq, xs = tnpu.npu_dynamic_mx_quant(x.contiguous(), dst_type=tnpu.float8_e4m3fn, axis=-1,
                                               block_size=MX_BLOCK, round_mode="rint", scale_alg=0)
            b = None if bias is None else bias.to(torch.bfloat16).reshape(1, -1)
            y = tnpu.npu_quant_matmul(xq, w, ws, scale_dtype=e8m0, x2_dtype=fp4, pertoken_scale=xs,
                                      pertoken_scale_dtype=e8m0, bias=b, output_dtype=torch.bfloat16,
                                      group_sizes=[0, 0, MX_BLOCK])
            return y.to(x.dtype)
        xq, xs = tnpu.npu_dynamic_mx_quant(x.contiguous(), dst_type=fp4, axis=-1, block_size=MX_BLOCK,
                                           round_mode="rint", scale_alg=0)
        return tnpu.npu_quant_matmul(xq, w, ws, scale_dtype=e8m0, x1_dtype=fp4, x2_dtype=fp4, pertoken_scale=xs,
                                     pertoken_scale_dtype=e8m0, bias=_float_bias(bias), output_dtype=x.dtype,
                                     group_sizes=[1, 1, MX_BLOCK])


@dataclass
class _MXDual:
    weight: torch.Tensor     # int8 bytes [N, K/2] (two E2M1 each), NZ
    fine: torch.Tensor       # E8M0 [N, K/64, 2]
    coarse: torch.Tensor     # fp32 [K/512, N]
    mul_scale: dict          # x dtype -> [K]


def _prepare_dual(qw: QuantizedWeight, device) -> _MXDual:
    from omniq.schemes.mx import e8m0_bytes
    n, k = qw.shape
    tnpu = _torch_npu()
    w = _fp4_bytes(qw).to(device).view(torch.int8)
    return _MXDual(weight=tnpu.npu_format_cast(w.contiguous(), NZ_FORMAT, customize_dtype=torch.int8),
                   fine=e8m0_bytes(qw.tensors["weight_scale"]).to(device).reshape(n, -1, 2).contiguous(),
                   coarse=qw.tensors["weight_dual_scale"].float().reshape(n, -1).T.contiguous().to(device),
                   mul_scale=_per_dtype(qw.tensors["mul_scale"].float().reshape(k).to(device)))


@register_kernel
class NpuMXFP4DualScale(_NpuKernel):
    """x_q, l0, l1 = npu_dynamic_dual_level_mx_quant(x, smooth_scale=mul_scale);
    y = npu_dual_level_quant_matmul(x_q, W (NZ), l0, weight_dual_scale[K/512, N], l1,
    weight_scale[N, K/64, 2], bias=fp32). The op smooths and stages in x's dtype: mul_scale is
    rounded to it, and the level-0 quotient is cast to it before the level-1 exponent."""

    name = "npu.mxfp4_dualscale.dual_level_matmul"
    schemes = ("mxfp4_dualscale",)
    layout = Layout("npu.mxfp4_dualscale_nz", _prepare_dual)
    ops = ("npu_dynamic_dual_level_mx_quant", "npu_dual_level_quant_matmul", "npu_format_cast")

    def _params_reason(self, s):
        if s.activation is None:
            return "W4A4 only: mxfp4_dualscale weight-only (activation=None) has no torch_npu kernel"
        if s.act_rounding != "rne":
            return f"the NPU quantizer rounds to nearest even (round_mode='rint'); act_rounding={s.act_rounding!r}"
        return None

    def can_implement(self, problem):
        return _half_only(problem, "npu_dynamic_dual_level_mx_quant")

    def run(self, x, p: _MXDual, bias):
        tnpu = _torch_npu()
        xq, l0, l1 = tnpu.npu_dynamic_dual_level_mx_quant(x.contiguous(), smooth_scale=p.mul_scale[x.dtype])
        return tnpu.npu_dual_level_quant_matmul(xq, p.weight, l0, p.coarse, l1, p.fine, bias=_float_bias(bias),
                                                output_dtype=x.dtype)
