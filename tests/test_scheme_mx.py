"""MXFP8, MXFP4 and mxfp4_dualscale schemes against the numpy oracles of _mx_util (written
from formats.md §3 with ml_dtypes codecs) and against gguf-py's MXFP4 blocks.

GGUF MXFP4 (gguf-py `quants.MXFP4`) and omniq's `mxfp4` agree on the element values and the
E8M0 byte; they differ in (1) nibble order: GGUF splits a 32-block in halves (element j<16 in
the low nibble of qs[j], j>=16 in the high nibble of qs[j-16]), omniq pairs 2i/2i+1; (2) the
NaN byte 0xFF, which GGUF decodes as the finite 2^127; (3) gguf-py's quantizer rounds ties
toward zero (omniq's rounding="rtz"), stores zero as +0, and takes floor(log2 amax) in
float32, which rounds amax just below a power of two up to it.
"""
import gguf
import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import _mx_util as U
from omniq.errors import OmniqError
from omniq.formats.packing import pack_nibbles
from omniq.schemes import QuantizedWeight, get_scheme
from omniq.formats.e2m1 import decode_e2m1

RULES = ("floor", "even", "ceil", "rceil")
ROUNDINGS = ("rne", "rhaz", "rtz")

seeds = st.integers(0, 2 ** 32 - 1)
odd_or_small_n = st.sampled_from((1, 2, 3, 5, 7))


def _w(seed, n, k, block=32):
    return U.gen_weight(np.random.default_rng(seed), n, k, block)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _check_matmul(y: torch.Tensor, xq: np.ndarray, w: np.ndarray, bias: np.ndarray | None):
    """y (from omniq, fp32) against the exact product of the oracle's operands."""
    x2 = xq.reshape(-1, xq.shape[-1]).astype(np.float64)
    ref = x2 @ w.astype(np.float64).T
    if bias is not None:
        ref = ref + bias
    got = _np(y).reshape(ref.shape).astype(np.float64)
    bound = U.matmul_bound(x2, w) + (0 if bias is None else np.abs(bias) * 2.0 ** -23)
    assert np.all(np.abs(got - ref) <= bound), float(np.max(np.abs(got - ref) - bound))


# ---- MXFP8 --------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@given(seed=seeds, n=odd_or_small_n, k=st.integers(1, 100))
def test_mxfp8_quantize_matches_oracle(rule, seed, n, k):
    """Scale bytes follow the rule's formula; elements are RNE E4M3 of w / 2^E, saturated; K off
    32 gives a partial last block (ceil(K/32) scales)."""
    w = _w(seed, n, k)
    qw = get_scheme("mxfp8", scale_rule=rule).quantize(torch.from_numpy(w))
    q, b = U.mx_quant(w, "e4m3", rule, "rne")
    np.testing.assert_array_equal(_np(qw.tensors["weight_scale"]), b)
    np.testing.assert_array_equal(_np(qw.tensors["weight"].float()), q)
    assert qw.tensors["weight_scale"].shape == (n, -(-k // 32))


@pytest.mark.parametrize("rule", RULES)
@given(seed=seeds, n=odd_or_small_n, k=st.integers(1, 100))
def test_mxfp8_round_trip_and_error_bound(rule, seed, n, k):
    s = get_scheme("mxfp8", scale_rule=rule)
    w = _w(seed, n, k)
    qw = s.quantize(torch.from_numpy(w))
    codes = s.unpack(qw)
    assert codes.dtype == torch.uint8 and codes.shape == (n, k)
    assert torch.equal(codes.view(torch.float8_e4m3fn).view(torch.uint8), qw.tensors["weight"].view(torch.uint8))
    dq = _np(s.dequantize(qw))
    np.testing.assert_array_equal(dq, U.mx_dequant(_np(qw.tensors["weight"].float()),
                                                   _np(qw.tensors["weight_scale"]), "e4m3"))
    scale = np.repeat(U.e8m0_values(_np(qw.tensors["weight_scale"])), 32, axis=1)[:, :k].astype(np.float64)
    a = np.minimum(np.abs(w) / scale, 448.0)
    assert np.all(np.abs(dq - np.sign(w) * a * scale) <= U.half_step(a, "e4m3") * scale)
    # quantizing the dequantized weight with the same scales reproduces the storage
    again = s.pack(torch.from_numpy(dq), {"weight_scale": qw.tensors["weight_scale"]})
    assert torch.equal(again.tensors["weight"].view(torch.uint8), qw.tensors["weight"].view(torch.uint8))


@pytest.mark.parametrize("activation", ["mxfp8", None])
@given(seed=seeds, n=odd_or_small_n, k=st.integers(1, 80), m=st.sampled_from((1, 3)), three_d=st.booleans(),
       with_bias=st.booleans())
def test_mxfp8_matmul(activation, seed, n, k, m, three_d, with_bias):
    rng = np.random.default_rng(seed)
    s = get_scheme("mxfp8", activation=activation)
    w = _w(seed, n, k)
    qw = s.quantize(torch.from_numpy(w))
    x = U.gen_weight(rng, 2 * m if three_d else m, k).reshape((2, m, k) if three_d else (m, k))
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    y = s.matmul(torch.from_numpy(x), qw, None if bias is None else torch.from_numpy(bias))
    assert y.shape == x.shape[:-1] + (n,) and y.dtype == torch.float32
    xq = U.mx_fake_quant(x, "e4m3", "floor", "rne") if activation else x
    wdq = U.mx_dequant(_np(qw.tensors["weight"].float()), _np(qw.tensors["weight_scale"]), "e4m3")
    _check_matmul(y, xq, wdq, bias)


# ---- MXFP4 --------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("rule", RULES)
@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((32, 64, 96)))
def test_mxfp4_quantize_matches_oracle(rule, rounding, seed, n, k):
    w = _w(seed, n, k)
    s = get_scheme("mxfp4", scale_rule=rule, rounding=rounding)
    qw = s.quantize(torch.from_numpy(w))
    q, b = U.mx_quant(w, "e2m1", rule, rounding)
    np.testing.assert_array_equal(_np(qw.tensors["weight_scale"]), b)
    np.testing.assert_array_equal(_np(s.unpack(qw)), q)
    assert qw.tensors["weight"].shape == (n, k // 2) and qw.tensors["weight"].dtype == torch.uint8


@pytest.mark.parametrize("storage", ["packed", "e4m3"])
@pytest.mark.parametrize("rule", RULES)
@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((32, 64, 96)), rounding=st.sampled_from(ROUNDINGS))
def test_mxfp4_round_trip_and_error_bound(storage, rule, seed, n, k, rounding):
    s = get_scheme("mxfp4", scale_rule=rule, rounding=rounding, weight_storage=storage)
    w = _w(seed, n, k)
    qw = s.quantize(torch.from_numpy(w))
    codes = s.unpack(qw)
    assert codes.dtype == torch.uint8 and codes.shape == (n, k) and int(codes.max()) <= 15
    stored = qw.tensors["weight"]
    if storage == "packed":
        assert torch.equal(pack_nibbles(codes), stored)
    else:
        assert stored.dtype == torch.float8_e4m3fn and stored.shape == (n, k)
        assert torch.equal(decode_e2m1(codes).to(torch.float8_e4m3fn).view(torch.uint8), stored.view(torch.uint8))
    dq = _np(s.dequantize(qw))
    np.testing.assert_array_equal(dq, U.mx_dequant(_np(codes), _np(qw.tensors["weight_scale"]), "e2m1"))
    scale = np.repeat(U.e8m0_values(_np(qw.tensors["weight_scale"])), 32, axis=1).astype(np.float64)
    a = np.minimum(np.abs(w) / scale, 6.0)
    assert np.all(np.abs(dq - np.sign(w) * a * scale) <= U.half_step(a, "e2m1") * scale)
    again = s.pack(torch.from_numpy(dq), {"weight_scale": qw.tensors["weight_scale"]})
    assert torch.equal(again.tensors["weight"].view(torch.uint8), stored.view(torch.uint8))


@pytest.mark.parametrize("activation", ["mxfp4", "mxfp8", None])
@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((32, 64)), m=st.sampled_from((1, 4)),
       three_d=st.booleans(), act_rounding=st.sampled_from(ROUNDINGS), rule=st.sampled_from(RULES))
def test_mxfp4_matmul(activation, seed, n, k, m, three_d, act_rounding, rule):
    """W4A4 / W4A8 / W4A16: activations quantized per 32 along K with the scheme's rules."""
    rng = np.random.default_rng(seed)
    s = get_scheme("mxfp4", activation=activation, act_rounding=act_rounding, scale_rule=rule)
    qw = s.quantize(torch.from_numpy(_w(seed, n, k)))
    x = U.gen_weight(rng, 2 * m if three_d else m, k).reshape((2, m, k) if three_d else (m, k))
    y = s.matmul(torch.from_numpy(x), qw)
    xq = {"mxfp4": lambda: U.mx_fake_quant(x, "e2m1", rule, act_rounding),
          "mxfp8": lambda: U.mx_fake_quant(x, "e4m3", rule, "rne"),
          None: lambda: x}[activation]()
    wdq = U.mx_dequant(_np(s.unpack(qw)), _np(qw.tensors["weight_scale"]), "e2m1")
    _check_matmul(y, xq, wdq, None)


@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((32, 64, 128)))
def test_mxfp4_dequantize_matches_gguf_py_on_random_bytes(seed, n, k):
    """Any codes and any E8M0 byte but 0xFF: omniq == gguf.quants.dequantize(MXFP4) exactly."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scale = rng.integers(0, 255, size=(n, k // 32), dtype=np.uint8)  # 0..254
    s = get_scheme("mxfp4")
    qw = QuantizedWeight(s, (n, k), {"weight": pack_nibbles(torch.from_numpy(codes)),
                                     "weight_scale": torch.from_numpy(scale)})
    with np.errstate(over="ignore"):  # 6 * 2^127 is Inf in both
        ref = gguf.quants.dequantize(U.gguf_mxfp4_bytes(codes, scale), gguf.GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(_np(s.dequantize(qw)), ref)


@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((32, 64, 128)))
def test_mxfp4_rtz_floor_quantizer_matches_gguf_py(seed, n, k):
    """gguf-py's MXFP4 quantizer is OCP FLOOR with ties toward zero: omniq rounding="rtz" gives
    the same scale bytes and element values (gguf stores -0 as +0: compared as values)."""
    w = _w(seed, n, k)
    amax = np.abs(w.reshape(n, k // 32, 32)).max(-1)
    with np.errstate(divide="ignore"):
        # gguf-py takes log2 in float32; skip blocks where that differs from the exact floor
        exact = np.floor(np.log2(amax.astype(np.float64)))
        f32 = np.floor(np.log2(amax))
    assume(np.all((amax == 0) | ((exact == f32) & (exact > -125) & (exact < 126))))
    g = gguf.quants.quantize(w, gguf.GGMLQuantizationType.MXFP4).reshape(n, k // 32, 17)
    s = get_scheme("mxfp4", rounding="rtz")
    qw = s.quantize(torch.from_numpy(w))
    np.testing.assert_array_equal(_np(qw.tensors["weight_scale"]).reshape(n, k // 32), g[..., 0])
    qs = g[..., 1:]
    g_codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(n, k)
    np.testing.assert_array_equal(U.e2m1_values(_np(s.unpack(qw))), U.e2m1_values(g_codes))


# ---- mxfp4_dualscale ----------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ROUNDINGS)
@given(seed=seeds, n=odd_or_small_n, k=st.sampled_from((512, 1024)))
def test_dualscale_quantize_matches_oracle(rounding, seed, n, k):
    """coarse = amax512/6, fine = FLOOR E8M0 of w/coarse per 32, elements per `rounding`."""
    w = _w(seed, n, k)
    s = get_scheme("mxfp4_dualscale", rounding=rounding)
    qw = s.quantize(torch.from_numpy(w))
    q, fine, l0 = U.dual_quant(w, rounding)
    np.testing.assert_array_equal(_np(qw.tensors["weight_dual_scale"]), l0.reshape(n, k // 512, 1))
    np.testing.assert_array_equal(_np(qw.tensors["weight_scale"]), fine)
    np.testing.assert_array_equal(_np(s.unpack(qw)), q)
    np.testing.assert_array_equal(_np(qw.tensors["mul_scale"]), np.ones(k, np.float32))
    dq = _np(s.dequantize(qw))
    np.testing.assert_array_equal(dq, U.dual_dequant(q, fine, l0))


@pytest.mark.parametrize("storage", ["packed", "e4m3"])
@given(seed=seeds, n=odd_or_small_n)
def test_dualscale_both_storages_round_trip(storage, seed, n):
    k = 512
    w = torch.from_numpy(_w(seed, n, k))
    s = get_scheme("mxfp4_dualscale", weight_storage=storage)
    qw = s.quantize(w)
    codes = s.unpack(qw)
    other = get_scheme("mxfp4_dualscale", weight_storage="e4m3" if storage == "packed" else "packed")
    qo = other.quantize(w)
    assert torch.equal(other.unpack(qo), codes)
    # each scheme reads the other's storage (and bf16 numeric FP4, as vLLM-Omni loads it)
    assert torch.equal(s.dequantize(qo), s.dequantize(qw))
    assert torch.equal(other.dequantize(qw), s.dequantize(qw))
    numeric = dict(qw.tensors, weight=decode_e2m1(codes).to(torch.bfloat16))
    assert torch.equal(s.dequantize(QuantizedWeight(s, (n, k), numeric)), s.dequantize(qw))
    if storage == "packed":
        assert torch.equal(pack_nibbles(codes), qw.tensors["weight"])
    else:
        assert torch.equal(decode_e2m1(codes).to(torch.float8_e4m3fn).view(torch.uint8),
                           qw.tensors["weight"].view(torch.uint8))


@pytest.mark.parametrize("activation", ["mxfp4_dualscale", None])
@given(seed=seeds, n=odd_or_small_n, m=st.sampled_from((1, 3)), three_d=st.booleans(), smooth=st.booleans(),
       act_rounding=st.sampled_from(ROUNDINGS))
def test_dualscale_matmul_with_smoothing(activation, seed, n, m, three_d, smooth, act_rounding):
    """y = dualquant(x * mul_scale) @ W_stored^T, and W_stored = quantize(w / mul_scale)."""
    k = 1024
    rng = np.random.default_rng(seed)
    w = _w(seed, n, k)
    mul = np.exp2(rng.integers(-3, 4, size=k) + rng.random(k)).astype(np.float32) if smooth else None
    s = get_scheme("mxfp4_dualscale", activation=activation, act_rounding=act_rounding)
    qw = s.quantize(torch.from_numpy(w), mul_scale=None if mul is None else torch.from_numpy(mul))
    mul_ = np.ones(k, np.float32) if mul is None else mul
    np.testing.assert_array_equal(_np(qw.tensors["mul_scale"]), mul_)
    q, fine, l0 = U.dual_quant((w / mul_).astype(np.float32), "rne")
    np.testing.assert_array_equal(_np(s.unpack(qw)), q)
    x = U.gen_weight(rng, 2 * m if three_d else m, k).reshape((2, m, k) if three_d else (m, k))
    y = s.matmul(torch.from_numpy(x), qw)
    xs = (x * mul_).astype(np.float32)
    xq = U.dual_fake_quant(xs, act_rounding) if activation else xs
    _check_matmul(y, xq, U.dual_dequant(q, fine, l0), None)


def test_dualscale_numeric_storage_rejects_values_off_the_e2m1_grid():
    s = get_scheme("mxfp4_dualscale", weight_storage="e4m3")
    qw = s.quantize(torch.randn(2, 512), name="blocks.0.attn.qkv")
    bad = qw.tensors["weight"].clone()
    bad[1, 7] = 0.75  # E4M3 can hold it, E2M1 cannot
    qb = QuantizedWeight(s, (2, 512), dict(qw.tensors, weight=bad), name="blocks.0.attn.qkv")
    with pytest.raises(OmniqError, match=r"blocks\.0\.attn\.qkv.*'weight'.*\[1, 7\]"):
        s.dequantize(qb)


def test_dualscale_rejects_bad_mul_scale():
    s = get_scheme("mxfp4_dualscale")
    with pytest.raises(OmniqError, match="mul_scale"):
        s.quantize(torch.randn(2, 512), mul_scale=torch.zeros(512))
    with pytest.raises(OmniqError, match=r"mul_scale.*\(512,\)"):
        s.quantize(torch.randn(2, 512), mul_scale=torch.ones(511))


# ---- format rules and bad input, all MX schemes -------------------------------------------
def _some(name, **kw):
    s = get_scheme(name, **kw)
    k = {"mxfp8": 64, "mxfp4": 64, "mxfp4_dualscale": 1024}[name]
    return s, s.quantize(torch.randn(3, k), name="layer.x"), k


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "mxfp4_dualscale"])
def test_e8m0_nan_byte_makes_its_block_nan(name):
    s, qw, k = _some(name)
    sc = qw.tensors["weight_scale"].clone()
    sc[1, 1] = 0xFF
    dq = s.dequantize(QuantizedWeight(s, (3, k), dict(qw.tensors, weight_scale=sc)))
    nan = torch.isnan(dq)
    assert nan[1, 32:64].all() and nan.sum() == 32


@pytest.mark.parametrize("name,kw", [("mxfp8", {}), ("mxfp4", {}), ("mxfp4", {"activation": "mxfp8"}),
                                     ("mxfp4_dualscale", {})])
def test_activation_block_with_inf_or_nan_is_nan(name, kw):
    """OCP: a block holding NaN/Inf gets the NaN scale, so the whole block reads NaN."""
    s, qw, k = _some(name, **kw)
    x = torch.randn(2, k)
    x[0, 5] = float("inf")
    x[1, k - 1] = float("nan")
    xq = s.quantize_activation(x, qw)
    blk = 512 if name == "mxfp4_dualscale" else 32
    assert torch.isnan(xq[0, :32]).all() and torch.isnan(xq[1, k - 32:]).all()
    assert not torch.isnan(xq[0, blk:]).any() and not torch.isnan(xq[1, :k - blk]).any()


@pytest.mark.parametrize("name,k,block", [("mxfp4", 48, 32), ("mxfp4", 80, 32), ("mxfp4_dualscale", 544, 512),
                                          ("mxfp4_dualscale", 256, 512)])
def test_k_off_the_block_is_an_error_naming_the_block(name, k, block):
    s = get_scheme(name)
    with pytest.raises(OmniqError, match=rf"layer 'l1'.*K={k}.*block size {block}"):
        s.quantize(torch.randn(2, k), name="l1")
    good = s.quantize(torch.randn(2, block))
    with pytest.raises(OmniqError, match=rf"layer 'l1'.*K={k}.*block size {block}"):
        QuantizedWeight(s, (2, k), good.tensors, name="l1")


def test_mxfp8_accepts_any_k_with_a_partial_last_block():
    s = get_scheme("mxfp8")
    qw = s.quantize(torch.randn(2, 33))
    assert qw.tensors["weight_scale"].shape == (2, 2)
    assert s.tensor_specs(2, 33)["weight_scale"].shape == (2, 2)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "mxfp4_dualscale"])
def test_wrong_scale_dtype_or_shape_is_named(name):
    s, qw, k = _some(name)
    with pytest.raises(OmniqError, match=r"layer 'layer\.x'.*'weight_scale'.*dtype torch\.float32"):
        QuantizedWeight(s, (3, k), dict(qw.tensors, weight_scale=qw.tensors["weight_scale"].float()),
                        name="layer.x")
    with pytest.raises(OmniqError, match=r"'weight_scale'.*shape \(3, 1\)"):
        QuantizedWeight(s, (3, k), dict(qw.tensors, weight_scale=qw.tensors["weight_scale"][:, :1]))
    if name == "mxfp4_dualscale":
        with pytest.raises(OmniqError, match=r"'weight_dual_scale'.*shape"):
            QuantizedWeight(s, (3, k), dict(qw.tensors, weight_dual_scale=qw.tensors["weight_dual_scale"][..., 0]))


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "mxfp4_dualscale"])
def test_torch_e8m0_and_fp4x2_dtypes_are_read_as_the_same_bytes(name):
    s, qw, k = _some(name)
    alt = dict(qw.tensors, weight_scale=qw.tensors["weight_scale"].view(torch.float8_e8m0fnu))
    if qw.tensors["weight"].dtype == torch.uint8:
        alt["weight"] = qw.tensors["weight"].view(torch.float4_e2m1fn_x2)
    assert torch.equal(s.dequantize(QuantizedWeight(s, (3, k), alt)), s.dequantize(qw))


@pytest.mark.parametrize("name,kw", [("mxfp8", {"scale_rule": "round"}), ("mxfp4", {"rounding": "nearest"}),
                                     ("mxfp4", {"activation": "nvfp4"}), ("mxfp4_dualscale", {"activation": "mxfp8"}),
                                     ("mxfp4", {"group_size": 16})])
def test_bad_parameters_are_rejected(name, kw):
    with pytest.raises(OmniqError, match=next(iter(kw))):
        get_scheme(name, **kw)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "mxfp4_dualscale"])
def test_tensor_specs_describe_the_storage_and_its_sharding(name):
    s, qw, k = _some(name)
    specs = s.tensor_specs(3, k)
    assert set(specs) == set(qw.tensors)
    for t, spec in specs.items():
        assert tuple(qw.tensors[t].shape) == spec.shape and qw.tensors[t].dtype == spec.dtype
    assert specs["weight_scale"].in_dim == 1 and specs["weight_scale"].in_step == 32
    assert specs["weight"].out_dim == 0
    assert specs["weight"].in_step == (1 if name == "mxfp8" else 2)
    if name == "mxfp4_dualscale":
        assert specs["weight_dual_scale"].in_step == 512 and specs["mul_scale"].in_dim == 0
    assert s.nominal_nbytes(3, k) == qw.nbytes
