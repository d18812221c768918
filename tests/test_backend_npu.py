"""Ascend NPU backend: each kernel's marshalling, layouts and scale handling, run against an
EMULATED torch_npu (tests/_vendor_emulation.py) and compared with scheme.matmul; plus the
behaviour where torch_npu is absent (explained as unavailable, never selected).

Tolerances: the kernels' results are rounded to x's dtype once; the references are computed
in fp32 from the same x. `out_ulp` allows one unit in the last place of x's dtype plus fp32
accumulation-order noise. Where the vendor op differs from the reference by construction, the
difference is bounded by a formula stated at the test (int64 scales keep 19 bits; per-call
scale casts to x's dtype; the int8 scheme multiplies by 127/amax where the NPU divides by amax/127).
"""
import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import omniq
from omniq.backends import npu
from omniq.dispatch import Problem, get_kernel
from omniq.errors import OmniqError
from omniq.schemes.base import QuantizedWeight
from omniq.schemes.int8 import int8_token_codes

from _vendor_emulation import FakeTorchNpu, fake_torch_npu

CPU = torch.device("cpu")
NPU_KERNELS = ("npu.w8a8_dynamic.quant_matmul", "npu.w8a8_static.quant_matmul", "npu.weight_only.weight_quant_bmm",
               "npu.mxfp8.quant_matmul", "npu.mxfp4.quant_matmul", "npu.mxfp4_dualscale.dual_level_matmul")
REL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}   # one ulp, relative, of x's dtype
DTYPES = st.sampled_from([torch.bfloat16, torch.float16])
SEEDS = st.integers(0, 2**31 - 1)
# the emulated module is installed once per test; each example clears its call log
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])


@pytest.fixture
def emu(monkeypatch):
    with fake_torch_npu(monkeypatch) as mod:
        yield mod


def _rand(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def run_kernel(name, qw, x, bias=None):
    """Dispatcher-free: check the kernel accepts the problem, prepare once, run."""
    k = get_kernel(name)
    prob = Problem(qw.scheme, qw.shape[0], qw.shape[1], x.shape[0], x.dtype, CPU)
    assert k.serves(qw.scheme) is None and k.available(CPU) is None and k.can_implement(prob) is None
    return k.run(x, k.layout.prepare(qw, CPU), bias)


def out_ulp(ref32, x, w_deq, dtype):
    """One ulp of dtype at |ref| plus fp32 accumulation noise (|x| @ |W|^T * 2^-20)."""
    return REL[dtype] * ref32.abs() + (x.float().abs() @ w_deq.abs().T) * 2.0 ** -20 + 1e-30


def check(got, ref32, tol):
    assert got.dtype in REL
    err = (got.float() - ref32).abs()
    bad = err > tol
    assert not bool(bad.any()), f"max excess {float((err - tol).max()):.3g} at {bad.nonzero()[0].tolist()}"


# ---------------------------------------------------------------------------------------------
# absent torch_npu / not an NPU device
# ---------------------------------------------------------------------------------------------
def test_unavailable_without_torch_npu():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed on this machine; this test is about its absence")
    for name in NPU_KERNELS:
        assert get_kernel(name).available(CPU) == "unavailable: torch_npu is not installed"


def test_device_type_reason_with_torch_npu_present(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", FakeTorchNpu())
    for name in NPU_KERNELS:
        assert get_kernel(name).available(CPU) == "device is cpu, not npu"


def test_missing_op_reason(emu, monkeypatch):
    monkeypatch.delattr(FakeTorchNpu, "npu_dual_level_quant_matmul")
    why = get_kernel("npu.mxfp4_dualscale.dual_level_matmul").available(CPU)
    assert why.startswith("unavailable: this torch_npu has no npu_dual_level_quant_matmul")
    assert get_kernel("npu.w8a8_dynamic.quant_matmul").available(CPU) is None


@pytest.mark.parametrize("name,params,n,k", [
    ("w8a8", {}, 8, 64), ("w8a8_dynamic", {}, 8, 64), ("w4a8_dynamic", {}, 8, 64),
    ("int8", {}, 8, 64), ("gptq", dict(bits=4, group_size=32), 8, 64), ("mxfp8", {}, 8, 64),
    ("mxfp4", {}, 8, 64), ("mxfp4_dualscale", {}, 8, 512)])
def test_explain_and_dispatch_without_torch_npu(name, params, n, k):
    s = omniq.get_scheme(name, **params)
    qw = s.quantize(_rand((n, k), 0))
    mine = [v for v in omniq.explain(qw, m=1) if v.backend == "npu"]
    assert sorted(v.kernel for v in mine) == sorted(NPU_KERNELS)       # registered, and explained
    assert all(v.status in ("unavailable", "rejected") for v in mine)  # never chosen, never valid
    unavailable = [v for v in mine if v.status == "unavailable"]
    assert unavailable, f"no NPU kernel serves {name}"
    assert {v.reason for v in unavailable} == {"unavailable: torch_npu is not installed"}
    x = _rand((3, k), 1).to(torch.bfloat16)
    p = omniq.prepare(qw, CPU)
    assert p.kernel_for(3, torch.bfloat16).backend != "npu"
    # whichever kernel ran (its accuracy is its own backend's tests' business) returns the product
    y, ref = omniq.linear(x, qw).float(), s.matmul(x.float(), qw)
    assert y.shape == ref.shape and float((y - ref).norm() / ref.norm()) < 2.0 ** -5


# ---------------------------------------------------------------------------------------------
# W8A8 dynamic: int8 (dynamic_token), w8a8_dynamic, w4a8_dynamic (1.0.0)
# ---------------------------------------------------------------------------------------------
@FIXTURE_OK
@given(seed=SEEDS, which=st.sampled_from(["w8a8_dynamic", "w4a8_dynamic", "int8"]), half_n=st.integers(1, 20),
       k=st.sampled_from([16, 64, 96]), m=st.integers(1, 5), dtype=DTYPES, with_bias=st.booleans())
def test_w8a8_dynamic_kernel(emu, seed, which, half_n, k, m, dtype, with_bias):
    emu.calls.clear()
    n = 2 * half_n - (which != "w4a8_dynamic")   # odd N where the format allows it
    s = omniq.get_scheme(which)
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("npu.w8a8_dynamic.quant_matmul", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    w = s.dequantize(qw)
    tol = out_ulp(ref, x, w, dtype)
    if which == "int8":
        # the int8 scheme rounds x * (127/amax) (vLLM); npu_dynamic_quant rounds x / (amax/127).
        # Where they differ by a code, y moves by s_t * |W[n, k]| per code. The scheme's own
        # codes are the comparand: `xf * (127 / amax)` in torch rounds the quotient twice and
        # differs from them at ties (x = -amax/2 in fp16 once gave -63.5 exactly).
        xf = x.float()
        amax = xf.abs().amax(-1, keepdim=True)
        safe = torch.where(amax == 0, torch.ones_like(amax), amax)
        dq = (torch.round(xf / (safe / 127)) - int8_token_codes(xf)[0]).abs()
        tol = tol + (dq * (amax / 127)) @ w.abs().T
    check(got, ref, tol)
    ops = [c for c, _ in emu.calls]
    assert ops.count("npu_format_cast") == 1 and "npu_dynamic_quant" in ops   # NZ cast once, at prepare
    mm = dict(emu.calls)["npu_quant_matmul"]
    assert mm["pertoken"] and mm["scale"] == torch.float32 and mm["output_dtype"] == dtype


def test_w8a8_dynamic_kernel_refuses_weight_offsets(emu):
    s = omniq.get_scheme("w8a8_dynamic")
    qw = s.quantize(_rand((4, 32), 0))
    qo = QuantizedWeight(s, qw.shape, {**qw.tensors, "weight_offset": torch.ones(4, 1)}, name="blk.0.fc1")
    with pytest.raises(OmniqError, match="blk.0.fc1.*weight_offset"):
        get_kernel("npu.w8a8_dynamic.quant_matmul").layout.prepare(qo, CPU)


# ---------------------------------------------------------------------------------------------
# W8A8 static: msModelSlim w8a8 (fp32 or int64 deq_scale), int8 static_tensor
# ---------------------------------------------------------------------------------------------
@FIXTURE_OK
@given(seed=SEEDS, n=st.integers(1, 33), k=st.sampled_from([16, 64, 80]), m=st.integers(1, 5), dtype=DTYPES,
       offset=st.integers(-30, 30), int64=st.booleans(), fold=st.booleans(), with_bias=st.booleans())
def test_w8a8_static_kernel(emu, seed, n, k, m, dtype, offset, int64, fold, with_bias):
    emu.calls.clear()
    s = omniq.get_scheme("w8a8", input_scale=0.02, input_offset=offset,
                         deq_scale_dtype="int64" if int64 else "float32")
    w = _rand((n, k), seed)
    scales = s.scale(w)
    if fold:   # a float bias folded into quant_bias, as msModelSlim exports it
        scales["bias"] = _rand((n,), seed + 3)
    qw = s.pack(w, scales)
    x = _rand((m, k), seed + 1, 0.8).to(dtype)
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("npu.w8a8_static.quant_matmul", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    tol = out_ulp(ref, x, s.dequantize(qw), dtype)
    if dtype == torch.float16:
        # fp16 outputs take the int64 scale of npu_trans_quant_param: 19 bits of the fp32
        # (relative truncation < 2^-10) on (acc + quant_bias) * deq_scale
        # and the layer bias is added after that output is rounded (int32 bias only there)
        body = ref if bias is None else ref - bias
        tol = tol + body.abs() * (2.0 ** -10 + (0 if bias is None else REL[dtype]))
    check(got, ref, tol)
    mm = dict(emu.calls)["npu_quant_matmul"]
    assert mm["scale"] == (torch.int64 if dtype == torch.float16 else torch.float32)   # never fp16
    assert mm["bias"] == (torch.float32 if bias is not None and dtype == torch.bfloat16 else torch.int32)
    assert not mm["pertoken"]
    assert dict(emu.calls)["npu_quantize"]["div_mode"] is True


@FIXTURE_OK
@given(seed=SEEDS, n=st.integers(1, 17), k=st.sampled_from([16, 48]), m=st.integers(1, 4), dtype=DTYPES,
       sym=st.booleans())
def test_int8_static_kernel(emu, seed, n, k, m, dtype, sym):
    emu.calls.clear()
    s = omniq.get_scheme("int8", activation="static_tensor", act_symmetric=sym)
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((8, k), seed + 1)
    qw = s.calibrate(qw, x)
    x = x[:m].to(dtype)
    got = run_kernel("npu.w8a8_static.quant_matmul", qw, x)
    ref = s.matmul(x.float(), qw)
    w = s.dequantize(qw)
    tol = out_ulp(ref, x, w, dtype)
    if dtype == torch.float16:
        tol = tol + ref.abs() * 2.0 ** -10
    if not sym:
        # reference: sat(rint(x * inv) + azp) in integers; npu_quantize: round(x * inv + azp) in fp32.
        # A code differing by d moves y by d * s_in * |W|.
        inv = 1.0 / qw.tensors["input_scale"].float()
        azp = qw.tensors["input_zero_point"].float()
        xf = x.float()
        a = (torch.round(xf * inv) + azp).clamp(-128, 127)
        b = torch.round(xf * inv + azp).clamp(-128, 127)
        tol = tol + ((a - b).abs() / inv) @ w.abs().T
    check(got, ref, tol)


# ---------------------------------------------------------------------------------------------
# weight-only int8 / int4: gptq, awq, int8 (activation=None)
# ---------------------------------------------------------------------------------------------
WEIGHT_ONLY = st.sampled_from([
    ("gptq", dict(bits=4, group_size=32, sym=True)), ("gptq", dict(bits=4, group_size=64, sym=False)),
    ("gptq", dict(bits=8, group_size=32, sym=False)), ("gptq", dict(bits=4, group_size=-1)),
    ("gptq", dict(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")),
    ("awq", dict(group_size=32)), ("awq", dict(group_size=-1)), ("int8", dict(activation=None))])


@FIXTURE_OK
@given(seed=SEEDS, case=WEIGHT_ONLY, n8=st.integers(1, 4), k=st.sampled_from([64, 128]), m=st.integers(1, 4),
       dtype=DTYPES, with_bias=st.booleans())
def test_weight_only_kernel(emu, seed, case, n8, k, m, dtype, with_bias):
    emu.calls.clear()
    name, params = case
    n = 8 * n8
    s = omniq.get_scheme(name, **params)
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("npu.weight_only.weight_quant_bmm", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    w = s.dequantize(qw)
    # the op takes scale/offset in x's dtype and dequantizes in it: two roundings of each
    # weight, <= 2u (u = 2^-8 bf16, 2^-11 fp16) relative to |W| (offsets are small integers, exact)
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    tol = out_ulp(ref, x, w, dtype) + (x.float().abs() @ w.abs().T) * (2 * u + u * u)
    check(got, ref, tol)
    c = dict(emu.calls)["npu_weight_quant_batchmatmul"]
    assert c["scale"] == dtype
    assert c["bias"] == (None if bias is None else torch.float32 if dtype == torch.bfloat16 else torch.float16)
    assert ("npu_convert_weight_to_int4pack" in dict(emu.calls)) == (s.affine_view(qw).bits == 4)


# ---------------------------------------------------------------------------------------------
# MX (Ascend 950): mxfp8, mxfp4 (W4A4 and W4A8), mxfp4_dualscale
# ---------------------------------------------------------------------------------------------
def _mx_tol(ref, x, s, qw, dtype):
    # same codes on both sides (the emulated quantizer is written independently of omniq's);
    # what remains is fp32 accumulation order and the final rounding
    xq = s.quantize_activation(x.float(), qw)
    return REL[dtype] * ref.abs() + (xq.abs() @ s.dequantize(qw).abs().T) * 2.0 ** -20 + 1e-30


@FIXTURE_OK
@given(seed=SEEDS, n=st.integers(1, 24), k=st.sampled_from([32, 64, 96]), m=st.integers(1, 4), dtype=DTYPES,
       with_bias=st.booleans(), mag=st.sampled_from([1e-3, 1.0, 300.0]))
def test_mxfp8_kernel(emu, seed, n, k, m, dtype, with_bias, mag):
    emu.calls.clear()
    s = omniq.get_scheme("mxfp8")
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1, mag).to(dtype)
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("npu.mxfp8.quant_matmul", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    check(got, ref, _mx_tol(ref, x, s, qw, dtype))
    c = dict(emu.calls)["npu_quant_matmul"]
    assert c["group_sizes"] == [1, 1, 32] and c["scale_dtype"] == torch.float8_e8m0fnu
    assert c["bias"] in (None, torch.float32)


@FIXTURE_OK
@given(seed=SEEDS, n=st.integers(1, 24), k=st.sampled_from([32, 64, 96]), m=st.integers(1, 4), dtype=DTYPES,
       act=st.sampled_from(["mxfp4", "mxfp8"]), storage=st.sampled_from(["packed", "e4m3"]),
       with_bias=st.booleans())
def test_mxfp4_kernel(emu, seed, n, k, m, dtype, act, storage, with_bias):
    emu.calls.clear()
    s = omniq.get_scheme("mxfp4", activation=act, weight_storage=storage)
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("npu.mxfp4.quant_matmul", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    tol = _mx_tol(ref, x, s, qw, dtype)
    if act == "mxfp8":   # the W4A8 path runs with bf16 bias and output, then casts to x's dtype
        tol = tol + REL[torch.bfloat16] * ref.abs() + (0 if bias is None else bias.abs() * 2.0 ** -8)
    check(got, ref, tol)
    c = dict(emu.calls)["npu_quant_matmul"]
    assert c["x2_dtype"] == torch.float4_e2m1fn_x2
    assert c["group_sizes"] == ([1, 1, 32] if act == "mxfp4" else [0, 0, 32])


def grid_activations(m, k, seed, dtype):
    """Activations already on the dual-level MXFP4 grid: each 512-block's amax is 6 * 2^e0, each
    32-block's amax 6 * 2^(e0 + e1), elements E2M1 values. Quantizing them is exact under any
    rounding, so the kernel must reproduce scheme.matmul to accumulation order."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    v = mags[torch.randint(0, 8, (m, k // 32, 32), generator=g)]
    v = v * torch.where(torch.rand(m, k // 32, 32, generator=g) < 0.5, -1.0, 1.0)
    v[..., 0] = 6.0                                                      # each 32-block reaches 6
    e1 = -torch.randint(0, 4, (m, k // 32, 1), generator=g).float()
    e1.view(m, k // 512, 16)[..., 0] = 0                                  # each 512-block reaches 6 * 2^e0
    e0 = torch.randint(-3, 4, (m, k // 512, 1), generator=g).float()
    v = v * torch.pow(2.0, e1)
    v = v.reshape(m, k // 512, 512) * torch.pow(2.0, e0)
    return v.reshape(m, k).to(dtype)


@FIXTURE_OK
@given(seed=SEEDS, n=st.integers(1, 12), k=st.sampled_from([512, 1024]), m=st.integers(1, 3), dtype=DTYPES,
       storage=st.sampled_from(["packed", "e4m3"]), smooth=st.booleans(), with_bias=st.booleans())
def test_mxfp4_dualscale_kernel(emu, seed, n, k, m, dtype, storage, smooth, with_bias):
    emu.calls.clear()
    s = omniq.get_scheme("mxfp4_dualscale", weight_storage=storage)
    w = _rand((n, k), seed)
    # mul_scale: powers of two (exact in every dtype), so x * mul_scale is exact on both sides
    mul = torch.pow(2.0, torch.randint(-2, 3, (k,), generator=torch.Generator().manual_seed(seed)).float()) \
        if smooth else None
    qw = s.quantize(w, mul_scale=mul)
    x = grid_activations(m, k, seed + 1, dtype)
    if smooth:
        x = (x.float() / mul).to(dtype)                                   # x * mul_scale lands on the grid
    bias = _rand((n,), seed + 2) if with_bias else None
    got = run_kernel("npu.mxfp4_dualscale.dual_level_matmul", qw, x, bias)
    ref = s.matmul(x.float(), qw, bias)
    check(got, ref, _mx_tol(ref, x, s, qw, dtype))
    c = dict(emu.calls)
    assert c["npu_format_cast"]["acl_format"] == 29 and c["npu_format_cast"]["customize_dtype"] == torch.int8


@FIXTURE_OK
@given(seed=SEEDS, dtype=DTYPES)
def test_mxfp4_dualscale_kernel_random_activations(emu, seed, dtype):
    emu.calls.clear()
    """On arbitrary activations the op stages its level-0 quotient in x's dtype (the reference
    keeps fp32), so codes can differ by one E2M1 step: |dx| <= 2^E * (grid gap <= 2) * l0 per
    element, i.e. at most 1/3 of its 32-block's amax. The kernel stays within that."""
    s = omniq.get_scheme("mxfp4_dualscale")
    n, k, m = 6, 512, 3
    qw = s.quantize(_rand((n, k), seed))
    x = _rand((m, k), seed + 1).to(dtype)
    got = run_kernel("npu.mxfp4_dualscale.dual_level_matmul", qw, x)
    ref = s.matmul(x.float(), qw)
    blk = x.float().abs().reshape(m, -1, 32).amax(-1).repeat_interleave(32, -1)
    tol = _mx_tol(ref, x, s, qw, dtype) + (blk / 3) @ s.dequantize(qw).abs().T
    check(got, ref, tol)


# ---------------------------------------------------------------------------------------------
# limits, reasons, layouts and the dispatcher under emulation
# ---------------------------------------------------------------------------------------------
def test_reasons(emu):
    def reason(kernel, scheme, n=64, k=64, dtype=torch.bfloat16):
        kk = get_kernel(kernel)
        return kk.serves(scheme) or kk.available(CPU) or kk.can_implement(Problem(scheme, n, k, 4, dtype, CPU))
    g = omniq.get_scheme
    assert "at most 65535" in reason("npu.w8a8_dynamic.quant_matmul", g("w8a8_dynamic"), n=70000)
    assert "at most 65535" in reason("npu.w8a8_static.quant_matmul", g("w8a8"), k=65536)
    assert "float16/bfloat16" in reason("npu.w8a8_static.quant_matmul", g("w8a8"), dtype=torch.float32)
    assert "per-group" in reason("npu.w8a8_dynamic.quant_matmul", g("w8a8_dynamic", group_size=32))
    assert "per-group" in reason("npu.w8a8_dynamic.quant_matmul", g("w4a8_dynamic", version="0", group_size=32))
    assert "symmetric" in reason("npu.w8a8_dynamic.quant_matmul", g("int8", act_symmetric=False))
    assert "act-order" in reason("npu.weight_only.weight_quant_bmm", g("gptq", desc_act=True))
    assert "weight-only" in reason("npu.weight_only.weight_quant_bmm", g("int8"))
    assert "no torch_npu kernel" in reason("npu.mxfp8.quant_matmul", g("mxfp8", activation=None))
    assert "floor" in reason("npu.mxfp4.quant_matmul", g("mxfp4", scale_rule="even"))
    assert "nearest even" in reason("npu.mxfp4_dualscale.dual_level_matmul", g("mxfp4_dualscale", act_rounding="rhaz"))
    assert reason("npu.weight_only.weight_quant_bmm", g("gptq", group_size=32), k=96) is None


def test_dispatcher_picks_npu_kernels_under_emulation(emu):
    s = omniq.get_scheme("w8a8_dynamic")
    qw = s.quantize(_rand((16, 64), 0))
    x = _rand((2, 3, 64), 1).to(torch.bfloat16)          # 3-D input through omniq.linear
    v = {v.kernel: v for v in omniq.explain(qw, m=1)}["npu.w8a8_dynamic.quant_matmul"]
    assert v.status in ("chosen", "valid") or v.reason.startswith("needs layout"), v.line()
    with omniq.use_kernel("npu.w8a8_dynamic.quant_matmul"):
        p = omniq.prepare(qw, CPU)
        assert p.kernel_for(6, torch.bfloat16).name == "npu.w8a8_dynamic.quant_matmul"
        y = omniq.linear(x, p)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    ref = s.matmul(x.float(), qw)
    check(y.reshape(6, 16), ref.reshape(6, 16), out_ulp(ref.reshape(6, 16), x.reshape(6, 64), s.dequantize(qw),
                                                       torch.bfloat16))


def test_scale_pair_packing_pads_odd_group_counts():
    b = torch.arange(1, 7, dtype=torch.uint8).reshape(2, 3)
    p = npu._pair_scales(b)
    assert p.shape == (2, 2, 2)
    assert p.reshape(2, 4).tolist() == [[1, 2, 3, 0], [4, 5, 6, 0]]
