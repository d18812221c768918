"""Intel XPU backend: kernels run against EMULATED XPU ops (tests/_vendor_emulation.py; torch's
own CPU `_scaled_mm` stands in for the XPU one, same contract) and compared with
scheme.matmul; plus the behaviour on this machine, which has no XPU and no IPEX.

Tolerances: one ulp of x's dtype at |y| plus fp32 accumulation noise, and where the op takes
its scales in x's dtype and dequantizes in it, u = unit roundoff of that dtype per rounding
of each weight (stated per kernel).
"""
import importlib.util
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import omniq
from omniq.backends import xpu
from omniq.dispatch import Problem, get_kernel

from _vendor_emulation import fake_xpu

CPU = torch.device("cpu")
XPU_KERNELS = ("xpu.int4.scales_zeros", "xpu.int4.tinygemm", "xpu.fp8.scaled_mm", "xpu.ipex.woq_linear")
REL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SEEDS = st.integers(0, 2**31 - 1)
HALF = st.sampled_from([torch.bfloat16, torch.float16])
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])
NO_XPU = "unavailable: torch has no XPU device (torch.xpu.is_available() is False)"


@pytest.fixture
def emu(monkeypatch):
    with fake_xpu(monkeypatch):
        yield


def _rand(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def run_kernel(name, qw, x, bias=None):
    k = get_kernel(name)
    prob = Problem(qw.scheme, qw.shape[0], qw.shape[1], x.shape[0], x.dtype, CPU)
    assert k.serves(qw.scheme) is None and k.available(CPU) is None and k.can_implement(prob) is None
    return k.run(x, k.layout.prepare(qw, CPU), bias)


def check(got, ref32, tol):
    err = (got.float() - ref32).abs()
    bad = err > tol
    assert not bool(bad.any()), f"max excess {float((err - tol).max()):.3g} at {bad.nonzero()[0].tolist()}"


def base_tol(ref32, x, w, dtype):
    return REL[dtype] * ref32.abs() + (x.float().abs() @ w.abs().T) * 2.0 ** -20 + 1e-30


# ---------------------------------------------------------------------------------------------
# this machine: no XPU, no IPEX
# ---------------------------------------------------------------------------------------------
def test_unavailable_without_xpu():
    if torch.xpu.is_available():
        pytest.skip("this machine has an XPU; this test is about its absence")
    for name in XPU_KERNELS:
        assert get_kernel(name).available(CPU) == NO_XPU


def test_device_op_and_ipex_reasons(monkeypatch):
    monkeypatch.setattr(xpu, "_xpu_present", lambda: True)
    assert get_kernel("xpu.int4.scales_zeros").available(CPU) == "device is cpu, not xpu"
    monkeypatch.setattr(xpu, "_device_ok", lambda d: True)
    # this CPU build of torch has the schemas but no XPU kernels: the probe says so
    why = get_kernel("xpu.int4.scales_zeros").available(CPU)
    assert why.startswith("unavailable: this torch build has no XPU kernel for aten::_convert_weight_to_int4pack")
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        monkeypatch.delitem(sys.modules, "intel_extension_for_pytorch", raising=False)
        assert get_kernel("xpu.ipex.woq_linear").available(CPU) == \
            "unavailable: intel_extension_for_pytorch is not installed"


@pytest.mark.parametrize("name,params", [("gptq", dict(bits=4, group_size=32)), ("awq", dict(group_size=32)),
                                         ("fp8", {})])
def test_explain_and_dispatch_without_xpu(name, params):
    s = omniq.get_scheme(name, **params)
    qw = s.quantize(_rand((16, 64), 0))
    mine = [v for v in omniq.explain(qw, m=1) if v.backend == "xpu"]
    assert sorted(v.kernel for v in mine) == sorted(XPU_KERNELS)
    assert all(v.status in ("unavailable", "rejected") for v in mine)
    unavailable = [v for v in mine if v.status == "unavailable"]
    assert unavailable and {v.reason for v in unavailable} == {NO_XPU}
    assert omniq.prepare(qw, CPU).kernel_for(2, torch.bfloat16).backend != "xpu"
    x = _rand((2, 64), 1).to(torch.bfloat16)
    # whichever kernel ran (its accuracy is its own backend's tests' business) returns the product
    y, ref = omniq.linear(x, qw).float(), s.matmul(x.float(), qw)
    assert y.shape == ref.shape and float((y - ref).norm() / ref.norm()) < 2.0 ** -5


# ---------------------------------------------------------------------------------------------
# int4 weight-only
# ---------------------------------------------------------------------------------------------
INT4 = st.sampled_from([
    ("gptq", dict(bits=4, group_size=32, sym=True)), ("gptq", dict(bits=4, group_size=64, sym=False)),
    ("gptq", dict(bits=4, group_size=128, sym=False, checkpoint_format="gptq_v2")),
    ("gptq", dict(bits=4, group_size=-1)), ("awq", dict(group_size=32)), ("awq", dict(group_size=-1))])


@FIXTURE_OK
@given(seed=SEEDS, case=INT4, n8=st.integers(1, 4), k=st.sampled_from([128, 256]), m=st.integers(1, 4),
       dtype=HALF, with_bias=st.booleans())
def test_int4_scales_zeros_kernel(emu, seed, case, n8, k, m, dtype, with_bias):
    name, params = case
    s = omniq.get_scheme(name, **params)
    n = 8 * n8
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("xpu.int4.scales_zeros", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    w = s.dequantize(qw)
    # (q - zero) is an exact small integer; the scale in x's dtype and the product: 2 roundings
    u = UNIT[dtype]
    check(got, ref, base_tol(ref, x, w, dtype) + (x.float().abs() @ w.abs().T) * (2 * u + u * u))


@FIXTURE_OK
@given(seed=SEEDS, case=INT4, n8=st.integers(1, 4), k=st.sampled_from([128, 256]), m=st.integers(1, 4),
       dtype=HALF)
def test_int4_tinygemm_kernel(emu, seed, case, n8, k, m, dtype):
    name, params = case
    s = omniq.get_scheme(name, **params)
    n = 8 * n8
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    got = run_kernel("xpu.int4.tinygemm", qw, x)
    ref = s.matmul(x.float(), qw)
    w = s.dequantize(qw)
    # W = (q - 8) * scale + zero with scale, zero = off + 8 * scale, the product and the sum each
    # rounded to x's dtype: |dW| <= 4u (|q - 8| |scale| + |zero|)
    av = s.affine_view(qw)
    rep = lambda t: t.repeat_interleave(av.group_size, 1)[:, :k]  # noqa: E731
    sc, off = rep(av.scales), rep(av.offsets)
    mag = (av.codes.float() - 8).abs() * sc + (off + 8 * sc).abs()
    u = UNIT[dtype]
    check(got, ref, base_tol(ref, x, w, dtype) + (x.float().abs() @ mag.T) * 4 * u)


# ---------------------------------------------------------------------------------------------
# FP8 _scaled_mm
# ---------------------------------------------------------------------------------------------
@FIXTURE_OK
@given(seed=SEEDS, gran=st.sampled_from(["tensor", "channel"]),
       act=st.sampled_from(["dynamic_token", "dynamic_tensor", "static_tensor"]), n=st.integers(1, 24),
       k=st.sampled_from([16, 64]), m=st.integers(1, 4),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), with_bias=st.booleans())
def test_fp8_scaled_mm_kernel(emu, seed, gran, act, n, k, m, dtype, with_bias):
    s = omniq.get_scheme("fp8", weight_granularity=gran, activation=act)
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    if act == "static_tensor":
        qw = s.calibrate(qw, _rand((8, k), seed + 3))
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("xpu.fp8.scaled_mm", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    xq = s.quantize_activation(x.float(), qw)
    tol = REL[dtype] * ref.abs() + (xq.abs() @ s.dequantize(qw).abs().T) * 2.0 ** -20 + 1e-30
    if bias is not None:   # the bias joins after the output is rounded
        tol = tol + REL[dtype] * (ref - bias).abs()
    check(got, ref, tol)


# ---------------------------------------------------------------------------------------------
# IPEX weight-only linear
# ---------------------------------------------------------------------------------------------
@FIXTURE_OK
@given(seed=SEEDS, case=st.sampled_from([("gptq", dict(bits=4, group_size=32, sym=False)),
                                         ("gptq", dict(bits=4, group_size=32, desc_act=True)),
                                         ("awq", dict(group_size=64)), ("gptq", dict(bits=4, group_size=-1))]),
       n8=st.integers(1, 3), k=st.sampled_from([64, 128]), m=st.integers(1, 4), dtype=HALF, with_bias=st.booleans())
def test_ipex_woq_kernel(emu, seed, case, n8, k, m, dtype, with_bias):
    name, params = case
    s = omniq.get_scheme(name, **params)
    n = 8 * n8
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("xpu.ipex.woq_linear", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    w = s.dequantize(qw)
    tol = base_tol(ref, x, w, dtype) + (x.float().abs() @ w.abs().T) * UNIT[dtype]
    if bias is not None:
        tol = tol + REL[dtype] * (ref - bias).abs()
    check(got, ref, tol)


# ---------------------------------------------------------------------------------------------
# reasons and the dispatcher under emulation
# ---------------------------------------------------------------------------------------------
def test_reasons(emu):
    def reason(kernel, scheme, n=64, k=128, dtype=torch.bfloat16):
        kk = get_kernel(kernel)
        return kk.serves(scheme) or kk.available(CPU) or kk.can_implement(Problem(scheme, n, k, 4, dtype, CPU))
    g = omniq.get_scheme
    assert "bits=8" in reason("xpu.int4.scales_zeros", g("gptq", bits=8))
    assert "act-order" in reason("xpu.int4.tinygemm", g("gptq", desc_act=True))
    assert "float16/bfloat16" in reason("xpu.int4.scales_zeros", g("awq"), dtype=torch.float32)
    assert "multiple of the group size" in reason("xpu.int4.scales_zeros", g("gptq", group_size=64), k=96)
    assert "gptq_v2" in reason("xpu.ipex.woq_linear", g("gptq", checkpoint_format="gptq_v2"))
    assert "weight_granularity" in reason("xpu.fp8.scaled_mm", g("fp8", weight_granularity="block"))
    assert "activation" in reason("xpu.fp8.scaled_mm", g("fp8", activation=None))
    assert reason("xpu.ipex.woq_linear", g("gptq", desc_act=True)) is None   # IPEX takes g_idx


def test_ipex_absent_leaves_the_aten_kernels(monkeypatch):
    with fake_xpu(monkeypatch, ipex=False):
        if importlib.util.find_spec("intel_extension_for_pytorch") is None:
            monkeypatch.delitem(sys.modules, "intel_extension_for_pytorch", raising=False)
            assert get_kernel("xpu.ipex.woq_linear").available(CPU).endswith("is not installed")
        assert get_kernel("xpu.int4.scales_zeros").available(CPU) is None


def test_dispatcher_with_emulated_xpu(emu):
    s = omniq.get_scheme("gptq", bits=4, group_size=32)
    qw = s.quantize(_rand((16, 64), 0))
    verdict = {v.kernel: v for v in omniq.explain(qw, m=4)}
    for name in ("xpu.int4.scales_zeros", "xpu.int4.tinygemm", "xpu.ipex.woq_linear"):
        # valid; or valid but on another layout than the one the weight was prepared in
        v = verdict[name]
        assert v.status in ("chosen", "valid") or v.reason.startswith("needs layout"), v.line()
    x = _rand((2, 2, 64), 1).to(torch.bfloat16)
    with omniq.use_kernel("xpu.int4.scales_zeros"):
        y = omniq.linear(x, qw)
    ref = s.matmul(x.float(), qw)
    w = s.dequantize(qw)
    u = UNIT[torch.bfloat16]
    x2, r2 = x.reshape(4, 64), ref.reshape(4, 16)
    check(y.reshape(4, 16), r2, base_tol(r2, x2, w, torch.bfloat16) + (x2.float().abs() @ w.abs().T) * 3 * u)
