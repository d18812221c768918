"""CUDA kernels built on torch built-ins, and vLLM's CUDA ops where a CUDA build is importable.

cuda.fp8.scaled_mm     torch._scaled_mm (cuBLASLt fp8, row-wise scales), fed by omniq's fused
                       Triton activation quantizer; shares the "triton.w8a8.v1" layout
cuda.int8.int_mm       torch._int_mm (int32 out) + a fused Triton epilogue (scales, zero point,
                       msModelSlim quant_bias, bias, cast); shares "triton.w8a8.v1"
cuda.int4.tinygemm     torch._weight_int4pack_mm (tinygemm) on its own packed layout
cuda.affine.mma_gemv   omniq's CUDA C++ 4-bit GEMV on tensor cores for M <= 16 (NVRTC-compiled at
                       first use), reading the "triton.affine.v1" layout in place
cuda.vllm.*            Marlin, Machete and CUTLASS ops from `vllm._custom_ops`: registered as
                       candidates so the dispatcher can measure them; they report why not when
                       vLLM is absent or a CPU build
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.dispatch import Kernel, Layout, register_kernel
from omniq.errors import KernelError, where
from omniq.kernels import cuda_affine_mma as affine_mma
from omniq.kernels import triton_affine as affine
from omniq.kernels.nvrtc import cuda_device_reason, nvrtc_reason
from omniq.kernels import triton_w8a8 as w8a8

_HALF = (torch.float16, torch.bfloat16)


def cuda_reason(device: torch.device) -> str | None:
    return cuda_device_reason(device, "these cuBLASLt / tinygemm paths are not wired for HIP")


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


class _Cuda(Kernel):
    backend = "cuda"

    def available(self, device):
        return cuda_reason(device)


def _quantize(x: torch.Tensor, p: w8a8.W8A8Prepared):
    """The fused Triton quantizer where Triton runs, else the same math in torch ops."""
    if affine.triton is not None:
        return w8a8.quantize_prepared_activation(x, p)
    return _quantize_torch(x, p)


def _quantize_torch(x: torch.Tensor, p: w8a8.W8A8Prepared):
    # fallback for machines without Triton; the same operations as the kernel, eagerly
    from omniq.schemes.fp8 import fp8_activation_codes
    from omniq.schemes.int8 import int8_token_codes
    from omniq.schemes.msmodelslim import quantize_per_token_int8
    xf = x.float()
    azp = None
    if p.fp8:
        mode = {w8a8.ACT_TOKEN: "dynamic_token", w8a8.ACT_STATIC: "static_tensor",
                w8a8.ACT_TENSOR: "dynamic_tensor"}.get(p.act)
        if mode is None:
            raise KernelError("fp8 block activations without Triton are not wired; install triton")
        q, s = fp8_activation_codes(xf, mode, p.input_scale)
        return q, torch.broadcast_to(s, (x.shape[0], 1)).reshape(-1).clone(memory_format=torch.contiguous_format), None
    if p.act == w8a8.ACT_TOKEN and p.act_symmetric:
        q, s = int8_token_codes(xf)
    elif p.act == w8a8.ACT_TOKEN_DIV:
        q, s = quantize_per_token_int8(xf)
    elif p.act == w8a8.ACT_STATIC_OFFSET:
        q = torch.round(xf / p.input_scale + p.input_zero_point.float()).clamp(-128, 127)
        s = torch.ones(x.shape[0], 1, device=x.device)
    else:
        raise KernelError("int8 asymmetric / static activations without Triton are not wired; install triton")
    return q.to(torch.int8), s.reshape(-1).contiguous(), azp


# ---- fp8: torch._scaled_mm ---------------------------------------------------------------------
@register_kernel
class ScaledMM(_Cuda):
    """cuBLASLt fp8 GEMM with row-wise (per-token x per-channel) scales."""
    name = "cuda.fp8.scaled_mm"
    schemes = ("fp8",)
    priority = 15
    layout = w8a8.LAYOUT

    def can_implement(self, pr):
        sch = pr.scheme
        if sch.activation is None:
            return "weight-only fp8 has no fp8 activation for torch._scaled_mm"
        if sch.activation == "block" or sch.weight_granularity == "block":
            return "block (1x128 / 128x128) scales are not wired to torch._scaled_mm here"
        if pr.k % 16 or pr.n % 16:
            return f"torch._scaled_mm needs K and N multiples of 16 (K={pr.k}, N={pr.n})"
        if pr.act_dtype not in (*_HALF, torch.float32):
            return f"activations must be fp16, bf16 or fp32, not {pr.act_dtype}"
        if pr.device.type == "cuda" and torch.cuda.is_available() and _capability(pr.device) < (8, 9):
            return "fp8 tensor cores need compute capability 8.9+"
        return None

    def run(self, x, p, bias):
        xq, xs, _ = _quantize(x, p)
        # row-wise scaling produces bf16 only; other dtypes take one cast
        y = torch._scaled_mm(xq, p.weight.t(), scale_a=xs.reshape(-1, 1), scale_b=p.w_scale.reshape(1, -1),
                             out_dtype=torch.bfloat16)
        if bias is not None:  # in fp32: the product was rounded to bf16 once, the sum is rounded once more
            y = y.float() + bias.float()
        return y if y.dtype == x.dtype else y.to(x.dtype)


# ---- int8: torch._int_mm ----------------------------------------------------------------------
INT_MM_SCHEMES = ("int8", "w8a8", "w8a8_dynamic")


@register_kernel
class IntMM(_Cuda):
    """cuBLASLt int8 GEMM (exact int32) with the scales applied by one fused epilogue kernel."""
    name = "cuda.int8.int_mm"
    schemes = INT_MM_SCHEMES
    # below triton.w8a8.gemm (10): on the H200, cuBLASLt int8 plus the epilogue pass ran 0.73-1.03x
    # of bf16 at M = 512 / 2048 where the Triton GEMM ran 0.93-1.27x on all three benchmark shapes
    # (benchmarks/results/h200-2026-11-29/run1-all-kernels.txt); a tuning table still overrides this
    priority = 8
    layout = w8a8.LAYOUT

    def can_implement(self, pr):
        sch = pr.scheme
        if not sch.activation_quantized:
            return "weight-only int8 has no int8 activation for torch._int_mm"
        if sch.name == "w8a8_dynamic" and sch.group_size > 0 and sch.group_size < pr.k:
            return "per-group weight scales need the scale inside the K loop (triton.w8a8 kernels)"
        if pr.m <= 16:
            return f"torch._int_mm needs M > 16 (M={pr.m})"
        if pr.k % 8 or pr.n % 8:
            return f"torch._int_mm needs K and N multiples of 8 (K={pr.k}, N={pr.n})"
        if pr.act_dtype not in (*_HALF, torch.float32):
            return f"activations must be fp16, bf16 or fp32, not {pr.act_dtype}"
        return None

    def run(self, x, p, bias):
        if p.wmode != w8a8.W_CHANNEL or p.w_offset is not None:
            raise KernelError(f"{where(p.name)}cuda.int8.int_mm serves per-channel weight scales only")
        xq, xs, azp = _quantize(x, p)
        acc = torch._int_mm(xq, p.weight.t())
        return w8a8.int_epilogue(acc, p, xs, azp, bias, x.dtype)


# ---- omniq's own CUDA C++ kernels (NVRTC) ------------------------------------------------------
class NvrtcCudaKernel(Kernel):
    """Base of omniq's CUDA C++ kernels compiled at first use by NVRTC (kernels/nvrtc.py):
    available where torch's NVRTC runs on an NVIDIA GPU of at least `min_capability`."""
    backend = "cuda"
    min_capability = (8, 0)   # bf16 / fp16 mma.sync m16n8k16
    capability_why = "bf16 / fp16 mma.sync"

    def available(self, device):
        why = nvrtc_reason(device)
        if why is None:
            cap = _capability(device)
            if cap < self.min_capability:
                why = (f"needs compute capability {self.min_capability[0]}.{self.min_capability[1]}+ "
                       f"({self.capability_why}); this GPU is {cap[0]}.{cap[1]}")
        return why

    max_m = 16   # decode-size M; the GEMM kernels serve larger M

    def decode_reason(self, pr) -> str | None:
        """What every NVRTC GEMV checks: decode-size M, and bf16 / fp16 activations (the MMA's
        input types) with y written in the same dtype."""
        if pr.m > self.max_m:
            return f"M={pr.m} > {self.max_m}: {self.name} is for decode-size M; the GEMM kernels serve larger M"
        if pr.act_dtype not in _HALF:
            return f"activations must be bf16 or fp16 (the MMA's input types), not {pr.act_dtype}"
        if getattr(pr, "out_dtype", None) not in (None, pr.act_dtype):
            return f"writes y in the activation dtype ({pr.act_dtype}), not {pr.out_dtype}"
        return None


@register_kernel
class AffineMmaGemv(NvrtcCudaKernel):
    """4-bit GPTQ / AWQ / AutoRound at M <= 16: lop3 dequantization straight into mma.sync
    fragments, split-K over CTAs (kernels/cuda_affine_mma.py)."""
    name = "cuda.affine.mma_gemv"
    max_m = affine_mma.MAX_M
    schemes = ("gptq", "awq")
    priority = 30
    layout = affine.LAYOUT

    def static_rank(self, problem):
        # above M = 8 (two MMA tiles) triton.affine.splitk (20) measured faster on every shape
        # the H200 table holds (M = 16: 1.05-1.36x; benchmarks/results/h200-2026-11-29c)
        return self.priority if problem.m <= 8 else 19

    def can_implement(self, pr):
        sch = pr.scheme
        if getattr(sch, "bits", 4) != 4:
            return f"{sch.bits}-bit codes: this kernel decodes 4-bit nibbles only"
        g = getattr(sch, "group_size", -1)
        if g != -1 and (g % 128 or (g // 128) & (g // 128 - 1)):
            return f"group_size={g}: needs -1 or a power-of-two multiple of 128 (one scale per 128-wide K block)"
        return self.decode_reason(pr)

    def run(self, x, p, bias):
        return affine_mma.run(x, p, bias)


# ---- int4 weight-only: tinygemm -----------------------------------------------------------------
@dataclass(eq=False)
class TinygemmPrepared:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor   # bf16 [G, N, 2]: W = (u - 8) * scale + zero
    perm: torch.Tensor | None
    n: int
    k: int
    group_size: int
    name: str | None = None


_TINYGEMM_HIGH_FIRST: dict = {}


def _inner_k_tiles(k: int) -> int:
    for t in (8, 4, 2):
        if k % (t * 16) == 0:
            return t
    return 0


def _pack_for_tinygemm(u: torch.Tensor, high_first: bool, inner: int) -> torch.Tensor:
    """u int [N, K] 0..15 -> torch's int4pack layout (via torch's own converter)."""
    a, b = u[:, 0::2], u[:, 1::2]
    byte = (a << 4 | b) if high_first else (b << 4 | a)
    return torch.ops.aten._convert_weight_to_int4pack(byte.to(torch.uint8).contiguous(), inner)


def _tinygemm_order(device: torch.device) -> bool:
    """Which nibble of a byte holds the even k for _convert_weight_to_int4pack in this torch,
    found once by a probe against a plain matmul."""
    key = str(device)
    if key not in _TINYGEMM_HIGH_FIRST:
        n, k, g = 16, 256, 64
        gen = torch.Generator().manual_seed(0)
        u = torch.randint(0, 16, (n, k), generator=gen).to(device)
        sz = torch.stack([torch.ones(k // g, n), torch.zeros(k // g, n)], -1).to(device, torch.bfloat16)
        x = torch.eye(k, device=device, dtype=torch.bfloat16)
        ref = (u.float() - 8).t()
        for high_first in (True, False):
            y = torch._weight_int4pack_mm(x, _pack_for_tinygemm(u, high_first, 8), g, sz)
            if torch.equal(y.float(), ref):
                _TINYGEMM_HIGH_FIRST[key] = high_first
                break
        else:
            raise KernelError("torch._convert_weight_to_int4pack: neither nibble order reproduces the weight")
    return _TINYGEMM_HIGH_FIRST[key]


def prepare_tinygemm(qw, device) -> TinygemmPrepared:
    view = qw.scheme.affine_view(qw)
    dev = torch.device(device)
    if view is None or view.bits != 4:
        raise KernelError(f"{where(qw.name)}tinygemm needs 4-bit integer weights")
    n, k = view.codes.shape
    g = view.group_size if view.group_size > 0 else k
    off = 8 if view.signed else 0
    u = view.codes.to(torch.int64) + off
    s = view.scales.float()
    o = (view.offsets.float() if view.offsets is not None else torch.zeros_like(s)) - off * s  # W = u*s + o
    perm = None
    if view.g_idx is not None:
        gi = view.g_idx.long().cpu()
        perm = torch.argsort(gi, stable=True)
        if not torch.equal(gi[perm], torch.arange(k) // g):
            raise KernelError(f"{where(qw.name)}tinygemm: irregular g_idx")
        u = u[:, perm.to(u.device)]
    zero = o + 8.0 * s          # (u - 8) * s + zero == u * s + o
    sz = torch.stack([s.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    if dev.type != "cuda":
        raise KernelError(f"{where(qw.name)}cuda.int4.tinygemm prepares on CUDA devices only")
    packed = _pack_for_tinygemm(u.to(dev), _tinygemm_order(dev), _inner_k_tiles(k))
    return TinygemmPrepared(packed=packed, scales_and_zeros=sz.to(dev),
                            perm=None if perm is None else perm.to(dev), n=n, k=k, group_size=g, name=qw.name)


TINYGEMM_LAYOUT = Layout("cuda.tinygemm.v1", prepare_tinygemm)


@register_kernel
class Tinygemm(_Cuda):
    """torch._weight_int4pack_mm: bf16 activations, int4 groups of 64..256 (fast at M = 1)."""
    name = "cuda.int4.tinygemm"
    schemes = ("gptq", "awq")
    priority = 5
    layout = TINYGEMM_LAYOUT

    def can_implement(self, pr):
        sch = pr.scheme
        if getattr(sch, "bits", 4) != 4:
            return "tinygemm packs 4-bit codes only"
        if pr.act_dtype != torch.bfloat16:
            return f"tinygemm takes bf16 activations, not {pr.act_dtype}"
        g = pr.k if sch.group_size == -1 else sch.group_size
        if g not in (64, 128, 256):
            return (f"group size {g}: tinygemm takes 32..256, and below 64 its bf16 scale+zero pairs exceed "
                    f"the memory rule (1.05 x the checkpoint)")
        if pr.k % g or not _inner_k_tiles(pr.k):
            return f"K={pr.k} must be a multiple of the group size and of 32"
        if pr.n % 8:
            return f"N={pr.n} must be a multiple of 8"
        return None

    def run(self, x, p, bias):
        if p.perm is not None:
            x = x.index_select(1, p.perm)
        y = torch._weight_int4pack_mm(x.contiguous(), p.packed, p.group_size, p.scales_and_zeros)
        return y + bias.to(y.dtype) if bias is not None else y


# ---- vLLM CUDA ops (Marlin, Machete, CUTLASS) ----------------------------------------------------
def vllm_reason(op: str) -> str | None:
    """None when vllm._custom_ops and its CUDA op `op` are importable, else why not."""
    try:
        from vllm import _custom_ops  # noqa: F401
    except Exception as e:  # vLLM absent or broken: say which
        return f"vLLM is not importable ({type(e).__name__}: {e})"
    if not hasattr(torch.ops._C, op):
        return f"vLLM here has no CUDA op torch.ops._C.{op} (a CPU or ROCm build)"
    return None


class _VllmKernel(_Cuda):
    op = ""

    def available(self, device):
        return cuda_reason(device) or vllm_reason(self.op)


@dataclass(eq=False)
class MarlinPrepared:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor
    workspace: torch.Tensor
    wtype: object
    n: int
    k: int


def prepare_marlin(qw, device) -> MarlinPrepared:
    """GPTQ (symmetric uint4b8 / uint8b128) or AWQ (uint4 + zero points) into Marlin's layout,
    through vLLM's own repack ops and helpers."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
    from vllm.scalar_type import scalar_types
    dev = torch.device(device)
    sch = qw.scheme
    t = {name: v.to(dev) for name, v in qw.tensors.items()}
    n, k = qw.shape
    g = k if sch.group_size == -1 else sch.group_size
    empty = torch.empty(0, dtype=torch.int, device=dev)
    if sch.name == "gptq":
        wtype = scalar_types.uint4b8 if sch.bits == 4 else scalar_types.uint8b128
        q = ops.gptq_marlin_repack(t["qweight"], k, n, sch.bits)
        zeros = empty
    else:
        wtype = scalar_types.uint4
        q = ops.awq_marlin_repack(t["qweight"], k, n, 4)
        zeros = mu.awq_to_marlin_zero_points(t["qzeros"], k // g, n, 4)
    scales = mu.marlin_permute_scales(t["scales"], k, n, g)
    return MarlinPrepared(q, scales, zeros, empty, empty, mu.marlin_make_workspace_new(dev), wtype, n, k)


@register_kernel
class VllmMarlin(_VllmKernel):
    """vLLM's Marlin W4A16 / W8A16 (GPTQ symmetric without act-order, AWQ)."""
    name = "cuda.vllm.marlin"
    schemes = ("gptq", "awq")
    priority = 25
    op = "marlin_gemm"
    layout = Layout("cuda.vllm.marlin.v1", prepare_marlin)

    def can_implement(self, pr):
        sch = pr.scheme
        if sch.name == "gptq" and (not sch.sym or sch.desc_act):
            return "wired for symmetric GPTQ without act-order (vLLM's gptq_marlin covers the rest)"
        if pr.act_dtype not in _HALF:
            return f"Marlin takes fp16 / bf16 activations, not {pr.act_dtype}"
        if pr.n % 64 or pr.k % 128:
            return f"Marlin tiles need N % 64 == 0 and K % 128 == 0 (N={pr.n}, K={pr.k})"
        return None

    def run(self, x, p, bias):
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        if p.zeros.numel():
            return mu.apply_awq_marlin_linear(x, p.qweight, p.scales, p.zeros, p.g_idx, p.perm, p.workspace,
                                              p.wtype, p.n, p.k, bias=bias)
        return mu.apply_gptq_marlin_linear(x, p.qweight, p.scales, p.zeros, p.workspace, p.wtype, p.n, p.k,
                                           bias=bias)


@dataclass(eq=False)
class MachetePrepared:
    qweight: torch.Tensor
    scales: torch.Tensor
    wtype: object
    group_size: int
    n: int


def prepare_machete(qw, device) -> MachetePrepared:
    from vllm import _custom_ops as ops
    from vllm.scalar_type import scalar_types
    dev = torch.device(device)
    sch = qw.scheme
    n, k = qw.shape
    wtype = scalar_types.uint4b8 if sch.bits == 4 else scalar_types.uint8b128
    q = ops.machete_prepack_B(qw.tensors["qweight"].to(dev).t().contiguous().t(), a_type=torch.float16,
                              b_type=wtype, group_scales_type=torch.float16)
    return MachetePrepared(q, qw.tensors["scales"].to(dev).contiguous(), wtype,
                           k if sch.group_size == -1 else sch.group_size, n)


@register_kernel
class VllmMachete(_VllmKernel):
    """vLLM's Machete (Hopper CUTLASS mixed-input GEMM) for symmetric GPTQ, fp16 activations."""
    name = "cuda.vllm.machete"
    schemes = ("gptq",)
    priority = 24
    op = "machete_mm"
    layout = Layout("cuda.vllm.machete.v1", prepare_machete)

    def can_implement(self, pr):
        sch = pr.scheme
        if not sch.sym or sch.desc_act:
            return "wired for symmetric GPTQ without act-order"
        if pr.act_dtype != torch.float16:
            return "wired for fp16 activations (the prepacked scales are fp16)"
        if pr.device.type == "cuda" and torch.cuda.is_available() and _capability(pr.device) != (9, 0):
            return "Machete needs compute capability 9.0 (Hopper)"
        return None

    def run(self, x, p, bias):
        from vllm import _custom_ops as ops
        y = ops.machete_mm(a=x, b_q=p.qweight, b_type=p.wtype, b_group_scales=p.scales,
                           b_group_size=p.group_size)
        return y + bias.to(y.dtype) if bias is not None else y


class _Cutlass(_VllmKernel):
    op = "cutlass_scaled_mm"
    priority = 16
    layout = w8a8.LAYOUT

    def can_implement(self, pr):
        if pr.act_dtype not in _HALF:
            return f"CUTLASS scaled_mm outputs fp16 / bf16, not {pr.act_dtype}"
        if pr.k % 16 or pr.n % 16:
            return f"CUTLASS needs K and N multiples of 16 (K={pr.k}, N={pr.n})"
        return None

    def run(self, x, p, bias):
        from vllm import _custom_ops as ops
        xq, xs, azp = _quantize(x, p)
        b = bias.to(x.dtype) if bias is not None else None
        if azp is not None:
            return ops.cutlass_scaled_mm_azp(xq, p.weight.t(), xs.reshape(-1, 1), p.w_scale.reshape(-1, 1),
                                             x.dtype, p.colsum, azp.to(torch.int32), b)
        return ops.cutlass_scaled_mm(xq, p.weight.t(), xs.reshape(-1, 1), p.w_scale.reshape(-1, 1), x.dtype, b)


@register_kernel
class VllmCutlassFP8(_Cutlass):
    """vLLM's CUTLASS fp8 GEMM (per-token x per-channel scales)."""
    name = "cuda.vllm.cutlass_fp8"
    schemes = ("fp8",)

    def can_implement(self, pr):
        sch = pr.scheme
        if sch.activation is None or sch.activation == "block" or sch.weight_granularity == "block":
            return "wired for fp8 W8A8 with per-tensor / per-channel weight scales"
        return super().can_implement(pr)


@register_kernel
class VllmCutlassInt8(_Cutlass):
    """vLLM's CUTLASS int8 GEMM, with the azp epilogue for asymmetric activations."""
    name = "cuda.vllm.cutlass_int8"
    schemes = ("int8",)

    def can_implement(self, pr):
        if not pr.scheme.activation_quantized:
            return "weight-only int8 has no int8 activation"
        if pr.scheme.activation == "static_tensor" and not pr.scheme.act_symmetric:
            return "static asymmetric activations: vLLM folds the zero point into azp_adj; not wired here"
        return super().can_implement(pr)
