"""msModelSlim schemes (w8a8, w8a8_dynamic, w4a8_dynamic) against formats.md §6, with the
oracles written here in numpy from the formulas (not from omniq's code)."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import omniq
from omniq.errors import OmniqError
from omniq.schemes.base import QuantizedWeight
from omniq.schemes.msmodelslim import decode_deq_scale

SEEDS = st.integers(0, 2**31 - 1)


def _rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def np_rne(a):
    return np.round(a)  # numpy rounds half to even


def np_deq_int64(deq_f32: np.ndarray) -> np.ndarray:
    """msModelSlim's encoding: the fp32 bits as int32, widened to int64 (deqscale.py)."""
    return np.frombuffer(deq_f32.astype(np.float32).tobytes(), dtype=np.int32).astype(np.int64)


# =============================== w8a8 (static) ===============================
@given(seed=SEEDS, n=st.integers(1, 9), k=st.sampled_from([1, 7, 32, 64]), m=st.integers(1, 4),
       s_in=st.floats(0.002, 0.05), o=st.integers(-20, 20), int64=st.booleans())
def test_w8a8_matmul_is_the_producer_formula(seed, n, k, m, s_in, o, int64):
    """(x_q @ W_q^T + quant_bias) * deq_scale with x_q = sat(rne(x/s + o)), computed in numpy."""
    s = omniq.get_scheme("w8a8", input_scale=s_in, input_offset=o, deq_scale_dtype="int64" if int64 else "float32")
    w = _rand((n, k), seed)
    qw = s.quantize(w)
    x = _rand((m, k), seed + 1, 0.5)
    t = {name: v.numpy() for name, v in qw.tensors.items()}
    deq = t["deq_scale"]
    if int64:
        assert t["deq_scale"].dtype == np.int64
        deq = np.frombuffer(deq.astype(np.int32).tobytes(), dtype=np.float32)   # the documented decode
    xq = np.clip(np_rne(x.numpy().astype(np.float32) / np.float32(s_in) + np.float32(o)), -128, 127)
    acc = xq.astype(np.float64) @ t["weight"].astype(np.float64).T + t["quant_bias"].astype(np.float64)
    want = (acc * deq.astype(np.float64)).astype(np.float32)
    got = s.matmul(x, qw)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


@given(seed=SEEDS, n=st.integers(1, 9), k=st.sampled_from([5, 32, 96]))
def test_w8a8_stored_tensors_follow_the_producer(seed, n, k):
    """weight_scale = amax/127 per channel, W_q = sat(rne(W/s)), deq_scale = input_scale * weight_scale,
    quant_bias = rne(bias/deq - input_offset * sum_k W_q) (formats.md §6.1)."""
    s_in, o = 0.01, -7.0
    s = omniq.get_scheme("w8a8", input_scale=s_in, input_offset=o)
    w = _rand((n, k), seed)
    b = _rand((n,), seed + 2)
    qw = s.pack(w, {**s.scale(w), "bias": b})
    wn = w.numpy().astype(np.float32)
    ws = np.abs(wn).max(1) / np.float32(127)
    ws = np.where(ws == 0, 1, ws).astype(np.float32)
    wq = np.clip(np_rne(wn / ws[:, None]), -128, 127)
    np.testing.assert_array_equal(qw.tensors["weight"].numpy(), wq.astype(np.int8))
    deq = (np.float32(s_in) * ws).astype(np.float32)
    np.testing.assert_array_equal(qw.tensors["deq_scale"].numpy(), deq)
    qb = np_rne(b.numpy().astype(np.float64) / deq.astype(np.float64) - o * wq.sum(1))
    np.testing.assert_array_equal(qw.tensors["quant_bias"].numpy(), qb.astype(np.int32))
    assert qw.tensors["quant_bias"].dtype == torch.int32


def test_w8a8_activation_divides_by_input_scale():
    """x / input_scale (a true division, as msModelSlim's fake quantizer and npu_quantize's
    div_mode do), not x * (1/input_scale): values where the two round apart must follow the division."""
    s_in = np.float32(0.02)
    k = np.arange(-120, 120, dtype=np.float32) + np.float32(0.5)
    x = np.concatenate([np.nextafter(k * s_in, np.float32(d)) for d in (-1e9, 1e9)]).astype(np.float32)
    div = np.clip(np_rne(x / s_in), -128, 127)
    mul = np.clip(np_rne(x * (np.float32(1) / s_in)), -128, 127)
    assert (div != mul).any()                     # the sample does separate the two rules
    s = omniq.get_scheme("w8a8", input_scale=float(s_in))
    qw = s.quantize(torch.ones(1, len(x)))        # any weight: only the activation is read
    got = s.quantize_activation(torch.from_numpy(x)[None], qw)   # (x_q - 0) * input_scale
    np.testing.assert_array_equal((got[0] / torch.tensor(s_in)).round().numpy(), div)


def test_w8a8_deq_scale_int64_from_numpy_bytes_is_read_back():
    """A checkpoint deq_scale built the msModelSlim way (numpy bytes -> int64) reads as the fp32
    it encodes, bit for bit, and the matmul equals the fp32-stored one exactly."""
    s = omniq.get_scheme("w8a8", input_scale=0.02, input_offset=3)
    w = _rand((6, 48), 0)
    qw = s.quantize(w)
    deq = qw.tensors["deq_scale"].numpy()
    i64 = torch.from_numpy(np_deq_int64(deq))
    assert i64.dtype == torch.int64
    assert torch.equal(decode_deq_scale(i64).view(torch.int32), torch.from_numpy(deq).view(torch.int32))
    qw64 = QuantizedWeight(s, qw.shape, {**qw.tensors, "deq_scale": i64})
    x = _rand((3, 48), 1)
    assert torch.equal(s.matmul(x, qw64), s.matmul(x, qw))
    # quantize(deq_scale_dtype="int64") writes exactly those bytes
    s64 = omniq.get_scheme("w8a8", input_scale=0.02, input_offset=3, deq_scale_dtype="int64")
    assert torch.equal(s64.quantize(w).tensors["deq_scale"], i64)


def test_deq_scale_int64_sign_extension_decodes():
    """numpy's astype(int64) sign-extends the int32 view: negative fp32 patterns decode too."""
    v = np.array([-1.5, 2.0**-30, -3.0e-5, 7.25], dtype=np.float32)
    got = decode_deq_scale(torch.from_numpy(np_deq_int64(v)))
    np.testing.assert_array_equal(got.numpy(), v)


@given(seed=SEEDS, n=st.integers(1, 8), k=st.sampled_from([16, 33]))
def test_w8a8_dequantize_within_half_step(seed, n, k):
    s = omniq.get_scheme("w8a8", input_scale=0.05)
    w = _rand((n, k), seed)
    qw = s.quantize(w)
    step = w.abs().amax(1, keepdim=True) / 127
    assert bool(((s.dequantize(qw) - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all())
    # unpack is the stored int8 codes, exactly; affine_view reproduces dequantize
    assert torch.equal(s.unpack(qw), qw.tensors["weight"].to(torch.int32))
    av = s.affine_view(qw)
    torch.testing.assert_close(av.codes.float() * av.scales, s.dequantize(qw), rtol=1e-6, atol=0)


@given(seed=SEEDS, k=st.sampled_from([16, 64]), shift=st.floats(-2.0, 2.0))
def test_w8a8_calibrate_covers_the_range_and_keeps_the_bias(seed, k, shift):
    s = omniq.get_scheme("w8a8")              # placeholder input_scale until calibrated
    w = _rand((5, k), seed)
    b = _rand((5,), seed + 3)
    qw = s.pack(w, {**s.scale(w), "bias": b})
    x = _rand((7, k), seed + 4) + shift
    qc = s.calibrate(qw, x)
    s_in, o = float(qc.tensors["input_scale"]), float(qc.tensors["input_offset"])
    assert o == round(o) and -128 <= o <= 127
    v = x.double() / s_in + o                    # nothing saturates beyond half a step
    assert float(v.min()) >= -128.5 and float(v.max()) <= 127.5
    # y ~ x W^T + b: activation error <= s_in/2 per element, weight error <= step/2, bias rounding
    y = s.matmul(x, qc)
    ref = x.double() @ w.double().T + b.double()
    ws = w.abs().amax(1).double() / 127
    bound = (s_in / 2) * w.abs().double().sum(1) + (ws / 2) * (x.abs().double() + s_in).sum(1, keepdim=True) \
        + 0.5 * s_in * ws + 1e-4
    assert bool(((y.double() - ref).abs() <= bound).all())


def test_w8a8_bad_parameters_and_tensors():
    with pytest.raises(OmniqError, match="input_offset"):
        omniq.get_scheme("w8a8", input_offset=0.5)
    with pytest.raises(OmniqError, match="deq_scale_dtype"):
        omniq.get_scheme("w8a8", deq_scale_dtype="float16")
    s = omniq.get_scheme("w8a8")
    qw = s.quantize(_rand((4, 8), 0))
    with pytest.raises(OmniqError, match="deq_scale.*float16"):   # no fp16 deq_scale (the NPU rejects it too)
        QuantizedWeight(s, (4, 8), {**qw.tensors, "deq_scale": qw.tensors["deq_scale"].half()})
    with pytest.raises(OmniqError, match="quant_bias"):
        QuantizedWeight(s, (4, 8), {**qw.tensors, "quant_bias": qw.tensors["quant_bias"][:3]})


def test_w8a8_tensor_specs_shard_per_output_channel():
    specs = omniq.get_scheme("w8a8").tensor_specs(12, 40)
    assert specs["weight"].out_dim == 0 and specs["weight"].in_dim == 1
    for t in ("deq_scale", "quant_bias"):
        assert specs[t].shape == (12,) and specs[t].out_dim == 0 and specs[t].in_dim is None
    assert specs["input_scale"].per_tensor and specs["input_offset"].per_tensor
    assert torch.int64 in specs["deq_scale"].also_accepts
    # quant_bias corrects the activation offset over the full K: row-parallel adds it on one rank
    assert specs["quant_bias"].rank0_only and not specs["deq_scale"].rank0_only


# =============================== w8a8_dynamic ===============================
@given(seed=SEEDS, n=st.integers(1, 9), k=st.sampled_from([32, 64, 128]), m=st.integers(1, 3),
       grouped=st.booleans(), three_d=st.booleans())
def test_w8a8_dynamic_matmul_is_the_formula(seed, n, k, m, grouped, three_d):
    """y = sum_g (x_q @ W_q[g]^T) * s_t * weight_scale[:, g], s_t = rowmax|x|/127, x_q = rne(x/s_t)."""
    gs = 32 if grouped else -1
    s = omniq.get_scheme("w8a8_dynamic", group_size=gs)
    w = _rand((n, k), seed)
    qw = s.quantize(w)
    x = _rand((2, m, k) if three_d else (m, k), seed + 1)
    xn = x.reshape(-1, k).numpy().astype(np.float32)
    st_ = np.abs(xn).max(1, keepdims=True) / np.float32(127)
    xq = np.clip(np_rne(xn / np.where(st_ == 0, 1, st_)), -128, 127)
    wq = qw.tensors["weight"].numpy().astype(np.float64)
    ws = qw.tensors["weight_scale"].numpy().astype(np.float64)
    g = k if gs == -1 else gs
    want = sum((xq[:, j:j + g].astype(np.float64) @ wq[:, j:j + g].T) * ws[:, j // g][None]
               for j in range(0, k, g)) * st_.astype(np.float64)
    got = s.matmul(x, qw).reshape(-1, n)
    np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=1e-6, atol=1e-6)
    # and it approximates the float product: |dy| <= s_t/2 * sum|W| + sum|x| * step/2
    step = torch.from_numpy(ws).float().repeat_interleave(g, 1)[:, :k]
    xf = x.reshape(-1, k)
    bound = torch.from_numpy(st_) / 2 * w.abs().sum(1) + (xf.abs() + torch.from_numpy(st_)) @ (step / 2).T + 1e-5
    assert bool(((got - xf @ w.T).abs() <= bound).all())


@given(seed=SEEDS, n=st.integers(1, 6), k=st.sampled_from([64, 96]))
def test_w8a8_dynamic_round_trip_and_affine_view(seed, n, k):
    s = omniq.get_scheme("w8a8_dynamic", group_size=32)
    w = _rand((n, k), seed)
    qw = s.quantize(w)
    assert qw.tensors["weight_scale"].shape == (n, k // 32)
    assert bool((qw.tensors["weight_offset"] == 0).all())
    step = w.abs().reshape(n, -1, 32).amax(-1).repeat_interleave(32, 1) / 127
    assert bool(((s.dequantize(qw) - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all())
    # a nonzero weight_offset dequantizes as (W_q - offset) * scale, and affine_view agrees
    off = torch.randint(-3, 4, qw.tensors["weight_offset"].shape, generator=torch.Generator().manual_seed(seed)).float()
    qo = QuantizedWeight(s, qw.shape, {**qw.tensors, "weight_offset": off})
    sc = qw.tensors["weight_scale"].repeat_interleave(32, 1)
    want = (qw.tensors["weight"].float() - off.repeat_interleave(32, 1)) * sc
    torch.testing.assert_close(s.dequantize(qo), want)
    av = s.affine_view(qo)
    rep = lambda t: t.repeat_interleave(av.group_size, 1)  # noqa: E731
    offsets = 0 if av.offsets is None else rep(av.offsets)   # None: every drawn offset was 0
    assert (av.offsets is None) == bool((off == 0).all())
    # codes*s + (-off*s) rounds twice where (codes - off)*s rounds once: a few ulp of 130*s
    torch.testing.assert_close(av.codes.float() * rep(av.scales) + offsets, want, rtol=1e-6,
                               atol=float(sc.abs().max()) * 130 * 2.0**-22)


def test_w8a8_dynamic_bad_group():
    with pytest.raises(OmniqError, match="group_size"):
        omniq.get_scheme("w8a8_dynamic", group_size=0)
    with pytest.raises(OmniqError, match="multiple of group_size=32"):
        omniq.get_scheme("w8a8_dynamic", group_size=32).quantize(_rand((4, 48), 0))


# =============================== w4a8_dynamic ===============================
@given(seed=SEEDS, half_n=st.integers(1, 6), k=st.sampled_from([16, 32, 48]))
def test_w4a8_packing_along_n_is_the_documented_byte(seed, half_n, k):
    """byte[r, k] = (W[2r, k] & 0xF) | (W[2r+1, k] << 4), read and written."""
    n = 2 * half_n
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g)
    qn = q.numpy().astype(np.int64)
    byte = ((qn[0::2] & 0xF) | ((qn[1::2] & 0xF) << 4)).astype(np.uint8).view(np.int8)
    s = omniq.get_scheme("w4a8_dynamic")
    scale = (torch.rand(n, 1, generator=g) + 0.5)
    tensors = {"weight": torch.from_numpy(byte.copy()), "weight_scale": scale, "weight_offset": torch.zeros(n, 1),
               "scale_bias": torch.zeros(n, 1)}
    qw = QuantizedWeight(s, (n, k), tensors)
    assert torch.equal(s.unpack(qw), q.to(torch.int32))                 # reader
    torch.testing.assert_close(s.dequantize(qw), q.float() * scale)
    # writer: a weight on the grid whose rows reach 7 * scale (so quantize finds the same scale)
    q7 = q.clamp(-7, 7)
    q7[:, 0] = 7
    q7n = q7.numpy().astype(np.int64)
    byte7 = ((q7n[0::2] & 0xF) | ((q7n[1::2] & 0xF) << 4)).astype(np.uint8).view(np.int8)
    qw2 = s.quantize(q7.float() * scale)
    assert torch.equal(qw2.tensors["weight"], torch.from_numpy(byte7.copy()))
    assert qw2.tensors["weight"].shape == (n // 2, k) and qw2.tensors["weight"].dtype == torch.int8


@given(seed=SEEDS, half_n=st.integers(1, 5), k=st.sampled_from([32, 64]), rp=st.booleans())
def test_w4a8_scale_bias(seed, half_n, k, rp):
    """scale_bias = 8 * sum_k W_int4 * weight_scale, per 1/16 of K for row-parallel layers."""
    n = 2 * half_n
    s = omniq.get_scheme("w4a8_dynamic", row_parallel=rp)
    qw = s.quantize(_rand((n, k), seed))
    q = s.unpack(qw).numpy().astype(np.float64)
    ws = qw.tensors["weight_scale"].numpy().astype(np.float64)
    sb = qw.tensors["scale_bias"].numpy()
    if rp:
        want = 8 * q.reshape(n, 16, k // 16).sum(-1) * ws
        assert sb.shape == (n, 16)
        np.testing.assert_allclose(sb.sum(1), (8 * q.sum(1, keepdims=True) * ws)[:, 0], rtol=1e-5, atol=1e-5)
    else:
        want = 8 * q.sum(1, keepdims=True) * ws
        assert sb.shape == (n, 1)
    np.testing.assert_allclose(sb, want.astype(np.float32), rtol=1e-6, atol=1e-6)
    spec = s.tensor_specs(n, k)["scale_bias"]
    assert (spec.in_dim, spec.in_step) == ((1, k // 16) if rp else (None, 1))


@given(seed=SEEDS, half_n=st.integers(1, 5), k=st.sampled_from([32, 64]), m=st.integers(1, 3),
       legacy=st.booleans())
def test_w4a8_matmul_and_round_trip(seed, half_n, k, m, legacy):
    n = 2 * half_n
    s = omniq.get_scheme("w4a8_dynamic", version="0", group_size=32) if legacy else omniq.get_scheme("w4a8_dynamic")
    w = _rand((n, k), seed)
    qw = s.quantize(w)
    q = s.unpack(qw)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    if legacy:   # W = int4 * weight_scale_second[n, k//G] * weight_scale[n]
        sc = (qw.tensors["weight_scale"] * qw.tensors["weight_scale_second"]).repeat_interleave(32, 1)
        assert qw.tensors["weight"].shape == (n, k)
    else:
        sc = qw.tensors["weight_scale"].expand(n, k)
    torch.testing.assert_close(s.dequantize(qw), q.float() * sc, rtol=1e-6, atol=0)
    assert bool(((s.dequantize(qw) - w).abs() <= sc / 2 * (1 + 1e-5) + 1e-12).all())
    av = s.affine_view(qw)
    torch.testing.assert_close(av.codes.float() * av.scales.repeat_interleave(av.group_size, 1), q.float() * sc)
    # matmul: per-token int8 activations times the int4 weight, numpy
    x = _rand((m, k), seed + 1)
    xn = x.numpy().astype(np.float32)
    st_ = np.abs(xn).max(1, keepdims=True) / np.float32(127)
    xq = np.clip(np_rne(xn / st_), -128, 127)
    want = (xq.astype(np.float64) @ (q.numpy() * sc.numpy().astype(np.float64)).T) * st_
    np.testing.assert_allclose(s.matmul(x, qw).numpy(), want.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_w4a8_odd_n_rejected():
    s = omniq.get_scheme("w4a8_dynamic")
    with pytest.raises(OmniqError, match="N=5.*odd"):
        s.quantize(_rand((5, 32), 0))
    with pytest.raises(OmniqError, match="N=5.*odd"):
        s.tensor_specs(5, 32)
    with pytest.raises(OmniqError, match="N=5.*odd"):
        QuantizedWeight(s, (5, 32), {"weight": torch.zeros(2, 32, dtype=torch.int8),
                                     "weight_scale": torch.ones(5, 1), "weight_offset": torch.zeros(5, 1),
                                     "scale_bias": torch.zeros(5, 1)})
    # the old unpacked format has no such constraint
    omniq.get_scheme("w4a8_dynamic", version="0", group_size=32).quantize(_rand((5, 32), 0))


def test_w4a8_bad_parameters():
    with pytest.raises(OmniqError, match="version"):
        omniq.get_scheme("w4a8_dynamic", version="2.0")
    with pytest.raises(OmniqError, match="per output channel"):
        omniq.get_scheme("w4a8_dynamic", group_size=128)
    with pytest.raises(OmniqError, match="row_parallel"):
        omniq.get_scheme("w4a8_dynamic", version="0", row_parallel=True)
    with pytest.raises(OmniqError, match="multiple of group_size=256"):
        omniq.get_scheme("w4a8_dynamic", version="0").quantize(_rand((4, 128), 0))
    with pytest.raises(OmniqError, match="multiple of 16"):
        omniq.get_scheme("w4a8_dynamic", row_parallel=True).quantize(_rand((4, 40), 0))
    s = omniq.get_scheme("w4a8_dynamic", version="0", group_size=32)
    qw = s.quantize(_rand((4, 64), 0))
    bad = QuantizedWeight(s, qw.shape, {**qw.tensors, "weight_offset_second": torch.ones(4, 2)})
    with pytest.raises(OmniqError, match="weight_offset_second"):
        s.dequantize(bad)


def test_schemes_are_registered_with_aliases():
    names = omniq.list_schemes()
    for n in ("w8a8", "w8a8_dynamic", "w4a8_dynamic", "msmodelslim_w8a8", "msmodelslim_w4a8_dynamic"):
        assert n in names
    assert omniq.get_scheme("msmodelslim_w8a8_dynamic").name == "w8a8_dynamic"
    for n in ("w8a8", "w8a8_dynamic", "w4a8_dynamic"):
        assert omniq.get_scheme(n).activation_quantized
