"""fp8 scheme: storage exactly as formats.md §1.3, checked against torch's float8 dtype and
ml_dtypes (two independent E4M3 casts); activation fake-quant and matmul against a numpy
restatement of vLLM's kernels."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import omniq
from _scheme_util import activations, dims, near_ties, weights

GRANULARITIES = ("tensor", "channel", "block")
ACTIVATIONS = ("dynamic_token", "dynamic_tensor", "static_tensor", "block", None)
F32 = np.float32
TINY = np.finfo(np.float32).tiny


# ---- oracles, written from formats.md §1 -------------------------------------------------
def oracle_weight_scale(w: np.ndarray, gran: str) -> np.ndarray:
    a = np.abs(w)
    if gran == "tensor":
        amax = np.array([a.max()], F32)
    elif gran == "channel":
        amax = a.max(axis=1, keepdims=True)
    else:
        n, k = w.shape
        amax = np.zeros((math.ceil(n / 128), math.ceil(k / 128)), F32)
        for i in range(amax.shape[0]):
            for j in range(amax.shape[1]):
                amax[i, j] = a[128 * i:128 * i + 128, 128 * j:128 * j + 128].max()
    return np.maximum(amax / F32(448), F32(TINY)).astype(F32)


def expand(s: np.ndarray, gran: str, n: int, k: int) -> np.ndarray:
    if gran == "block":
        return np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]
    return s.reshape(-1, 1) if gran == "channel" else s.reshape(1, 1)


def e4m3(v: np.ndarray) -> np.ndarray:
    """Saturating RNE cast to E4M3FN through ml_dtypes, back to float32."""
    return np.clip(v, -448, 448).astype(F32).astype(ml_dtypes.float8_e4m3fn).astype(F32)


def oracle_fake_quant(x: np.ndarray, mode, input_scale=None) -> np.ndarray:
    """vLLM's activation quantization: per-token true division with a 1/(448*512) floor,
    per-tensor x*(1/s), 1x128 groups x/s with s = max(amax, 1e-10)*(1/448)."""
    x = x.astype(F32)
    if mode is None:
        return x
    if mode == "dynamic_token":
        s = np.maximum(np.abs(x).max(-1, keepdims=True) / F32(448), F32(1) / F32(448 * 512))
        return e4m3(x / s) * s
    if mode in ("dynamic_tensor", "static_tensor"):
        s = F32(input_scale) if mode == "static_tensor" else np.abs(x).max() / F32(448)
        if s == 0:
            return np.zeros_like(x)
        return e4m3(x * (F32(1) / s)) * s
    out = np.empty_like(x)
    for j in range(0, x.shape[1], 128):
        g = x[:, j:j + 128]
        s = np.maximum(np.abs(g).max(-1, keepdims=True), F32(1e-10)) * (F32(1) / F32(448))
        out[:, j:j + 128] = e4m3(g / s) * s
    return out


def oracle_dequant(qw) -> np.ndarray:
    n, k = qw.shape
    gran = qw.scheme.weight_granularity
    name = "weight_scale_inv" if gran == "block" else "weight_scale"
    codes = qw.tensors["weight"].view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).astype(F32)
    return codes * expand(qw.tensors[name].float().numpy(), gran, n, k)


def e4m3_half_step(v: np.ndarray) -> np.ndarray:
    """Half the E4M3 spacing at |v| (subnormal spacing 2^-9 below 2^-6)."""
    e = np.floor(np.log2(np.maximum(np.abs(v), 2.0 ** -6)))
    return 2.0 ** (e - 3) / 2


_E4M3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
_GRID = np.unique(np.abs(_E4M3[np.isfinite(_E4M3)]))
E4M3_TIES = (_GRID[:-1] + _GRID[1:]) / 2      # midpoints: where RNE and the division method decide


def tie_activation(mode, amax: float, seed: int):
    """x whose amax (per row and per 128-group) is `amax`, every other value at or next to an
    E4M3 rounding tie times the scale that amax gives; and that scale."""
    a = F32(amax)
    s = a * (F32(1) / F32(448)) if mode == "block" else a / F32(448)
    ties = np.concatenate([E4M3_TIES, -E4M3_TIES]) * np.float64(s)
    cands = near_ties(ties)
    cands = cands[np.abs(cands) < a]
    np.random.default_rng(seed).shuffle(cands)
    if mode == "block":
        rows = -(-len(cands) // 127)
        x = np.zeros((rows, 128), F32)
        x[:, 0] = a
        x[:, 1:].flat[:len(cands)] = cands
    else:
        x = np.concatenate([[a], cands]).astype(F32)[None]
    return x, s


def other_division(x, mode, s):
    """What the activation would be with the other division (x*(1/s) <-> x/s)."""
    if mode in ("dynamic_token", "block"):
        return e4m3(x * (F32(1) / s)) * s
    return e4m3(x / s) * s


TIE_MODES = ("dynamic_token", "dynamic_tensor", "static_tensor", "block")


def _tie_check(mode, amax, seed):
    x, s = tie_activation(mode, amax, seed)
    scheme = omniq.get_scheme("fp8", activation=mode, input_scale=float(s) if mode == "static_tensor" else None)
    qw = scheme.quantize(torch.randn(4, x.shape[1]))
    want = oracle_fake_quant(x, mode, s)
    np.testing.assert_array_equal(scheme.quantize_activation(torch.from_numpy(x), qw).numpy(), want)
    return x, s, want


@pytest.mark.parametrize("mode", TIE_MODES)
def test_activation_division_method_decides_ties_like_vllm(mode):
    """At E4M3 ties, per-token and 1x128-group quantization divide (x/s) while per-tensor and
    static multiply by 1/s; this input tells them apart (checked), and omniq matches vLLM."""
    x, s, want = _tie_check(mode, 3.7, 0)
    assert (other_division(x, mode, s) != want).any()


@pytest.mark.parametrize("mode", TIE_MODES)
@given(st.floats(1e-2, 1e3), st.integers(0, 2**16))
def test_activation_ties_match_vllm_for_any_scale(mode, amax, seed):
    _tie_check(mode, amax, seed)


schemes = st.builds(lambda g, a: omniq.get_scheme("fp8", weight_granularity=g, activation=a),
                    st.sampled_from(GRANULARITIES), st.sampled_from(ACTIVATIONS))


# ---- properties ------------------------------------------------------------------------
@given(schemes, dims(hi=200), dims(hi=300), st.data())
def test_storage_matches_torch_and_ml_dtypes_casts(scheme, n, k, data):
    """Scales are amax/448 per tensor/channel/128x128 block (edge blocks partial); the codes
    are the saturated RNE cast of W/s by torch.float8_e4m3fn and by ml_dtypes alike."""
    w = data.draw(weights(n, k, dtypes=(torch.float32, torch.bfloat16)))
    qw = scheme.quantize(w)
    gran = scheme.weight_granularity
    name = "weight_scale_inv" if gran == "block" else "weight_scale"
    wn = w.float().numpy()
    s = oracle_weight_scale(wn, gran)
    assert qw.tensors[name].dtype == torch.float32
    np.testing.assert_array_equal(qw.tensors[name].numpy().reshape(s.shape), s)
    assert qw.tensors["weight"].dtype == torch.float8_e4m3fn and qw.tensors["weight"].shape == (n, k)
    v = wn / expand(s, gran, n, k)
    by_torch = torch.from_numpy(np.clip(v, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8)
    by_ml = np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    stored = qw.tensors["weight"].view(torch.uint8)
    assert torch.equal(stored, by_torch)
    np.testing.assert_array_equal(stored.numpy(), by_ml)
    if scheme.activation == "static_tensor":
        assert qw.tensors["input_scale"].tolist() == [1.0]


@given(schemes, dims(hi=200), dims(hi=300), st.data())
def test_unpack_repacks_bit_exactly(scheme, n, k, data):
    qw = scheme.quantize(data.draw(weights(n, k)))
    codes = scheme.unpack(qw)
    assert codes.shape == (n, k) and codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) <= 255
    repacked = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(repacked.view(torch.uint8), qw.tensors["weight"].view(torch.uint8))
    # no NaN code (0x7F / 0xFF) ever: the cast saturates
    assert not bool(((codes & 0x7F) == 0x7F).any())


@given(schemes, dims(hi=200), dims(hi=300), st.data())
def test_dequantize_within_half_step_after_saturation(scheme, n, k, data):
    w = data.draw(weights(n, k)).numpy()
    qw = scheme.quantize(torch.from_numpy(w))
    gran = scheme.weight_granularity
    name = "weight_scale_inv" if gran == "block" else "weight_scale"
    s = expand(qw.tensors[name].numpy(), gran, n, k).astype(np.float64)
    deq = scheme.dequantize(qw).numpy().astype(np.float64)
    np.testing.assert_array_equal(deq, oracle_dequant(qw))
    sat = np.clip(w, -448 * s, 448 * s)
    bound = e4m3_half_step(sat / s) * s * (1 + 1e-5) + 1e-6 * np.abs(w)
    assert (np.abs(deq - sat) <= bound).all()
    # saturation itself only trims fp32 rounding of amax/s: 448*s is the amax
    assert (np.abs(sat - w) <= 1e-6 * np.abs(w) + 1e-30).all()


@given(schemes, dims(hi=120), dims(hi=300), st.data())
def test_requantizing_with_fixed_scales_is_idempotent(scheme, n, k, data):
    w = data.draw(weights(n, k))
    scales = scheme.scale(w)
    qw = scheme.pack(w, scales)
    qw2 = scheme.pack(scheme.dequantize(qw), scales)
    for t in qw.tensors:
        assert torch.equal(qw.tensors[t].view(torch.uint8), qw2.tensors[t].view(torch.uint8)), t


@pytest.mark.parametrize("mode", ACTIVATIONS)
@given(k=dims(hi=300), data=st.data())
def test_activation_fake_quant_is_vllm_kernel_math(mode, k, data):
    scheme = omniq.get_scheme("fp8", activation=mode, input_scale=0.37 if mode == "static_tensor" else None)
    qw = scheme.quantize(torch.randn(8, k))
    x = data.draw(activations(k, three_d=False, dtypes=(torch.float32,)))
    got = scheme.quantize_activation(x, qw).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, oracle_fake_quant(x.numpy(), mode, 0.37))


@given(schemes, dims(hi=70), dims(hi=300), st.data())
def test_matmul_is_fp32_product_of_fake_quant_activation_and_dequantized_weight(scheme, n, k, data):
    """2-D and 3-D x, M = 1, odd N, K off the 128 blocks, fp32/bf16/fp16 x, bias or not."""
    w = data.draw(weights(n, k))
    qw = scheme.quantize(w)
    if scheme.activation == "static_tensor":
        qw = scheme.calibrate(qw, data.draw(activations(k, dtypes=(torch.float32,))))
    x = data.draw(activations(k))
    bias = torch.randn(n) if data.draw(st.booleans()) else None
    y = scheme.matmul(x, qw, bias)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    input_scale = float(qw.tensors["input_scale"]) if scheme.activation == "static_tensor" else None
    xq = oracle_fake_quant(x.float().reshape(-1, k).numpy(), scheme.activation, input_scale)
    ref = torch.from_numpy(xq) @ torch.from_numpy(oracle_dequant(qw)).T
    if bias is not None:
        ref = ref + bias
    ref = ref.reshape(y.shape)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[x.dtype]
    torch.testing.assert_close(y.float(), ref.to(x.dtype).float(), rtol=tol,
                               atol=tol * float(ref.abs().max()) + 1e-30)


@given(dims(hi=64), dims(hi=200), st.data())
def test_static_input_scale_param_and_calibration(n, k, data):
    """quantize() stores input_scale=1.0, or the scheme's input_scale=; calibrate() sets
    amax(x)/448 from sample activations and matmul then uses it."""
    w = data.draw(weights(n, k))
    plain = omniq.get_scheme("fp8", activation="static_tensor")
    assert plain.quantize(w).tensors["input_scale"].tolist() == [1.0]
    fixed = omniq.get_scheme("fp8", activation="static_tensor", input_scale=0.125)
    assert fixed.quantize(w).tensors["input_scale"].tolist() == [0.125]
    x = data.draw(activations(k, dtypes=(torch.float32,), dists=("normal", "heavy", "uniform")))
    qw = plain.calibrate(plain.quantize(w), x)
    expect = np.maximum(np.abs(x.numpy()).max() / F32(448), F32(TINY))
    assert qw.tensors["input_scale"].dtype == torch.float32
    assert qw.tensors["input_scale"].numpy().tolist() == [expect]
    # calibrated on x itself, x never saturates: its max element is exactly representable
    xq = plain.quantize_activation(x.reshape(-1, k), qw)
    assert float((xq - x.reshape(-1, k)).abs().max()) <= float(np.abs(x.numpy()).max()) / 16
    # dynamic schemes have nothing to calibrate
    dyn = omniq.get_scheme("fp8")
    q = dyn.quantize(w)
    assert dyn.calibrate(q, x) is q


def test_per_tensor_scale_is_marked_per_tensor_and_scalar_accepted():
    """TensorSpec facts vLLM's loaders rely on, and a 0-d scale (some checkpoints) loads."""
    s = omniq.get_scheme("fp8", weight_granularity="tensor", activation="static_tensor")
    specs = s.tensor_specs(300, 260)
    assert specs["weight_scale"].per_tensor and specs["input_scale"].per_tensor
    b = omniq.get_scheme("fp8", weight_granularity="block").tensor_specs(300, 260)
    assert b["weight_scale_inv"].shape == (3, 3) and b["weight_scale_inv"].in_step == 128
    qw = s.quantize(torch.randn(4, 8))
    tensors = {**qw.tensors, "weight_scale": qw.tensors["weight_scale"].reshape(())}
    qw0 = omniq.QuantizedWeight(s, (4, 8), tensors)
    assert torch.equal(s.dequantize(qw0), s.dequantize(qw))


def test_zero_weight_and_zero_activation_give_zero():
    for g in GRANULARITIES:
        for a in ACTIVATIONS:
            s = omniq.get_scheme("fp8", weight_granularity=g, activation=a)
            qw = s.quantize(torch.zeros(3, 130))
            y = s.matmul(torch.zeros(2, 130), qw)
            assert torch.equal(y, torch.zeros(2, 3)), (g, a)
