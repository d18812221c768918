"""NVFP4 (ModelOpt) against independent oracles: the ModelOpt quantizer written in numpy from
formats.md §3.5 (ml_dtypes for the E4M3 cast), vLLM's own NVFP4 emulation
(`nvfp4_emulation_utils`: `break_fp4_bytes`, `dequantize_to_dtype`, `ref_nvfp4_quant_dequant`,
`run_nvfp4_emulations`), and gguf-py's NVFP4 block dequantizer.

GGUF NVFP4 and ModelOpt NVFP4 agree on the E2M1 element values and on the bits of a positive
E4M3 block scale; they differ in (1) block layout: GGUF packs 64 elements (4 scales, then 32
bytes where sub-block j holds element i<8 in the low nibble of byte 8j+i and i>=8 in the high
nibble of byte 8j+i-8) while ModelOpt pairs elements 2i/2i+1 in a [N, K/2] tensor with the
scales in a separate [N, K/16] tensor; (2) GGUF's scale is *unsigned* E4M3 (the sign bit is
ignored) and its byte 0x7F reads 0 where E4M3FN has NaN; (3) GGUF has no per-tensor
`weight_scale_2`, so the comparison holds for weight_scale_2 = 1.
"""
import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import _mx_util as U
from omniq.errors import OmniqError
from omniq.formats.packing import pack_nibbles
from omniq.schemes import QuantizedWeight, get_scheme
from vllm.model_executor.layers.quantization.utils import nvfp4_emulation_utils as vllm_fp4


seeds = st.integers(0, 2 ** 32 - 1)
odd_or_small_n = st.sampled_from((1, 2, 3, 5, 7))
BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def modelopt_nvfp4(w: np.ndarray):
    """NVFP4QTensor.quantize, dynamic path, in numpy (formats.md §3.5): -> (codes [N, K],
    block scale E4M3 bytes [N, K/16], weight_scale_2)."""
    n, k = w.shape
    ws2 = np.float32(np.abs(w).max()) / np.float32(6.0 * 448.0)
    wb = w.reshape(n, k // 16, 16)
    sblk = np.abs(wb).max(-1) / (np.float32(6.0) * ws2)
    sblk = np.where(sblk == 0, np.float32(1.0), sblk)
    sblk = np.maximum(sblk, np.float32(2.0 ** -9)).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    scaled = (wb / (sblk.astype(np.float32) * ws2)[..., None]).astype(np.float32)
    mag = np.abs(scaled)
    # _cast_fp4: ordinal = number of bounds below |x|; at the odd bounds 0.75, 1.75, 3.5 go up
    ordinal = np.searchsorted(BOUNDS, mag, side="left") + np.isin(mag, BOUNDS[[1, 3, 5]])
    codes = (ordinal + 8 * (scaled < 0)).astype(np.uint8).reshape(n, k)
    return codes, sblk.view(np.uint8), ws2


def _w(seed, n, k):
    return U.gen_weight(np.random.default_rng(seed), n, k, 16)


# ---- quantizer and storage ----------------------------------------------------------------
@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((16, 32, 48, 64)))
def test_quantize_matches_modelopt(seed, n, k):
    w = _w(seed, n, k)
    if not np.abs(w).max() > 0:
        w[0, 0] = 1.0
    qw = get_scheme("nvfp4").quantize(torch.from_numpy(w))
    codes, sbytes, ws2 = modelopt_nvfp4(w)
    np.testing.assert_array_equal(_np(qw.tensors["weight_scale"].view(torch.uint8)), sbytes)
    np.testing.assert_array_equal(_np(qw.tensors["weight_scale_2"]), np.array([ws2], np.float32))
    np.testing.assert_array_equal(_np(get_scheme("nvfp4").unpack(qw)), codes)
    assert qw.tensors["weight"].shape == (n, k // 2) and qw.tensors["weight"].dtype == torch.uint8
    assert qw.tensors["input_scale"].tolist() == [1.0]


@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((16, 32, 64)))
def test_storage_and_dequantize_match_vllm(seed, n, k):
    """vLLM's break_fp4_bytes fixes the nibble order (element 2i low) and dequantize_to_dtype
    the value: e2m1 * (float(weight_scale) * weight_scale_2)."""
    s = get_scheme("nvfp4")
    qw = s.quantize(torch.from_numpy(_w(seed, n, k)))
    packed = qw.tensors["weight"]
    codes = s.unpack(qw)
    assert torch.equal(pack_nibbles(codes), packed)
    np.testing.assert_array_equal(_np(vllm_fp4.break_fp4_bytes(packed, torch.float32)), U.e2m1_values(_np(codes)))
    ref = vllm_fp4.dequantize_to_dtype(packed, qw.tensors["weight_scale"], qw.tensors["weight_scale_2"],
                                       torch.float32, 16, swizzle=False)
    assert torch.equal(s.dequantize(qw), ref)


@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((16, 32, 64)))
def test_dequantize_within_half_a_step_and_idempotent(seed, n, k):
    s = get_scheme("nvfp4")
    w = _w(seed, n, k)
    qw = s.quantize(torch.from_numpy(w))
    dq = _np(s.dequantize(qw)).astype(np.float64)
    scale = np.repeat(U.e4m3_values(_np(qw.tensors["weight_scale"].view(torch.uint8))), 16, axis=1) * \
        float(qw.tensors["weight_scale_2"])
    a = np.minimum(np.abs(w) / scale, 6.0)
    # the block scale is E4M3-rounded, so |w|/scale may pass 6 and saturate: compare to the clamp
    assert np.all(np.abs(dq - np.sign(w) * a * scale) <= U.half_step(a, "e2m1") * scale * (1 + 2 ** -20))
    # re-quantizing with the same scales gives the same codes, up to the sign of zero (-0
    # dequantizes to -0.0, which ModelOpt's sign test x < 0 stores as +0)
    again = s.unpack(s.pack(torch.from_numpy(dq.astype(np.float32)), qw.tensors))
    plus0 = lambda c: torch.where(c == 8, torch.zeros_like(c), c)  # noqa: E731
    assert torch.equal(plus0(again), plus0(s.unpack(qw)))


def test_all_zero_weight_quantizes_to_zero():
    """ModelOpt divides 0/0 here; omniq stores weight_scale_2 = 1 and block scales 1."""
    s = get_scheme("nvfp4")
    qw = s.quantize(torch.zeros(3, 32))
    assert qw.tensors["weight_scale_2"].tolist() == [1.0]
    assert (s.dequantize(qw) == 0).all() and (qw.tensors["weight"] == 0).all()


@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((64, 128)))
def test_dequantize_matches_gguf_py_on_random_bytes(seed, n, k):
    """Any codes, any positive finite E4M3 block scale (bytes 0x00..0x7E), weight_scale_2 = 1."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    sbytes = rng.integers(0, 0x7F, size=(n, k // 16), dtype=np.uint8)
    s = get_scheme("nvfp4", activation=None)
    qw = QuantizedWeight(s, (n, k), {"weight": pack_nibbles(torch.from_numpy(codes)),
                                     "weight_scale": torch.from_numpy(sbytes).view(torch.float8_e4m3fn),
                                     "weight_scale_2": torch.ones(1)})
    ref = gguf.quants.dequantize(U.gguf_nvfp4_bytes(codes, sbytes), gguf.GGMLQuantizationType.NVFP4)
    np.testing.assert_array_equal(_np(s.dequantize(qw)), ref)


# ---- activations, matmul, calibration -----------------------------------------------------
@given(seed=seeds, m=st.sampled_from((1, 3, 8)), k=st.sampled_from((16, 48, 64)),
       log_scale=st.floats(-12, 4))
def test_quantize_activation_matches_vllm_reference(seed, m, k, log_scale):
    rng = np.random.default_rng(seed)
    s = get_scheme("nvfp4", input_scale=float(np.float32(2.0 ** log_scale)))
    qw = s.quantize(torch.randn(2, k))
    x = torch.from_numpy(U.gen_weight(rng, m, k, 16))
    gs = 1.0 / qw.tensors["input_scale"].reshape(())
    ref = vllm_fp4.ref_nvfp4_quant_dequant(x, gs, 16)
    assert torch.equal(s.quantize_activation(x, qw), ref)


@pytest.mark.parametrize("activation", ["nvfp4", None])
@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((16, 32, 64)), m=st.sampled_from((1, 4)),
       three_d=st.booleans(), with_bias=st.booleans())
def test_matmul_matches_vllm_emulation(activation, seed, n, k, m, three_d, with_bias):
    rng = np.random.default_rng(seed)
    s = get_scheme("nvfp4", activation=activation)
    qw = s.quantize(torch.from_numpy(_w(seed, n, k)))
    x = torch.from_numpy(U.gen_weight(rng, 2 * m if three_d else m, k, 16)).reshape(
        (2, m, k) if three_d else (m, k))
    if activation:
        qw = s.calibrate(qw, x)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    y = s.matmul(x, qw, bias)
    assert y.shape == x.shape[:-1] + (n,)
    w_dq = vllm_fp4.dequantize_to_dtype(qw.tensors["weight"], qw.tensors["weight_scale"],
                                        qw.tensors["weight_scale_2"], torch.float32, 16, swizzle=False)
    x2 = x.reshape(-1, k)
    if activation:
        x2 = vllm_fp4.ref_nvfp4_quant_dequant(x2, 1.0 / qw.tensors["input_scale"].reshape(()), 16)
    ref = x2.double() @ w_dq.double().T + (0 if bias is None else bias.double())
    bound = torch.from_numpy(U.matmul_bound(_np(x2), _np(w_dq))) + (0 if bias is None else bias.abs() * 2 ** -23)
    assert ((y.reshape(-1, n).double() - ref).abs() <= bound).all()


def test_calibrate_sets_input_scale_from_amax():
    s = get_scheme("nvfp4")
    qw = s.quantize(torch.randn(4, 32))
    x = torch.randn(3, 5, 32)
    x[1, 2, 3] = -1000.0
    cal = s.calibrate(qw, x)
    assert cal is not qw and cal.tensors["input_scale"].dtype == torch.float32
    assert cal.tensors["input_scale"].tolist() == [np.float32(1000.0) / np.float32(2688.0)]
    assert qw.tensors["input_scale"].tolist() == [1.0]          # the original is untouched
    assert s.calibrate(qw, torch.zeros(2, 32)) is qw            # nothing to learn from zeros
    wo = get_scheme("nvfp4", activation=None)
    qwo = wo.quantize(torch.randn(4, 32))
    assert wo.calibrate(qwo, x) is qwo and "input_scale" not in qwo.tensors


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [8, 24, 40])
def test_k_off_16_is_an_error_naming_the_block(k):
    s = get_scheme("nvfp4")
    with pytest.raises(OmniqError, match=rf"layer 'mlp\.up'.*K={k}.*block size 16"):
        s.quantize(torch.randn(2, k), name="mlp.up")
    with pytest.raises(OmniqError, match="block size 16"):
        s.tensor_specs(2, k)


def test_wrong_scale_dtype_or_shape_or_missing_input_scale_is_named():
    s = get_scheme("nvfp4")
    qw = s.quantize(torch.randn(3, 32), name="l")
    t = qw.tensors
    with pytest.raises(OmniqError, match=r"layer 'l'.*'weight_scale'.*dtype torch\.uint8.*float8_e4m3fn"):
        QuantizedWeight(s, (3, 32), dict(t, weight_scale=t["weight_scale"].view(torch.uint8)), name="l")
    with pytest.raises(OmniqError, match=r"'weight_scale'.*shape \(3, 1\)"):
        QuantizedWeight(s, (3, 32), dict(t, weight_scale=t["weight_scale"][:, :1]))
    with pytest.raises(OmniqError, match=r"'weight_scale_2'.*shape \(2,\)"):
        QuantizedWeight(s, (3, 32), dict(t, weight_scale_2=torch.ones(2)))
    no_in = {k: v for k, v in t.items() if k != "input_scale"}
    with pytest.raises(OmniqError, match="input_scale"):
        QuantizedWeight(s, (3, 32), no_in)
    QuantizedWeight(get_scheme("nvfp4", activation=None), (3, 32), no_in)  # weight-only: optional
    # a scalar (shape ()) per-tensor scale, as ModelOpt exports it, is accepted
    QuantizedWeight(s, (3, 32), dict(t, weight_scale_2=t["weight_scale_2"].reshape(())))
    with pytest.raises(OmniqError, match="input_scale"):
        s.quantize_activation(torch.randn(2, 32), QuantizedWeight(s, (3, 32), dict(t, input_scale=torch.zeros(1))))


@pytest.mark.parametrize("kw", [{"input_scale": 0.0}, {"input_scale": float("inf")}, {"activation": "mxfp4"},
                                {"group_size": 32}])
def test_bad_parameters_are_rejected(kw):
    with pytest.raises(OmniqError, match=next(iter(kw))):
        get_scheme("nvfp4", **kw)


def test_nan_block_scale_makes_its_block_nan():
    s = get_scheme("nvfp4")
    qw = s.quantize(torch.randn(2, 32))
    sc = qw.tensors["weight_scale"].clone()
    sc.view(torch.uint8)[0, 1] = 0x7F  # E4M3FN NaN
    dq = s.dequantize(QuantizedWeight(s, (2, 32), dict(qw.tensors, weight_scale=sc)))
    assert torch.isnan(dq[0, 16:]).all() and torch.isnan(dq).sum() == 16


def test_tensor_specs_describe_the_storage_and_its_sharding():
    s = get_scheme("nvfp4")
    qw = s.quantize(torch.randn(3, 64))
    specs = s.tensor_specs(3, 64)
    assert set(specs) == set(qw.tensors)
    for t, spec in specs.items():
        assert tuple(qw.tensors[t].shape) == spec.shape and qw.tensors[t].dtype == spec.dtype
    assert specs["weight"].in_step == 2 and specs["weight_scale"].in_step == 16
    assert specs["weight_scale_2"].per_tensor and specs["input_scale"].per_tensor
    assert s.nominal_nbytes(3, 64) == qw.nbytes
    alt = dict(qw.tensors, weight=qw.tensors["weight"].view(torch.float4_e2m1fn_x2))
    assert torch.equal(s.dequantize(QuantizedWeight(s, (3, 64), alt)), s.dequantize(qw))
