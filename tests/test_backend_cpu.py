"""The CPU backend: every cpu.* kernel, forced, against scheme.matmul on generated shapes (M = 1
and more, 3-D inputs, bias, bf16/fp16/fp32), its int8 activation quantizer against each scheme's
quantize_activation bit for bit (rounding ties included), the dispatcher's unforced choice of a
CPU kernel, the reasons a forced kernel gives on shapes it cannot run, the opt-in dequantize
cache, and the memory rule for the packed int4 layout."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.backends import cpu
from omniq.errors import KernelError

from _int_util import ULP, activations, assert_within, error_bound, quantized
from _scheme_util import near_ties

CPU = torch.device("cpu")
BF16_REL = 2.0**-7   # a kernel that rounds x and the weight (or its scales) to bf16 once each


def _bias(draw, n: int):
    if draw(st.booleans()):
        return None
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(n, generator=g).to(draw(st.sampled_from((torch.float32, torch.bfloat16))))


def _run_forced(kernel: str, qw, x, bias):
    with omniq.use_kernel(kernel):
        p = omniq.prepare(qw, CPU, x.dtype)
        assert p.kernel_for(x.reshape(-1, x.shape[-1]).shape[0], x.dtype).name == kernel
        y = omniq.linear(x, p, bias)
    assert y.is_contiguous()
    return y


def _bf16_bound(x, qw, ref, bias):
    """Kernels computing in bf16: x, the weight (or its group scales and zeros) rounded to bf16.
    Zero points rounded to bf16 add up to half a bf16 ulp of 16 group scales per weight."""
    k = qw.shape[1]
    sch = qw.scheme
    xf = sch.quantize_activation(x.reshape(-1, k).float(), qw).abs()
    w = sch.dequantize(qw).abs()
    av = sch.affine_view(qw)
    if av is not None and av.offsets is not None:
        gi = av.g_idx.long() if av.g_idx is not None else torch.arange(k) // av.group_size
        w = w + 16 * av.scales[:, gi].abs()
    mag = (xf @ w.T).reshape(ref.shape)
    if bias is not None:
        mag = mag + bias.float().abs()
    return ULP[x.dtype] * ref.float().abs() + (BF16_REL + k * 2.0**-22) * mag + 1e-30


# ---- int8 W8A8 (torch._int_mm) -------------------------------------------------------------------
INT8_W8A8 = [("int8", {}), ("int8", dict(act_symmetric=False)),
             ("int8", dict(activation="static_tensor")),
             ("int8", dict(activation="static_tensor", act_symmetric=False)),
             ("w8a8", {}), ("w8a8", dict(deq_scale_dtype="int64")), ("w8a8_dynamic", {})]


@st.composite
def int8_w8a8_cases(draw):
    name, params = draw(st.sampled_from(INT8_W8A8))
    return omniq.get_scheme(name, **params), draw(st.integers(1, 48)), draw(st.integers(1, 300))


@pytest.mark.parametrize("kernel", ["cpu.int8.fbgemm", "cpu.int8.int_mm", "cpu.int8.int_mm_t"])
@settings(max_examples=20)
@given(data=st.data())
def test_int8_w8a8_kernel_matches_scheme_matmul(kernel, data):
    sch, n, k = data.draw(int8_w8a8_cases())
    if k == 1 and "int_mm" in kernel:
        k = 2  # torch's CPU _int_mm is wrong at K = 1; those kernels refuse it (test below)
    x = data.draw(activations(k, 9))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)), x_sample=x)
    bias = _bias(data.draw, n)
    y = _run_forced(kernel, qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    # the integer product is exact: only the fp32 epilogue and the output rounding differ
    assert_within(y, ref, error_bound(x, qw, ref, bias), f"{kernel} {sch.key} N={n} K={k} x={tuple(x.shape)}")


@pytest.mark.parametrize("kernel", ["cpu.int8.int_mm", "cpu.int8.int_mm_t"])
def test_int_mm_kernels_refuse_k1_with_reason(kernel):
    from omniq.dispatch import Problem, get_kernel
    pr = Problem(omniq.get_scheme("int8"), 16, 1, 4, torch.bfloat16, CPU)
    assert "K=1" in get_kernel(kernel).can_implement(pr)
    qw = quantized(omniq.get_scheme("int8"), 16, 1, 0)
    x = torch.randn(3, 1)
    y = omniq.linear(x, omniq.prepare(qw, CPU, x.dtype))   # another kernel serves it, correctly
    ref = qw.scheme.matmul(x, qw)
    assert_within(y, ref, error_bound(x, qw, ref, None), "int8 K=1")


def _fake_from_codes(q, s, azp, p):
    if p.act == "ms_static":
        return (q.float() - p.in_zp) * p.in_scale
    qd = q.double()
    if azp is not None:
        qd = qd - azp
    return qd.float() * s


def _tie_rows(m: int, k: int, seed: int) -> torch.Tensor:
    """Half-integers in [-126.5, 126.5] with one 127 per row: amax 127 makes the dynamic scale
    exactly 1 (and a static scale of 1 does the same), so every value is a rounding tie."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 127, (m, k), generator=g).float() + 0.5
    x[:, 0] = 127.0
    return x


def _near_tie_rows(m: int, k: int, seed: int, c: float) -> torch.Tensor:
    """Values at and next to (j + 1/2) * c, with one 127 * c per row (amax = 127 c, so the
    dynamic scale is c too)."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randint(-126, 126, (m * k,), generator=g).float() + 0.5
    pts = torch.from_numpy(near_ties((j * c).numpy(), ulps=2))
    x = pts[torch.randperm(pts.numel(), generator=g)[: m * k]].reshape(m, k).float()
    x[:, 0] = torch.tensor(127 * c, dtype=torch.float32)
    return x


@pytest.mark.parametrize("name,params", INT8_W8A8, ids=[f"{n}-{p}" for n, p in INT8_W8A8])
@settings(max_examples=25)
@given(data=st.data())
def test_int8_activation_codes_are_the_schemes(name, params, data):
    """The codes the CPU kernels multiply, times their scales, equal scheme.quantize_activation
    exactly: on rows of rounding ties (scale 1: x*1 is a half-integer) and on generated rows."""
    sch = omniq.get_scheme(name, **params)
    k = data.draw(st.integers(2, 200))
    m = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**31 - 1))
    mode = data.draw(st.sampled_from(("ties", "near", "random")))
    c = data.draw(st.sampled_from((0.1, 0.3, 1 / 3, 0.07)))
    if mode == "ties":
        x, scale = _tie_rows(m, k, seed), 1.0
    elif mode == "near":  # within 2 float32 ulps of the ties of scale c: x / c and x * (1/c) part here
        x, scale = _near_tie_rows(m, k, seed, c), c
    else:
        x, scale = data.draw(activations(k, 6, dtypes=(torch.float32,))).reshape(-1, k), 0.25
    qw = quantized(sch, 8, k, seed)
    static = dict(input_scale=torch.tensor([scale], dtype=torch.float32))
    if name == "int8" and params.get("activation") == "static_tensor":
        extra = {} if params.get("act_symmetric", True) else dict(input_zero_point=torch.tensor([3], dtype=torch.int32))
        qw = omniq.QuantizedWeight(sch, qw.shape, {**qw.tensors, **static, **extra})
    elif name == "w8a8":
        qw = omniq.QuantizedWeight(sch, qw.shape, {**qw.tensors, **static, "input_offset": torch.tensor([-5.0])})
    p = cpu.INT8_LAYOUT.prepare(qw, CPU)
    q, s, azp = cpu.quantize_int8_activation(x, p)
    assert q.dtype == torch.int8
    assert torch.equal(_fake_from_codes(q, s, azp, p), sch.quantize_activation(x.float(), qw))


# ---- int8 weight-only (torch._weight_int8pack_mm) ------------------------------------------------
@settings(max_examples=20)
@given(data=st.data())
def test_int8_weight_only_kernel_matches_scheme_matmul(data):
    sch = omniq.get_scheme("int8", activation=None)
    n, k = data.draw(st.integers(1, 48)), 16 * data.draw(st.integers(1, 20))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    x = data.draw(activations(k, 9))
    bias = _bias(data.draw, n)
    y = _run_forced("cpu.int8.int8pack", qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    assert_within(y, ref, _bf16_bound(x, qw, ref, bias), f"int8pack N={n} K={k} x={tuple(x.shape)}")


# ---- 4-bit grouped weights (CPU tinygemm) --------------------------------------------------------
@st.composite
def int4_cases(draw):
    fam = draw(st.sampled_from(("gptq", "gptq", "awq")))
    g = draw(st.sampled_from((64, 128, -1)))
    if fam == "gptq":
        sch = omniq.get_scheme("gptq", bits=4, group_size=g, sym=draw(st.booleans()),
                               desc_act=draw(st.booleans()),
                               checkpoint_format=draw(st.sampled_from(("gptq", "gptq_v2"))))
    else:
        sch = omniq.get_scheme("awq", group_size=g)
    n = 16 * draw(st.integers(1, 4))
    # one group per channel: the op's largest group, 256, keeps the scale bytes within the rule
    k = draw(st.integers(1, 3)) * (g if g > 0 else 256)
    return sch, n, k


@settings(max_examples=30)
@given(data=st.data())
def test_int4_kernel_matches_scheme_matmul(data):
    kernel = "cpu.int4.tinygemm"
    sch, n, k = data.draw(int4_cases())
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    x = data.draw(activations(k, 20))
    bias = _bias(data.draw, n)
    y = _run_forced(kernel, qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    assert_within(y, ref, _bf16_bound(x, qw, ref, bias), f"{kernel} {sch.key} N={n} K={k} x={tuple(x.shape)}")


@settings(max_examples=10)
@given(data=st.data())
def test_int4_dequant_kernel_matches_scheme_matmul(data):
    """The large-M kernel reads the same packed layout (N a multiple of 64) back to bf16."""
    sch, n, k = data.draw(int4_cases())
    n = 64 * data.draw(st.integers(1, 2))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    m = data.draw(st.integers(cpu.INT4_DEQUANT_MIN_M, cpu.INT4_DEQUANT_MIN_M + 40))
    x = data.draw(activations(k, 1)).reshape(-1, k)[:1].expand(m, k) * torch.linspace(-1, 1, m)[:, None]
    bias = _bias(data.draw, n)
    y = _run_forced("cpu.int4.dequant_mm", qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    assert_within(y, ref, _bf16_bound(x, qw, ref, bias), f"int4 dequant_mm {sch.key} N={n} K={k} M={m}")


@settings(max_examples=10)
@given(data=st.data())
def test_int8_weight_only_dequant_kernel_matches_scheme_matmul(data):
    sch = omniq.get_scheme("int8", activation=None)
    n, k = data.draw(st.integers(1, 48)), data.draw(st.integers(1, 300))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    m = data.draw(st.integers(cpu.INT8_DEQUANT_MIN_M, cpu.INT8_DEQUANT_MIN_M + 40))
    dtype = data.draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1))))).to(dtype)
    bias = _bias(data.draw, n)
    y = _run_forced("cpu.int8.dequant_mm", qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    assert_within(y, ref, _bf16_bound(x, qw, ref, bias), f"int8 dequant_mm N={n} K={k} M={m}")


def test_int4_packing_is_read_back_exactly():
    assert cpu.int4_unpack_reason() is None
    q = torch.randint(0, 16, (192, 160), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(cpu.unpack_tinygemm(packed, 192, 160).to(torch.int32), q)


def test_int4_act_order_permutes_k():
    """desc_act weights with a non-trivial g_idx: the layout sorts K by group and the kernel
    permutes x to match (a missing or inverted permutation is far outside the bound)."""
    sch = omniq.get_scheme("gptq", bits=4, group_size=64, desc_act=True)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) * torch.linspace(0.1, 3, 256)[torch.randperm(256, generator=g)]
    qw = sch.quantize(w)
    assert sch.affine_view(qw).g_idx is not None
    x = torch.randn(3, 256, generator=g)
    y = _run_forced("cpu.int4.tinygemm", qw, x, None)
    ref = sch.matmul(x, qw)
    assert cpu.INT4_LAYOUT.prepare(qw, CPU).perm is not None
    assert_within(y, ref, _bf16_bound(x, qw, ref, None), "act-order")


# ---- fp8 (torch._scaled_mm) ----------------------------------------------------------------------
FP8_CASES = [dict(), dict(weight_granularity="tensor"), dict(weight_granularity="tensor", activation="dynamic_tensor"),
             dict(activation="static_tensor")]


@settings(max_examples=15)
@given(data=st.data())
def test_fp8_scaled_mm_matches_scheme_matmul(data):
    sch = omniq.get_scheme("fp8", **data.draw(st.sampled_from(FP8_CASES)))
    n, k = data.draw(st.integers(1, 48)), data.draw(st.integers(1, 200))
    x = data.draw(activations(k, 9))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)), x_sample=x)
    bias = _bias(data.draw, n)
    y = _run_forced("cpu.fp8.scaled_mm", qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    assert_within(y, ref, error_bound(x, qw, ref, bias), f"scaled_mm {sch.key} N={n} K={k}")


# ---- dequantize-then-matmul ----------------------------------------------------------------------
DEQUANT_CASES = [("fp8", dict(weight_granularity="block", activation="block")), ("fp8", dict(activation=None)),
                 ("mxfp8", {}), ("mxfp4", {}), ("mxfp4", dict(activation=None)), ("nvfp4", {}),
                 ("gguf", dict(type="q4_k")), ("gguf", dict(type="q8_0")), ("gptq", dict(group_size=32)),
                 ("gptq", dict(bits=8)), ("w8a8_dynamic", dict(group_size=32)), ("w4a8_dynamic", {}),
                 ("int8", {})]


@st.composite
def dequant_cases(draw):
    name, params = draw(st.sampled_from(DEQUANT_CASES))
    return omniq.get_scheme(name, **params), 8 * draw(st.integers(1, 4)), 256 * draw(st.integers(1, 2))


def _check_dequant(kernel, data):
    sch, n, k = data.draw(dequant_cases())
    x = data.draw(activations(k, 9))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)), x_sample=x)
    bias = _bias(data.draw, n)
    y = _run_forced(kernel, qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    assert_within(y, ref, _bf16_bound(x, qw, ref, bias), f"{kernel} {sch.key} N={n} K={k}")


@settings(max_examples=15)
@given(data=st.data())
def test_dequant_kernel_matches_scheme_matmul(data):
    _check_dequant("cpu.dequant", data)


@settings(max_examples=8)
@given(data=st.data())
def test_cached_dequant_kernel_matches_scheme_matmul(data):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cpu.CACHE_ENV, "1")
        _check_dequant("cpu.dequant.cached", data)


def test_cached_dequant_is_opt_in(monkeypatch):
    monkeypatch.delenv(cpu.CACHE_ENV, raising=False)
    qw = omniq.get_scheme("mxfp4").quantize(torch.randn(16, 64))
    with pytest.raises(KernelError, match=cpu.CACHE_ENV):
        _run_forced("cpu.dequant.cached", qw, torch.randn(2, 64), None)
    assert omniq.prepare(qw, CPU).layout != cpu.CACHED_LAYOUT.name


def test_dequant_refuses_a_scheme_with_its_own_matmul():
    sch = omniq.get_scheme("w8a8")
    assert "quant_bias" in omniq.get_kernel("cpu.dequant").serves(sch)


# ---- the dispatcher, unforced --------------------------------------------------------------------
@pytest.mark.parametrize("name,params,layout", [
    ("int8", {}, "cpu.int8.fbgemm"), ("int8", dict(activation=None), "cpu.int8.nk"),
    ("w8a8_dynamic", {}, "cpu.int8.fbgemm"), ("w8a8", {}, "cpu.int8.fbgemm"),
    ("gptq", dict(bits=4, group_size=128), "cpu.int4.packed"),
    ("gptq", dict(bits=4, group_size=128, desc_act=True), "cpu.int4.packed"),
    ("awq", dict(group_size=128), "cpu.int4.packed")])
def test_dispatcher_picks_a_cpu_kernel_without_forcing(name, params, layout):
    sch = omniq.get_scheme(name, **params)
    qw = sch.quantize(torch.randn(64, 256) * 0.1)
    p = omniq.prepare(qw, CPU)
    assert p.layout == layout
    for m in (1, 7, 16, 17, 300):
        for dt in (torch.bfloat16, torch.float32):
            assert p.kernel_for(m, dt).backend == "cpu", (m, dt, p.kernel_for(m, dt))
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    y = omniq.linear(x, qw)
    ref = sch.matmul(x, qw)
    assert_within(y, ref, _bf16_bound(x, qw, ref, None), f"unforced {sch.key}")


# ---- reasons of a forced kernel on a problem it cannot run ---------------------------------------
@pytest.mark.parametrize("kernel,name,params,n,k,m,match", [
    ("cpu.int4.tinygemm", "gptq", dict(group_size=128), 24, 128, 1, "N=24 is not a multiple of 16"),
    ("cpu.int4.tinygemm", "gptq", dict(group_size=128), 32, 136, 1, "partial last group"),
    ("cpu.int4.tinygemm", "gptq", dict(group_size=-1), 32, 200, 1, "not a multiple of 32"),
    ("cpu.int4.tinygemm", "gptq", dict(group_size=32), 32, 128, 1, "format's bytes"),
    ("cpu.int4.tinygemm", "gptq", dict(bits=8), 32, 128, 1, "8-bit codes"),
    ("cpu.int8.int8pack", "int8", dict(activation=None), 8, 40, 1, "K=40 is not a multiple of 16"),
    ("cpu.int8.dequant_mm", "int8", dict(activation=None), 8, 32, 3, "int8pack is faster"),
    ("cpu.int4.dequant_mm", "gptq", dict(group_size=64), 64, 128, 3, "tinygemm is faster"),
    ("cpu.int4.dequant_mm", "gptq", dict(group_size=64), 48, 128, 600, "N=48 is not a multiple of 64"),
    ("cpu.int8.int_mm", "int8", dict(activation=None), 8, 32, 1, "weight-only"),
    ("cpu.int8.fbgemm", "int8", dict(activation=None), 8, 32, 1, "weight-only"),
    ("cpu.int8.int_mm_t", "w8a8_dynamic", dict(group_size=16), 8, 32, 1, "per-group weight scales"),
    ("cpu.fp8.scaled_mm", "fp8", dict(weight_granularity="block", activation="block"), 8, 32, 1, "block"),
])
def test_forced_kernel_raises_its_reason(kernel, name, params, n, k, m, match):
    qw = omniq.get_scheme(name, **params).quantize(torch.randn(n, k))
    with pytest.raises(KernelError, match=match):
        _run_forced(kernel, qw, torch.randn(m, k), None)


def test_fbgemm_is_exact_here_or_says_why():
    """The self-test runs the int16-saturation worst case; on this machine (VNNI) it passes."""
    why = cpu.fbgemm_reason()
    if why is not None:
        assert "fbgemm" in why and omniq.get_kernel("cpu.int8.fbgemm").available(CPU) == why
        return
    packed = cpu._fbgemm_pack(torch.full((32, 300), 127, dtype=torch.int8))
    got = cpu._fbgemm_linear(torch.full((3, 300), -128.0), packed)
    assert torch.equal(got, torch.full((3, 32), -128.0 * 127 * 300))


def test_kernels_report_absence_off_the_cpu():
    for kern in omniq.all_kernels():
        if kern.backend == "cpu":
            assert "CPU" in kern.available(torch.device("meta"))


# ---- memory ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [("gptq", dict(group_size=128)), ("gptq", dict(group_size=64)),
                                         ("gptq", dict(group_size=128, desc_act=True)),
                                         ("gptq", dict(group_size=-1)), ("awq", dict(group_size=64))])
def test_int4_layout_keeps_the_memory_rule(name, params):
    sch = omniq.get_scheme(name, **params)
    n, k = 256, 1024
    qw = sch.quantize(torch.randn(n, k) * 0.05)
    from omniq.linear import _nbytes
    got = _nbytes(cpu.INT4_LAYOUT.prepare(qw, CPU))
    assert got <= cpu.MEMORY_SLACK * sch.nominal_nbytes(n, k)
    act_order = sch.name == "gptq" and sch.desc_act
    assert got == cpu.int4_prepared_nbytes(n, k, cpu.tinygemm_group(k, sch.group(k)), act_order)
