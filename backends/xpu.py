"""Intel XPU kernels: PyTorch's own XPU quantized ops, and IPEX's weight-only linear, behind
omniq's dispatcher. (Triton compiles for XPU too: the Triton backend serves it wherever
these have nothing.)

  kernel                      schemes                         op
  xpu.int4.scales_zeros       gptq (4-bit), awq               torch.ops.aten._weight_int4pack_mm_with_scales_and_zeros
  xpu.int4.tinygemm           gptq (4-bit), awq               torch.ops.aten._weight_int4pack_mm
  xpu.fp8.scaled_mm           fp8 (tensor/channel weights,    torch.ops.aten._scaled_mm
                              token/tensor/static act.)
  xpu.ipex.woq_linear         gptq (4-bit, v1), awq           intel_extension_for_pytorch weight-only linear

Every aten op schema exists in every torch build, so availability asks whether this build has
an XPU *kernel* for the op; IPEX is imported lazily, never at omniq import.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

import torch

from omniq.dispatch import Kernel, Layout, Problem, register_kernel
from omniq.errors import OmniqError, where
from omniq.schemes.base import QuantizedWeight, QuantScheme

DEVICE_TYPE = "xpu"
HALF = (torch.float16, torch.bfloat16)
INT4_GROUP_SIZES = (32, 64, 128, 256)   # what the oneDNN / tinygemm int4 paths take (or one group of K)


# ---- availability hooks (tests replace these: a CPU tensor stands in for an XPU one) -------------
def _xpu_present() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _device_ok(device: torch.device) -> bool:
    return torch.device(device).type == DEVICE_TYPE


def _has_xpu_kernel(op: str) -> bool:
    if not hasattr(torch.ops.aten, op):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "XPU")
    except Exception:  # an older torch without the probe: trust the schema
        return True


def _op(name: str):
    return getattr(torch.ops.aten, name)


def xpu_unavailable(device, aten_ops: tuple[str, ...] = ()) -> str | None:
    if not _xpu_present():
        return "unavailable: torch has no XPU device (torch.xpu.is_available() is False)"
    device = torch.device(device)
    if not _device_ok(device):
        return f"device is {device.type}, not {DEVICE_TYPE}"
    missing = [op for op in aten_ops if not _has_xpu_kernel(op)]
    if missing:
        return (f"unavailable: this torch build has no XPU kernel for {', '.join('aten::' + m for m in missing)} "
                f"(needs a recent torch built with XPU)")
    return None


_ipex_failure: list[str] = []


def _import_ipex():
    mod = sys.modules.get("intel_extension_for_pytorch")
    if mod is not None:
        return mod, None
    if _ipex_failure:
        return None, _ipex_failure[0]
    try:
        return importlib.import_module("intel_extension_for_pytorch"), None
    except ImportError:
        reason = "unavailable: intel_extension_for_pytorch is not installed"
    except Exception as e:
        reason = f"unavailable: importing intel_extension_for_pytorch failed ({type(e).__name__}: {e})"
    _ipex_failure.append(reason)
    return None, reason


def _fail(qw: QuantizedWeight, kernel: str, msg: str):
    raise OmniqError(f"{where(qw.name)}{kernel}: {msg}")


class _XpuKernel(Kernel):
    backend = "xpu"
    priority = 60
    aten_ops: tuple[str, ...] = ()

    def available(self, device) -> str | None:
        return xpu_unavailable(device, self.aten_ops)

    def _params_reason(self, scheme: QuantScheme) -> str | None:
        return None

    def serves(self, scheme: QuantScheme) -> str | None:
        return super().serves(scheme) or self._params_reason(scheme)


def _int4_params_reason(s: QuantScheme) -> str | None:
    if getattr(s, "bits", 4) != 4:
        return f"int4 kernel; {s.name} bits={s.bits}"
    if getattr(s, "desc_act", False):
        return "act-order (desc_act) g_idx is not supported: the op needs contiguous groups along K"
    return None


def _int4_can_implement(problem: Problem, op: str) -> str | None:
    if problem.act_dtype not in HALF:
        return f"{op} takes float16/bfloat16 activations, not {str(problem.act_dtype).replace('torch.', '')}"
    k = problem.k
    g = getattr(problem.scheme, "group_size", -1)
    g = k if g in (-1, None) else g
    if g != k and g not in INT4_GROUP_SIZES:
        return f"group_size={g}: the op takes {list(INT4_GROUP_SIZES)} or one group per output channel"
    if k % g or k % 8:
        return f"K={k} must be a multiple of the group size {g} and of 8"
    return None


# ---- int4 weight-only: shared preparation ------------------------------------------------------
def _unsigned_int4(qw: QuantizedWeight, kernel: str):
    """(codes uint4 [N, K] int64, scales [N, G] fp32, offsets [N, G] fp32, group size) from the
    scheme's AffineView, codes shifted to 0..15: W = codes * s + off."""
    av = qw.scheme.affine_view(qw)
    if av is None or av.bits != 4 or av.g_idx is not None:
        _fail(qw, kernel, "needs 4-bit integer codes with contiguous groups along K")
    codes = av.codes.long()
    s = av.scales.float()
    off = torch.zeros_like(s) if av.offsets is None else av.offsets.float()
    if av.signed:   # signed c = u - 8: W = (u - 8) s + off
        codes, off = codes + 8, off - 8 * s
    return codes, s, off, av.group_size


def _uint8_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint4 codes [N, K] -> uint8 [N, K/2], element 2i in the low nibble (what
    _convert_weight_to_int4pack reads)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()


def _per_dtype(t: torch.Tensor) -> dict:
    return {d: t.to(d).contiguous() for d in HALF}


@dataclass
class _Int4ZP:
    weight: torch.Tensor                   # int32 [N, K/8] (op-internal int4 layout)
    scale: dict = field(default_factory=dict)   # x dtype -> [G, N]
    zeros: torch.Tensor | None = None      # int8 [G, N] integer zero points
    group_size: int = 0
    n: int = 0


def _prepare_scales_zeros(qw: QuantizedWeight, device) -> _Int4ZP:
    name = "xpu.int4.scales_zeros"
    codes, s, off, g = _unsigned_int4(qw, name)
    n, k = qw.shape
    # W = (q - zp) * s: the zero point must be an integer, zp = -off / s
    safe = torch.where(s == 0, torch.ones_like(s), s)
    zp = torch.where(s == 0, torch.zeros_like(off), -off / safe)
    if not bool((zp == torch.round(zp)).all()) or bool(((zp < -128) | (zp > 127)).any()):
        _fail(qw, name, "zero points (-offset/scale) are not integers in int8 range; use xpu.int4.tinygemm "
                        "(float zeros) for this weight")
    w = _op("_convert_weight_to_int4pack")(_uint8_pairs(codes).to(device), 8)
    return _Int4ZP(weight=w, scale=_per_dtype(s.T.contiguous().to(device)),
                   zeros=zp.T.contiguous().to(device=device, dtype=torch.int8), group_size=g, n=n)


@register_kernel
class XpuInt4ScalesZeros(_XpuKernel):
    """y = aten._weight_int4pack_mm_with_scales_and_zeros(x, W, G, scale[G, N], zeros[G, N] int8),
    W = (q - zero) * scale, q 0..15 (oneDNN weight-only int4)."""

    name = "xpu.int4.scales_zeros"
    schemes = ("gptq", "awq")
    layout = Layout("xpu.int4_scales_zeros", _prepare_scales_zeros)
    aten_ops = ("_convert_weight_to_int4pack", "_weight_int4pack_mm_with_scales_and_zeros")

    def _params_reason(self, s):
        return _int4_params_reason(s)

    def can_implement(self, problem):
        return _int4_can_implement(problem, "_weight_int4pack_mm_with_scales_and_zeros")

    def run(self, x, p: _Int4ZP, bias):
        y = _op("_weight_int4pack_mm_with_scales_and_zeros")(x.contiguous(), p.weight, p.group_size,
                                                             p.scale[x.dtype], p.zeros)
        y = y[:, :p.n]   # the op may pad N to its tile width
        return y if bias is None else (y.float() + bias.float()).to(x.dtype)


@dataclass
class _Int4SZ:
    weight: torch.Tensor                        # int32 [N, K/8]
    scale_and_zeros: dict = field(default_factory=dict)  # x dtype -> [G, N, 2]
    group_size: int = 0
    n: int = 0


def _prepare_tinygemm(qw: QuantizedWeight, device) -> _Int4SZ:
    codes, s, off, g = _unsigned_int4(qw, "xpu.int4.tinygemm")
    n, k = qw.shape
    # tinygemm convention: W = (q - 8) * scale + zero, so zero = off + 8 * scale (a float)
    sz = torch.stack((s.T, (off + 8 * s).T), dim=-1).contiguous()
    w = _op("_convert_weight_to_int4pack")(_uint8_pairs(codes).to(device), 8)
    return _Int4SZ(weight=w, scale_and_zeros=_per_dtype(sz.to(device)), group_size=g, n=n)


@register_kernel
class XpuInt4Tinygemm(_XpuKernel):
    """y = aten._weight_int4pack_mm(x, W, G, qScaleAndZeros[G, N, 2]), W = (q - 8) * scale + zero:
    float zeros, so any affine int4 weight fits (the zero is rounded to x's dtype)."""

    name = "xpu.int4.tinygemm"
    schemes = ("gptq", "awq")
    priority = 50
    layout = Layout("xpu.int4_tinygemm", _prepare_tinygemm)
    aten_ops = ("_convert_weight_to_int4pack", "_weight_int4pack_mm")

    def _params_reason(self, s):
        return _int4_params_reason(s)

    def can_implement(self, problem):
        return _int4_can_implement(problem, "_weight_int4pack_mm")

    def run(self, x, p: _Int4SZ, bias):
        y = _op("_weight_int4pack_mm")(x.contiguous(), p.weight, p.group_size, p.scale_and_zeros[x.dtype])[:, :p.n]
        return y if bias is None else (y.float() + bias.float()).to(x.dtype)


# ---- FP8 W8A8 via _scaled_mm ---------------------------------------------------------------------
@dataclass
class _FP8:
    weight: torch.Tensor        # float8_e4m3fn [N, K] (passed transposed: column-major mat2)
    scale_b: torch.Tensor       # fp32 [1, N] (row-wise) or () (tensor-wise)
    input_scale: torch.Tensor | None
    activation: str             # the fp8 scheme's activation rule


def _prepare_fp8(qw: QuantizedWeight, device) -> _FP8:
    n, k = qw.shape
    t = qw.tensors
    ws = t["weight_scale"].float()
    ws = ws.reshape(()) if qw.scheme.weight_granularity == "tensor" else ws.reshape(1, n)
    s_in = t.get("input_scale")
    return _FP8(weight=t["weight"].to(device).contiguous(), scale_b=ws.to(device).contiguous(),
                input_scale=None if s_in is None else s_in.float().reshape(()).to(device),
                activation=qw.scheme.activation)


def _fp8_quantize(x: torch.Tensor, p: _FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q e4m3, scale_a) by the fp8 scheme's activation formulas (omniq.schemes.fp8)."""
    from omniq.schemes.fp8 import fp8_activation_codes
    return fp8_activation_codes(x.float(), p.activation, p.input_scale)


@register_kernel
class XpuFP8ScaledMM(_XpuKernel):
    """FP8 W8A8: x quantized as the fp8 scheme defines, then aten._scaled_mm(x_q, W^T, scale_a,
    scale_b, out_dtype=x.dtype), tensor-wise when both scales are scalars, else row-wise."""

    name = "xpu.fp8.scaled_mm"
    schemes = ("fp8",)
    layout = Layout("xpu.fp8_nk", _prepare_fp8)
    aten_ops = ("_scaled_mm",)

    def _params_reason(self, s):
        if s.weight_granularity not in ("tensor", "channel"):
            return f"_scaled_mm takes tensor-wise or row-wise scales; weight_granularity={s.weight_granularity!r}"
        if s.activation not in ("dynamic_token", "dynamic_tensor", "static_tensor"):
            return f"W8A8 with per-token or per-tensor activations only; activation={s.activation!r}"
        return None

    def can_implement(self, problem):
        if problem.act_dtype not in HALF + (torch.float32,):
            return f"_scaled_mm outputs float16/bfloat16/float32, not {problem.act_dtype}"
        return None

    def run(self, x, p: _FP8, bias):
        xq, sa = _fp8_quantize(x, p)
        m, n = x.shape[0], p.weight.shape[0]
        sb = p.scale_b
        if sa.dim() == 0 and sb.dim() == 0:
            scale_a, scale_b = sa, sb
        else:   # row-wise: [M, 1] and [1, N]
            scale_a = sa.reshape(1, 1).expand(m, 1) if sa.numel() == 1 else sa.reshape(m, 1)
            scale_b = sb.reshape(1, 1).expand(1, n) if sb.numel() == 1 else sb
        y = _op("_scaled_mm")(xq, p.weight.t(), scale_a.float().contiguous(), scale_b.float().contiguous(),
                              out_dtype=x.dtype)
        return y if bias is None else (y.float() + bias.float()).to(x.dtype)


# ---- IPEX weight-only linear --------------------------------------------------------------------
IPEX_GPTQ, IPEX_AWQ = 0, 1   # quant_method ids of IPEX's from_weight (vLLM's IPEX_QUANT_METHOD_MAP)


@dataclass
class _Ipex:
    layer: torch.nn.Module


def _prepare_ipex(qw: QuantizedWeight, device) -> _Ipex:
    ipex, reason = _import_ipex()
    if ipex is None:
        _fail(qw, "xpu.ipex.woq_linear", reason)
    n, k = qw.shape
    s = qw.scheme
    t = {name: v.to(device) for name, v in qw.tensors.items()}
    g = k if s.group_size == -1 else s.group_size
    q = ipex.quantization
    qconfig = q.get_weight_only_quant_qconfig_mapping(weight_dtype=q.WoqWeightDtype.INT4,
                                                      lowp_mode=q.WoqLowpMode.BF16, group_size=g)
    # the checkpoint tensors go in as they are: IPEX unpacks GPTQ (v1) and AWQ itself
    layer = ipex.llm.quantization.woq_linear.IPEXWeightOnlyQuantizedLinear.from_weight(
        t["qweight"], t["scales"], t["qzeros"], k, n, qconfig=qconfig, bias=None, group_size=g,
        g_idx=t.get("g_idx") if s.name == "gptq" and s.desc_act else None,
        quant_method=IPEX_GPTQ if s.name == "gptq" else IPEX_AWQ)
    return _Ipex(layer=layer)


@register_kernel
class XpuIpexWoq(_XpuKernel):
    """intel_extension_for_pytorch's weight-only-quantized linear built from the GPTQ / AWQ
    checkpoint tensors (IPEXWeightOnlyQuantizedLinear.from_weight), lowp_mode BF16 (activations
    are not quantized)."""

    name = "xpu.ipex.woq_linear"
    schemes = ("gptq", "awq")
    priority = 40
    layout = Layout("xpu.ipex_woq", _prepare_ipex)

    def available(self, device):
        why = xpu_unavailable(device)
        if why:
            return why
        return _import_ipex()[1]

    def _params_reason(self, s):
        if getattr(s, "bits", 4) != 4:
            return f"IPEX weight-only linear here is int4; {s.name} bits={s.bits}"
        if s.name == "gptq" and s.checkpoint_format != "gptq":
            return "IPEX's GPTQ path reads AutoGPTQ (v1, zeros stored minus one) checkpoints, not gptq_v2"
        return None

    def can_implement(self, problem):
        if problem.act_dtype not in HALF:
            return f"IPEX weight-only linear takes float16/bfloat16 activations, not {problem.act_dtype}"
        return None

    def run(self, x, p: _Ipex, bias):
        y = p.layer(x)
        return y if bias is None else (y.float() + bias.float()).to(x.dtype)
