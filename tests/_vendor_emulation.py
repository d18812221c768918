"""EMULATIONS of vendor ops, for testing omniq's NPU and XPU backends on a machine without
the hardware. Plain torch (and ml_dtypes for E2M1 rounding), written from each op's
documented semantics; nothing here is used by omniq itself, and nothing here is a vendor's code.

Sources of the semantics (read, not copied):
  torch_npu: Ascend/op-plugin docs/context/torch_npu-npu_{quant_matmul, quantize, dynamic_quant,
    weight_quant_batchmatmul, convert_weight_to_int4pack}.md; CANN ops-nn (hicann/ops-nn)
    quant/dynamic_mx_quant, quant/dynamic_dual_level_mx_quant, matmul/dual_level_quant_batch_matmul,
    quant/trans_quant_param; argument conventions as vLLM-Ascend and vLLM-Omni call them
    (shared/reference/vllm-kernels.md §4.3, vllm-omni.md §1.4).
  XPU: aten::_weight_int4pack_mm_with_scales_and_zeros (W = (q - zero) * scale, uint4 q, zero
    int8 [K/G, N], scale [K/G, N]), aten::_weight_int4pack_mm (tinygemm convention
    W = (q - 8) * scale + zero, qScaleAndZeros [K/G, N, 2]), _convert_weight_to_int4pack
    ([N, K/2] uint8, element 2i in the low nibble -> [N, K/8] int32) as torchao's XPU
    Int4PlainInt32Tensor and torch's tests use them.
  IPEX: WeightOnlyQuantizedLinear.from_weight(qweight, scales, qzeros, in, out, qconfig, bias,
    group_size, g_idx, quant_method) with quant_method 0 = GPTQ (AutoGPTQ v1: stored zeros
    + 1), 1 = AWQ (AutoAWQ interleave), as vLLM's IPEX integration called it.

Stated assumptions where the docs are silent: the NPU rounds half to even ("rint") in
npu_quantize and npu_dynamic_quant (formats.md §6.1 marks it unverified); int64 quant scales
keep the 19 high bits of the fp32 pattern (aclnnTransQuantParam); int4pack layouts are
internal (the emulated pack and matmul agree with each other, as the real ones must); FP8
destinations saturate; the dual-level op applies its smooth scale in x's dtype.

Every emulated op checks the argument rules its docs state (dtypes, shapes, limits) and
raises `VendorOpError` when the caller breaks one: that is half of what the backend tests check.
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import ml_dtypes
import numpy as np
import torch

MAX_DIM = 65535
E4M3_MAX = 448.0
E2M1_MAX = 6.0
HALF = (torch.float16, torch.bfloat16)


class VendorOpError(RuntimeError):
    """The emulated op's documented argument rules were broken (the real op errors too)."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise VendorOpError(msg)


# ---- element codecs, independent of omniq.formats ---------------------------------------------
def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Round to the E2M1 grid, ties to even, saturating at ±6 (ml_dtypes' float4_e2m1fn cast)."""
    a = v.detach().float().clamp(-E2M1_MAX, E2M1_MAX).cpu().numpy()
    return torch.from_numpy(a.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)).to(v.device)


_E2M1_LUT = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def e2m1_code(v: torch.Tensor) -> torch.Tensor:
    """Values already on the E2M1 grid -> 4-bit codes (sign bit 3)."""
    mag = v.abs()
    idx = torch.bucketize(mag, _E2M1_LUT[:8].to(v.device))  # exact grid values: index of equal entry
    return (idx + 8 * (v < 0).long()).to(torch.uint8)


def unpack_fp4_bytes(b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] (element 2i in the low nibble) -> float32 values [..., K]."""
    u = b.contiguous().view(torch.uint8).long()
    codes = torch.stack((u & 0xF, u >> 4), dim=-1).flatten(-2)
    return _E2M1_LUT.to(b.device)[codes]


def pack_fp4_values(v: torch.Tensor) -> torch.Tensor:
    c = e2m1_code(v)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def e8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    u = b.contiguous().view(torch.uint8).long()
    out = torch.pow(2.0, (u - 127).double()).float()
    return torch.where(u == 255, torch.full_like(out, float("nan")), out)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0, exactly (frexp, no float log)."""
    _, e = torch.frexp(a.float())
    return (e - 1).long()


def ocp_exponent(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """OCP MX shared exponent (scale_alg 0): floor(log2 amax) - emax, -127 for amax 0, at least -127."""
    safe = torch.where(amax > 0, amax.float(), torch.ones_like(amax.float()))
    e = floor_log2(safe) - emax
    return torch.where(amax > 0, e.clamp(min=-127), torch.full_like(e, -127))


def pair_pad(b: torch.Tensor) -> torch.Tensor:
    """[..., G] E8M0 bytes -> [..., ceil(G/2), 2], zero-padded (the ops' scale layout)."""
    g = b.shape[-1]
    if g % 2:
        b = torch.cat([b, torch.zeros(*b.shape[:-1], 1, dtype=b.dtype, device=b.device)], dim=-1)
    return b.reshape(*b.shape[:-1], -1, 2)


def unpair(b: torch.Tensor, g: int) -> torch.Tensor:
    return b.reshape(*b.shape[:-2], -1)[..., :g]


# ==================================== torch_npu ====================================
def _trans_quant_param_decode(scale: torch.Tensor) -> torch.Tensor:
    """int64 quant scale (npu_trans_quant_param / msModelSlim) -> the fp32 the hardware uses:
    the low 32 bits hold the fp32 pattern, of which the 19 high bits are kept."""
    low = scale & 0xFFFFFFFF & 0xFFFFE000
    low = torch.where(low >= 2**31, low - 2**32, low)
    return low.to(torch.int32).view(torch.float32)


class FakeTorchNpu(types.ModuleType):
    """An emulated `torch_npu` module. `calls` records (op, kwargs) of each call."""

    float8_e4m3fn = torch.float8_e4m3fn
    float8_e8m0fnu = torch.float8_e8m0fnu
    float4_e2m1fn_x2 = torch.float4_e2m1fn_x2

    def __init__(self):
        super().__init__("torch_npu")
        self.__file__ = "<emulation>"
        self.calls: list[tuple[str, dict]] = []

    def _log(self, op, **kw):
        self.calls.append((op, kw))

    # ---- layout helpers ----
    def npu_format_cast(self, t, acl_format, customize_dtype=None):
        self._log("npu_format_cast", acl_format=acl_format, customize_dtype=customize_dtype)
        _require(acl_format in (2, 29), f"npu_format_cast: unsupported format {acl_format}")
        return t  # FRACTAL_NZ is a physical tiling: values and logical shape are unchanged

    def npu_trans_quant_param(self, scale, offset=None, round_mode=0):
        self._log("npu_trans_quant_param")
        _require(scale.dtype == torch.float32, "npu_trans_quant_param: scale must be float32")
        bits = scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        return (bits & 0xFFFFE000) | (1 << 46)

    def npu_convert_weight_to_int4pack(self, weight, inner_k_tiles=0):
        self._log("npu_convert_weight_to_int4pack")
        _require(weight.dtype == torch.int32 and weight.dim() == 2, "int4pack: weight must be 2-D int32")
        _require(weight.is_contiguous(), "int4pack: weight must be contiguous")
        _require(weight.shape[-1] % 8 == 0, "int4pack: last dimension must be a multiple of 8")
        _require(bool(((weight >= -8) & (weight <= 7)).all()), "int4pack: values must be in [-8, 7]")
        v = (weight.long() & 0xF).reshape(weight.shape[0], -1, 8)
        word = (v << (4 * torch.arange(8, device=v.device))).sum(-1)
        return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)

    @staticmethod
    def _unpack_int4pack(w: torch.Tensor) -> torch.Tensor:
        u = (w.long() & 0xFFFFFFFF).unsqueeze(-1) >> (4 * torch.arange(8, device=w.device))
        u = (u & 0xF).flatten(-2)
        return u - 16 * (u >= 8).long()

    # ---- quantizers ----
    def npu_quantize(self, input, scales, zero_points, dtype, axis=1, div_mode=True):
        self._log("npu_quantize", dtype=dtype, axis=axis, div_mode=div_mode, scales=scales.dtype,
                  zero_points=None if zero_points is None else zero_points.dtype)
        _require(dtype == torch.qint8, "npu_quantize: only qint8 is emulated")
        _require(input.dtype in (torch.float32,) + HALF, "npu_quantize: input must be float/fp16/bf16")
        k = input.shape[-1]
        _require(axis in (-1, input.dim() - 1), "npu_quantize: emulated along the last axis only")
        _require(scales.dim() == 1 and scales.numel() in (1, k), "npu_quantize: scales must be (1,) or (K,)")
        if div_mode:
            _require(scales.dtype in (torch.float32, torch.bfloat16), "npu_quantize(div_mode=True): scales float/bf16")
            _require(zero_points is None or zero_points.dtype in (torch.int8, torch.uint8, torch.int32, torch.bfloat16),
                     "npu_quantize(div_mode=True): zero_points int8/uint8/int32/bf16")
            v = input.float() / scales.float()
        else:
            _require(zero_points is None or (zero_points.dtype == scales.dtype and zero_points.shape == scales.shape),
                     "npu_quantize(div_mode=False): zero_points must match scales in shape and dtype")
            v = input.float() * scales.float()
        if zero_points is not None:
            v = v + zero_points.float()
        return torch.round(v).clamp(-128, 127).to(torch.int8)

    def npu_dynamic_quant(self, x, *, smooth_scales=None, group_index=None, dst_type=None):
        self._log("npu_dynamic_quant")
        _require(x.dtype in HALF, "npu_dynamic_quant: x must be float16/bfloat16")
        _require(dst_type in (None, torch.int8), "npu_dynamic_quant: only int8 output is emulated")
        v = x.float()
        if smooth_scales is not None:
            v = v * smooth_scales.float()
        scale = v.abs().amax(dim=-1) / 127.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        y = torch.round(v / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
        return y, scale

    def npu_dynamic_mx_quant(self, x, *, axis=-1, round_mode="rint", dst_type=torch.float4_e2m1fn_x2,
                             block_size=32, scale_alg=0, dst_type_max=0.0):
        self._log("npu_dynamic_mx_quant", dst_type=dst_type, round_mode=round_mode, scale_alg=scale_alg,
                  block_size=block_size)
        _require(x.dtype in HALF, "npu_dynamic_mx_quant: x must be float16/bfloat16")
        _require(axis in (-1, x.dim() - 1) and block_size == 32, "emulated: axis=-1, block_size=32")
        _require(round_mode == "rint" and scale_alg == 0, "emulated: round_mode='rint', scale_alg=0 (OCP)")
        fp4 = dst_type == torch.float4_e2m1fn_x2
        _require(fp4 or dst_type == torch.float8_e4m3fn, f"npu_dynamic_mx_quant: unsupported dst_type {dst_type}")
        m, k = x.shape
        _require(k % 32 == 0, "emulated: K a multiple of 32")
        g = k // 32
        xb = x.float().reshape(m, g, 32)
        e = ocp_exponent(xb.abs().amax(-1), 2 if fp4 else 8)
        v = xb * torch.pow(2.0, -e.double()).float().unsqueeze(-1)   # exact: a power of two
        if fp4:
            y = pack_fp4_values(e2m1_round(v).reshape(m, k))
        else:
            y = v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(m, k)
        scale = pair_pad((e + 127).to(torch.uint8)).view(torch.float8_e8m0fnu)
        return y, scale

    def npu_dynamic_dual_level_mx_quant(self, x, *, smooth_scale=None, round_mode="rint",
                                        level0_block_size=512, level1_block_size=32):
        self._log("npu_dynamic_dual_level_mx_quant", smooth=smooth_scale is not None)
        _require(x.dtype in HALF, "dual_level_mx_quant: x must be float16/bfloat16")
        _require(level0_block_size == 512 and level1_block_size == 32 and round_mode == "rint",
                 "dual_level_mx_quant: level0 512, level1 32, round_mode 'rint'")
        m, k = x.shape
        _require(k % 512 == 0, "emulated: K a multiple of 512")
        if smooth_scale is not None:
            _require(smooth_scale.dtype == x.dtype and smooth_scale.shape == (k,),
                     "dual_level_mx_quant: smooth_scale must be 1-D (K,) in x's dtype")
            x = (x.float() * smooth_scale.float()).to(x.dtype)
        xb = x.float().reshape(m, k // 512, 512)
        l0 = xb.abs().amax(-1) / E2M1_MAX
        safe = torch.where(l0 == 0, torch.ones_like(l0), l0)
        temp = (xb / safe.unsqueeze(-1)).to(x.dtype).float().reshape(m, k // 32, 32)   # cast_to_x_type
        e = ocp_exponent(temp.abs().amax(-1), 2)
        v = temp * torch.pow(2.0, -e.double()).float().unsqueeze(-1)
        y = pack_fp4_values(e2m1_round(v).reshape(m, k))
        l1 = pair_pad((e + 127).to(torch.uint8)).view(torch.float8_e8m0fnu)
        return y, l0, l1

    # ---- matmuls ----
    def npu_quant_matmul(self, x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                         x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None):
        self._log("npu_quant_matmul", x1=x1.dtype, x2=x2.dtype, scale=scale.dtype, bias=None if bias is None
                  else bias.dtype, pertoken=pertoken_scale is not None, output_dtype=output_dtype,
                  scale_dtype=scale_dtype, group_sizes=group_sizes, x1_dtype=x1_dtype, x2_dtype=x2_dtype)
        _require(output_dtype in HALF, "emulated: output_dtype float16 or bfloat16")
        _require(scale.dtype != torch.float16, "npu_quant_matmul: a float16 scale is rejected (error 161002)")
        if scale_dtype == torch.float8_e8m0fnu:
            return self._mx_matmul(x1, x2, scale, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                                   pertoken_scale_dtype, group_sizes)
        _require(x1.dtype == torch.int8 and x2.dtype == torch.int8, "emulated: int8 x int8")
        m, k = x1.shape
        _require(x2.shape[0] == k, f"npu_quant_matmul: x2 must be [K, N]; got {tuple(x2.shape)} for K={k}")
        n = x2.shape[1]
        _require(k <= MAX_DIM and n <= MAX_DIM, "npu_quant_matmul: x1 and x2 last dimensions must be <= 65535")
        _require(scale.dim() == 1 and scale.numel() in (1, n), "npu_quant_matmul: scale must be (1,) or (N,)")
        pt = pertoken_scale is not None
        if pt:
            _require(pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == (m,),
                     "npu_quant_matmul: pertoken_scale must be float32 (M,)")
        # the dtype combinations of the docs' table (Atlas A2/A3)
        bd = None if bias is None else bias.dtype
        if output_dtype == torch.bfloat16:
            _require(scale.dtype in (torch.float32, torch.bfloat16), "bf16 output: scale float32/bfloat16")
            _require(bd in (None, torch.int32, torch.bfloat16, torch.float32), "bf16 output: bias int32/bf16/fp32")
        elif pt:
            _require(scale.dtype == torch.float32, "fp16 output with pertoken_scale: scale float32")
            _require(bd in (None, torch.int32, torch.float16, torch.float32), "fp16 output: bias int32/fp16/fp32")
        else:
            _require(scale.dtype in (torch.int64, torch.float32), "fp16 output: scale int64/float32")
            _require(bd in (None, torch.int32), "fp16 output without pertoken_scale: bias int32")
        if bias is not None:
            _require(bias.shape == (n,), "npu_quant_matmul: bias must be (N,)")
        acc = x1.long() @ x2.long()                                  # int32 accumulation, exact
        if bd == torch.int32:
            acc = acc + bias.long()
        s = _trans_quant_param_decode(scale) if scale.dtype == torch.int64 else scale.float()
        out = acc.float() * s
        if pt:
            out = out * pertoken_scale.unsqueeze(-1)
        if bias is not None and bd != torch.int32:
            out = out + bias.float()
        return out.to(output_dtype)

    def _mx_matmul(self, x1, x2, scale, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                   pertoken_scale_dtype, group_sizes):
        _require(pertoken_scale is not None and pertoken_scale_dtype == torch.float8_e8m0fnu,
                 "MX: pertoken_scale with pertoken_scale_dtype=float8_e8m0fnu")
        _require(group_sizes is not None and list(group_sizes)[-1] == 32, "MX: group_sizes [.., .., 32]")
        fp4 = torch.float4_e2m1fn_x2
        if x1_dtype == fp4:
            _require(x1.dtype in (torch.uint8, torch.int8), "MX: fp4 x1 travels as bytes")
            a = unpack_fp4_bytes(x1)
        else:
            _require(x1.dtype == torch.float8_e4m3fn, "MX: x1 float8_e4m3fn unless x1_dtype=float4_e2m1fn_x2")
            a = x1.float()
        m, k = a.shape
        if x2_dtype == fp4:
            _require(x2.dim() == 2 and x2.shape[0] * 2 == k and x2.stride(0) == 1,
                     "MX: fp4 x2 must be the transposed view [K/2, N] of a contiguous [N, K/2]")
            w = unpack_fp4_bytes(x2.t())                              # [N, K]
        else:
            _require(x2.dtype == torch.float8_e4m3fn and x2.shape[0] == k, "MX: x2 float8_e4m3fn [K, N]")
            w = x2.float().t()
        n = w.shape[0]
        _require(k <= MAX_DIM and n <= MAX_DIM, "npu_quant_matmul: K and N at most 65535")
        g = k // 32
        _require(scale.dim() == 3 and scale.shape[1] == n and scale.shape[2] == 2 and scale.shape[0] == -(-g // 2),
                 f"MX: scale must be [ceil(G/2), N, 2]; got {tuple(scale.shape)}")
        _require(pertoken_scale.shape == (m, -(-g // 2), 2), "MX: pertoken_scale must be [M, ceil(G/2), 2]")
        if bias is not None:
            _require(bias.dtype in (torch.float32, torch.bfloat16) and bias.numel() == n, "MX: bias fp32/bf16 (N)")
        ws = e8m0_to_float(unpair(scale.permute(1, 0, 2), g))           # [N, G]
        xs = e8m0_to_float(unpair(pertoken_scale, g))                   # [M, G]
        a = a * xs.repeat_interleave(32, -1)
        w = w * ws.repeat_interleave(32, -1)
        out = a @ w.t()
        if bias is not None:
            out = out + bias.float().reshape(1, n)
        return out.to(output_dtype)

    def npu_dual_level_quant_matmul(self, x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale,
                                    x2_level1_scale, *, bias=None, output_dtype=torch.bfloat16):
        self._log("npu_dual_level_quant_matmul", x2=x2.dtype, output_dtype=output_dtype)
        _require(output_dtype in HALF, "dual_level_quant_matmul: output float16/bfloat16")
        a = unpack_fp4_bytes(x1)
        m, k = a.shape
        _require(x2.dtype == torch.int8 and x2.dim() == 2 and x2.shape[1] * 2 == k,
                 "dual_level_quant_matmul: x2 int8 bytes [N, K/2] (FP4 pairs)")
        w = unpack_fp4_bytes(x2)
        n = w.shape[0]
        c, g = k // 512, k // 32
        _require(x1_level0_scale.dtype == torch.float32 and x1_level0_scale.shape == (m, c), "x1 level0 (M, K/512) fp32")
        _require(x2_level0_scale.dtype == torch.float32 and x2_level0_scale.shape == (c, n), "x2 level0 (K/512, N) fp32")
        _require(x1_level1_scale.shape == (m, g // 2, 2), "x1 level1 (M, K/64, 2)")
        _require(x2_level1_scale.shape == (n, g // 2, 2), "x2 level1 (N, K/64, 2)")
        if bias is not None:
            _require(bias.dtype == torch.float32 and bias.shape == (n,), "dual_level_quant_matmul: bias fp32 (N,)")
        a = a * e8m0_to_float(unpair(x1_level1_scale, g)).repeat_interleave(32, -1)
        w = w * e8m0_to_float(unpair(x2_level1_scale, g)).repeat_interleave(32, -1)
        # per 512-block partial products, each scaled by both level-0 scales
        part = torch.einsum("mck,nck->mnc", a.reshape(m, c, 512), w.reshape(n, c, 512))
        out = (part * x1_level0_scale.unsqueeze(1) * x2_level0_scale.t().unsqueeze(0)).sum(-1)
        if bias is not None:
            out = out + bias
        return out.to(output_dtype)

    def npu_weight_quant_batchmatmul(self, x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                     quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0):
        self._log("npu_weight_quant_batchmatmul", weight=weight.dtype, scale=antiquant_scale.dtype,
                  group=antiquant_group_size, bias=None if bias is None else bias.dtype)
        _require(x.dtype in HALF, "weight_quant_batchmatmul: x float16/bfloat16")
        _require(quant_scale is None and quant_offset is None, "emulated: no output quantization")
        m, k = x.shape
        if weight.dtype == torch.int8:
            _require(weight.shape[0] == k, "weight_quant_batchmatmul: weight must be [K, N]")
            w = weight.long()                                         # [K, N]
        else:
            _require(weight.dtype == torch.int32, "weight_quant_batchmatmul: weight int8 or int32 (int4pack)")
            if weight.shape[0] * 8 == k and weight.stride(0) == 1:      # transposed view of [N, K/8]
                w = self._unpack_int4pack(weight.t()).t()
            else:
                _require(weight.shape[0] == k, "weight_quant_batchmatmul: int4pack weight [K, N/8] or [K/8, N]^T")
                w = self._unpack_int4pack(weight)
        n = w.shape[1]
        _require(k <= MAX_DIM and n <= MAX_DIM, "weight_quant_batchmatmul: K and N in [1, 65535]")
        _require(antiquant_scale.dtype == x.dtype, "weight_quant_batchmatmul: antiquant_scale must be in x's dtype")
        g = antiquant_group_size
        if g:
            _require(g % 32 == 0 and 32 <= g <= k - 1, "antiquant_group_size: multiple of 32 in [32, K-1]")
            _require(antiquant_scale.shape == (-(-k // g), n), "per-group antiquant_scale must be (ceil(K/G), N)")
        else:
            _require(antiquant_scale.shape in ((n,), (1, n)), "per-channel antiquant_scale must be (N,) or (1, N)")
        if antiquant_offset is not None:
            _require(antiquant_offset.dtype == antiquant_scale.dtype and antiquant_offset.shape == antiquant_scale.shape,
                     "antiquant_offset must match antiquant_scale in dtype and shape")
        if bias is not None:
            want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
            _require(bias.dtype == want and bias.numel() == n, f"bias must be {want} (N,) for {x.dtype} x")
        sc = antiquant_scale.reshape(-1, n)
        off = None if antiquant_offset is None else antiquant_offset.reshape(-1, n)
        rows = torch.arange(k, device=x.device) // g if g else torch.zeros(k, dtype=torch.long, device=x.device)
        wv = w.to(x.dtype)
        if off is not None:
            wv = wv + off[rows]
        wv = wv * sc[rows]                                            # ANTIQUANT, in x's dtype
        out = x.float() @ wv.float()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)


@contextmanager
def fake_torch_npu(monkeypatch):
    """Install the emulated torch_npu for the duration (sys.modules) and let omniq's NPU backend
    accept the CPU tensors that stand in for NPU ones."""
    from omniq.backends import npu
    mod = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(npu, "_device_ok", lambda device: True)
    yield mod


# ==================================== XPU (aten ops) ====================================
def xpu_convert_weight_to_int4pack(w: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """[N, K/2] uint8 (element 2i low) -> [N, K/8] int32 (4 bytes per word, little endian)."""
    _require(w.dtype == torch.uint8 and w.dim() == 2 and w.shape[1] % 4 == 0,
             "_convert_weight_to_int4pack (XPU): weight must be uint8 [N, K/2] with K a multiple of 8")
    return w.contiguous().view(torch.int32)


def _xpu_unpack(w: torch.Tensor) -> torch.Tensor:
    _require(w.dtype == torch.int32 and w.dim() == 2, "XPU int4 mm: packed weight must be int32 [N, K/8]")
    u = w.contiguous().view(torch.uint8).long()
    return torch.stack((u & 0xF, u >> 4), dim=-1).flatten(-2)          # [N, K] 0..15


def xpu_weight_int4pack_mm_with_scales_and_zeros(x, w, group_size, scale, zeros):
    _require(x.dtype in HALF and x.dim() == 2, "_weight_int4pack_mm_with_scales_and_zeros: x fp16/bf16 [M, K]")
    q = _xpu_unpack(w)
    n, k = q.shape
    _require(x.shape[1] == k and k % group_size == 0, "K mismatch or not a multiple of the group size")
    g = k // group_size
    _require(scale.shape == (g, n) and scale.dtype == x.dtype, "scale must be [K/G, N] in x's dtype")
    _require(zeros.shape == (g, n) and zeros.dtype == torch.int8, "zeros must be int8 [K/G, N]")
    rows = torch.arange(k) // group_size
    wv = ((q - zeros.long().t()[:, rows]).to(x.dtype) * scale.t()[:, rows])      # [N, K] in x's dtype
    return (x.float() @ wv.float().t()).to(x.dtype)


def xpu_weight_int4pack_mm(x, w, group_size, q_scale_and_zeros):
    _require(x.dtype in HALF + (torch.float32,) and x.dim() == 2, "_weight_int4pack_mm: x [M, K] float")
    q = _xpu_unpack(w)
    n, k = q.shape
    g = k // group_size
    _require(x.shape[1] == k and k % group_size == 0, "K mismatch or not a multiple of the group size")
    _require(q_scale_and_zeros.shape == (g, n, 2) and q_scale_and_zeros.dtype == x.dtype,
             "qScaleAndZeros must be [K/G, N, 2] in x's dtype")
    rows = torch.arange(k) // group_size
    s = q_scale_and_zeros[..., 0].t()[:, rows]
    z = q_scale_and_zeros[..., 1].t()[:, rows]
    wv = (q - 8).to(x.dtype) * s + z
    return (x.float() @ wv.float().t()).to(x.dtype)


XPU_OPS = {
    "_convert_weight_to_int4pack": xpu_convert_weight_to_int4pack,
    "_weight_int4pack_mm_with_scales_and_zeros": xpu_weight_int4pack_mm_with_scales_and_zeros,
    "_weight_int4pack_mm": xpu_weight_int4pack_mm,
    # torch's own CPU _scaled_mm has the op's contract (tensor-wise and row-wise fp32 scales)
    "_scaled_mm": torch._scaled_mm,
}


# ==================================== IPEX ====================================
def _unpack_words(words: torch.Tensor, dim: int, order=None) -> torch.Tensor:
    """int32 words holding 8 nibbles along `dim` -> values 0..15, `dim` grown 8x."""
    w = (words.long() & 0xFFFFFFFF).movedim(dim, -1)
    v = (w.unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF              # slot i
    if order is not None:
        inv = [order.index(j) for j in range(8)]                       # column j sits in slot order.index(j)
        v = v[..., inv]
    return v.flatten(-2).movedim(-1, dim)


class _FakeIpexWoqLinear(torch.nn.Module):
    def __init__(self, w: torch.Tensor, bias):
        super().__init__()
        self.w, self.bias = w, bias

    def forward(self, x):
        y = x.float() @ self.w.to(x.dtype).float().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def _ipex_from_weight(qweight, scales, qzeros, in_features, out_features, qconfig=None, bias=None, group_size=-1,
                      g_idx=None, quant_method=0, **kw):
    k, n = in_features, out_features
    gs = k if group_size in (-1, None) else group_size
    if quant_method == 0:       # GPTQ, AutoGPTQ v1: qweight [K/8, N], qzeros [G, N/8] holding zero - 1
        _require(qweight.shape == (k // 8, n), "IPEX GPTQ: qweight [K/8, N]")
        q = _unpack_words(qweight, 0)                                  # [K, N]
        z = _unpack_words(qzeros, 1) + 1                               # [G, N]
    elif quant_method == 1:     # AWQ: qweight [K, N/8], qzeros [G, N/8], interleave 0 2 4 6 1 3 5 7
        _require(qweight.shape == (k, n // 8), "IPEX AWQ: qweight [K, N/8]")
        order = [0, 2, 4, 6, 1, 3, 5, 7]
        q = _unpack_words(qweight, 1, order)
        z = _unpack_words(qzeros, 1, order)
    else:
        raise VendorOpError(f"IPEX: unknown quant_method {quant_method}")
    gi = (torch.arange(k) // gs) if g_idx is None else g_idx.long()
    w = ((q - z[gi]).float() * scales.float()[gi]).t()                 # [N, K]
    return _FakeIpexWoqLinear(w, bias)


def fake_ipex_module() -> types.ModuleType:
    """An emulated `intel_extension_for_pytorch` with just the weight-only-quantization entry points."""
    ipex = types.ModuleType("intel_extension_for_pytorch")
    ipex.__version__ = "2.8.0+emulation"
    q = types.SimpleNamespace(
        WoqWeightDtype=types.SimpleNamespace(INT4="int4", INT8="int8"),
        WoqLowpMode=types.SimpleNamespace(NONE=0, FP16=1, BF16=2, INT8=3),
        WoqActQuantMode=types.SimpleNamespace(NONE=-1, PER_BATCH=1),
        get_weight_only_quant_qconfig_mapping=lambda **kw: dict(kw))
    ipex.quantization = q
    woq = types.SimpleNamespace(IPEXWeightOnlyQuantizedLinear=types.SimpleNamespace(from_weight=_ipex_from_weight))
    ipex.llm = types.SimpleNamespace(quantization=types.SimpleNamespace(woq_linear=woq))
    return ipex


@contextmanager
def fake_xpu(monkeypatch, ipex: bool = True):
    """Make omniq's XPU backend see an XPU: device checks pass for CPU tensors, the aten XPU
    ops resolve to the emulations above, and (optionally) an emulated IPEX is importable."""
    from omniq.backends import xpu
    monkeypatch.setattr(xpu, "_xpu_present", lambda: True)
    monkeypatch.setattr(xpu, "_device_ok", lambda device: True)
    monkeypatch.setattr(xpu, "_has_xpu_kernel", lambda op: op in XPU_OPS)
    monkeypatch.setattr(xpu, "_op", lambda name: XPU_OPS[name])
    if ipex:
        monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", fake_ipex_module())
    yield
