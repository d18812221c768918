"""The integer and W8A8 kernels compiled on a CUDA GPU (`pytest -m gpu`): every Triton and cuda
kernel of these families against scheme.matmul with bf16 and fp16 activations on awkward
shapes, the PTX dequantization variant, the fused activation quantizer bit for bit, capture and
replay of omniq.linear in a CUDA graph, and torch.compile(fullgraph=True) of a module calling it."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.kernels import triton_affine as affine
from omniq.kernels import triton_w8a8 as w8a8

from _int_util import (HALF_ULP, ULP, activations, affine_cases, assert_within, check_graph_replay, error_bound,
                       fake_from_kernel, fp8_mma_rel, quantized, tie_rows, w8a8_cases)
from _scheme_util import make_tensor

pytestmark = pytest.mark.gpu
GPU = torch.device("cuda")
HALF = (torch.bfloat16, torch.float16)


def _forced(kernel, qw, x, bias):
    with omniq.use_kernel(kernel):
        p = omniq.prepare(qw, GPU, x.dtype)
        return omniq.linear(x, p, bias)


def _check(kernel, sch, qw, x, bias, dot_rel=0.0):
    y = _forced(kernel, qw, x, bias)
    ref = sch.matmul(x.cpu(), qw, None if bias is None else bias.cpu())
    assert_within(y.cpu(), ref, error_bound(x.cpu(), qw, ref, None if bias is None else bias.cpu(), dot_rel),
                  f"{kernel} {sch.key} N={qw.shape[0]} K={qw.shape[1]} x={tuple(x.shape)} {x.dtype}")


@pytest.mark.parametrize("kernel,max_m", [("triton.affine.gemv", 4), ("triton.affine.splitk", 64),
                                          ("triton.affine.gemm", 300), ("triton.affine.dequant_mm", 300)])
@settings(max_examples=6)
@given(data=st.data())
def test_affine_kernels_compiled(kernel, max_m, data):
    sch, n, k = data.draw(affine_cases(small_n=False))
    if kernel.endswith(("gemv", "dequant_mm")) and sch.name == "w4a8_dynamic":
        return
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    x = data.draw(activations(k, max_m, dtypes=HALF)).to(GPU)
    if kernel.endswith("dequant_mm"):
        x = x.reshape(-1, k).repeat(-(-affine.DEQUANT_MM_MIN_M // x.reshape(-1, k).shape[0]), 1)
    bias = None if data.draw(st.booleans()) else make_tensor((n,), "normal", 1).to(GPU, x.dtype)
    # dequant_mm rounds the weight to x's dtype before cuBLAS: half an ulp per weight
    _check(kernel, sch, qw, x, bias, HALF_ULP[x.dtype] if kernel.endswith("dequant_mm") else 0.0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("m", [1, 7, 16, 48])
def test_affine_lop3_dequantization(dtype, sym, m):
    sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=sym)
    qw = quantized(sch, 264, 1024, 5)
    p = affine.prepare_affine(qw, GPU)
    x = make_tensor((m, 1024), "normal", 6).to(GPU, dtype)
    cfg = dict(affine.config_for("splitk", m, 264, 1024, GPU), ASM=True)
    y = affine.run_dot(x, p, None, "splitk", cfg)
    ref = sch.matmul(x.cpu(), qw)
    assert_within(y.cpu(), ref, error_bound(x.cpu(), qw, ref, None), "lop3 path")


@pytest.mark.parametrize("kernel,max_m", [("triton.w8a8.splitk", 64), ("triton.w8a8.gemm", 300)])
@settings(max_examples=8)
@given(data=st.data())
def test_w8a8_kernels_compiled(kernel, max_m, data):
    sch, n, k = data.draw(w8a8_cases(small_n=False))
    x = data.draw(activations(k, max_m, dtypes=HALF))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)), x_sample=x)
    bias = None if data.draw(st.booleans()) else make_tensor((n,), "normal", 1).to(x.dtype)
    # the GEMM leaves fp8 accumulation to the MMA (kernels/triton_w8a8.py docstring); split-K
    # promotes per K tile, within which the MMA still accumulates: the same bound covers both
    _check(kernel, sch, qw, x.to(GPU), None if bias is None else bias.to(GPU), fp8_mma_rel(sch, k))


@pytest.mark.parametrize("kind,cfg", [("splitk", {}), ("gemm", {"PROMOTE": True})])
def test_fp8_promoted_accumulation_is_near_fp32(kind, cfg):
    """With promotion (split-K's default, the GEMM's option) a long fp8 dot stays within 2^-14 of
    sum |x_q| |W| of the exact product of the same codes; accumulating all of K = 8192 in the MMA
    measured 2^-12 on the H200 (probe_fp8_accuracy.txt), so this fails without the promotion."""
    sch = omniq.get_scheme("fp8")
    n, k, m = 1024, 8192, 16
    qw = sch.quantize(make_tensor((n, k), "normal", 11) * 0.02)
    p = w8a8.prepare_w8a8(qw, GPU)
    x = make_tensor((m, k), "normal", 12).to(GPU)
    q, xs, _ = w8a8.quantize_prepared_activation(x, p)
    codes = q.double() * xs.double()[:, None]
    wexact = p.weight.double() * p.w_scale.double()[:, None]
    exact, mag = codes @ wexact.t(), codes.abs() @ wexact.abs().t()
    y = w8a8.run_dot(x, p, None, kind, dict(w8a8.config_for(kind, m, n, k, True), **cfg)).double()
    worst = float(((y - exact).abs() / mag).max())
    assert worst <= 2.0**-14, f"{kind}: max |y - exact| / sum|q||W| = {worst:.3g} (2^{math.log2(worst):.1f})"


@pytest.mark.parametrize("name,params", [("fp8", {}), ("fp8", {"activation": "dynamic_tensor"}),
                                         ("fp8", {"weight_granularity": "block", "activation": "block"}),
                                         ("int8", {}), ("int8", {"act_symmetric": False}), ("w8a8_dynamic", {})])
def test_scheme_activation_quantization_is_the_same_on_the_gpu(name, params):
    """The reference itself must not depend on the device: on CUDA torch divides by a Python
    number through its reciprocal, which moved per-token fp8 scales by an ulp (omniq.schemes.base
    div_const)."""
    sch = omniq.get_scheme(name, **params)
    k = 4096
    qw = quantized(sch, 8, k, 0)
    for i, dist in enumerate(("normal", "heavy", "uniform")):
        x = make_tensor((64, k), dist, 20 + i)
        want = sch.quantize_activation(x, qw)
        got = sch.quantize_activation(x.to(GPU), qw.to(GPU)).cpu()
        assert torch.equal(got, want), f"{sch.key} {dist}: {int((got != want).sum())} values differ"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name,params,kernel", [
    ("fp8", {}, "cuda.fp8.scaled_mm"), ("fp8", {"activation": "static_tensor"}, "cuda.fp8.scaled_mm"),
    ("int8", {}, "cuda.int8.int_mm"), ("int8", {"act_symmetric": False}, "cuda.int8.int_mm"),
    ("w8a8", {}, "cuda.int8.int_mm"), ("w8a8_dynamic", {}, "cuda.int8.int_mm")])
@pytest.mark.parametrize("m", [17, 40, 512])
def test_torch_builtin_w8a8(name, params, kernel, dtype, m):
    sch = omniq.get_scheme(name, **params)
    n, k = 272, 512
    x = make_tensor((m, k), "normal", m).to(dtype)
    qw = quantized(sch, n, k, 3, x_sample=x)
    bias = make_tensor((n,), "normal", 4).to(dtype)
    y = _forced(kernel, qw, x.to(GPU), bias.to(GPU))
    ref = sch.matmul(x, qw, bias)
    # row-wise _scaled_mm rounds the product to bf16 before the bias is added (and an fp16 result
    # is rounded once more): half a bf16 ulp of |x| |W|, plus one more output rounding
    scaled = kernel == "cuda.fp8.scaled_mm"
    bound = error_bound(x, qw, ref, bias, HALF_ULP[torch.bfloat16] if scaled else 0.0)
    if scaled:
        bound = bound + ULP[dtype] * ref.float().abs()
    assert_within(y.cpu(), ref, bound, f"{kernel} {sch.key} M={m} {dtype}")


@pytest.mark.parametrize("name,params", [("gptq", {"bits": 4, "group_size": 128}),
                                         ("gptq", {"bits": 4, "group_size": 64, "sym": False, "desc_act": True}),
                                         ("awq", {"group_size": 128})])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_tinygemm(name, params, m):
    sch = omniq.get_scheme(name, **params)
    n, k = 256, 1024
    qw = quantized(sch, n, k, 11)
    x = make_tensor((m, k), "normal", 12).to(torch.bfloat16)
    y = _forced("cuda.int4.tinygemm", qw, x.to(GPU), None)
    ref = sch.matmul(x, qw)
    # tinygemm keeps scale and zero in bf16: each weight is off by up to ~2^-8 of its group's scale * 8
    bound = error_bound(x, qw, ref, None, dot_rel=2.0**-7)
    assert_within(y.cpu(), ref, bound, f"tinygemm {sch.key} M={m}")


@pytest.mark.parametrize("name,params", [("fp8", {}), ("fp8", {"activation": "dynamic_tensor"}),
                                         ("fp8", {"weight_granularity": "block", "activation": "block"}),
                                         ("int8", {}), ("int8", {"act_symmetric": False}),
                                         ("int8", {"activation": "static_tensor", "input_scale": 0.25}),
                                         ("w8a8", {"input_scale": 0.25, "input_offset": 5}), ("w8a8_dynamic", {})])
@pytest.mark.parametrize("dtype", (torch.float32, *HALF))
def test_activation_quantizer_compiled_is_bit_exact(name, params, dtype):
    sch = omniq.get_scheme(name, **params)
    k = 1000
    qw = quantized(sch, 8, k, 0)
    p = w8a8.prepare_w8a8(qw, GPU)
    for x in (tie_rows("fp8" if name == "fp8" else "int8", 33, k, 1), make_tensor((33, k), "heavy", 2),
              make_tensor((33, k), "zero_rows", 3)):
        if dtype == torch.float16 and x.abs().max() >= 6e4:
            continue  # would overflow to inf in fp16; the reference then yields NaN
        x = x.to(dtype)
        got = fake_from_kernel(qw, p, x.to(GPU)).cpu()
        want = sch.quantize_activation(x, qw)
        assert torch.equal(got, want), f"{sch.key} {dtype}: {int((got != want).sum())} values differ"


@pytest.mark.parametrize("name,params", [("gptq", {"bits": 4, "group_size": 128}), ("fp8", {}), ("int8", {})])
def test_cuda_graph_capture_and_replay(name, params):
    sch = omniq.get_scheme(name, **params)
    n, k = 512, 1024
    qw = quantized(sch, n, k, 21)
    # whichever kernel the dispatcher picks; dequant_mm rounds W to bf16 first
    check_graph_replay(sch, qw, (1, 16, 128), HALF_ULP[torch.bfloat16])


def test_torch_compile_fullgraph():
    sch = omniq.get_scheme("gptq", bits=4, group_size=128)
    qw = quantized(sch, 256, 512, 31)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = omniq.prepare(qw, GPU, torch.bfloat16)

        def forward(self, x):
            return torch.nn.functional.gelu(omniq.linear(x, self.p)) * 2

    mod = Block()
    compiled = torch.compile(mod, fullgraph=True)
    for m in (1, 9, 64):
        x = make_tensor((2, m, 512), "normal", m).to(GPU, torch.bfloat16)
        # inductor fuses gelu * 2 in fp32 and rounds once; eager rounds gelu's bf16 result first
        torch.testing.assert_close(compiled(x), mod(x), rtol=2**-7, atol=2**-7)
