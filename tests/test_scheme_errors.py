"""Bad input to the fp8 / int8 / gptq / awq schemes gets an OmniqError that says what is
wrong, where, and what is allowed."""
import re

import pytest
import torch
from hypothesis import given, strategies as st

import omniq
from omniq import OmniqError, QuantizedWeight

SCHEMES = {
    "fp8": {},
    "int8": {},
    "gptq": {"bits": 4, "group_size": 32},
    "awq": {"group_size": 32},
}


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(OmniqError) as e:
        omniq.get_scheme("fp9")
    msg = str(e.value)
    assert "'fp9'" in msg
    for name in ("fp8", "int8", "gptq", "awq", "auto_round", "inc"):
        assert name in msg


@pytest.mark.parametrize("name", list(SCHEMES) + ["auto_round"])
def test_unknown_parameter_lists_the_allowed_ones(name):
    with pytest.raises(OmniqError) as e:
        omniq.get_scheme(name, bitz=4)
    assert "bitz" in str(e.value) and "allowed" in str(e.value)


@pytest.mark.parametrize("name,params,allowed", [
    ("fp8", dict(weight_granularity="row"), "tensor"),
    ("fp8", dict(activation="per_token"), "dynamic_token"),
    ("fp8", dict(activation="dynamic_token", input_scale=0.5), "static_tensor"),
    ("fp8", dict(activation="static_tensor", input_scale=-1.0), "positive"),
    ("int8", dict(activation="block"), "dynamic_token"),
    ("int8", dict(act_symmetric="no"), "True"),
    ("int8", dict(activation="static_tensor", act_symmetric=False, input_zero_point=300), "-128"),
    ("int8", dict(activation="static_tensor", input_zero_point=3), "act_symmetric=False"),
    ("gptq", dict(bits=3), "[4, 8]"),
    ("gptq", dict(group_size=48), "128"),
    ("gptq", dict(checkpoint_format="gptq_v3"), "gptq_v2"),
    ("awq", dict(bits=8), "[4]"),
    ("awq", dict(group_size=256), "128"),
    ("auto_round", dict(packing_format="auto_round:mlx"), "auto_round:auto_gptq"),
    ("auto_round", dict(packing_format="auto_round:auto_awq", sym=True), "sym=False"),
])
def test_invalid_parameter_value_says_what_is_allowed(name, params, allowed):
    with pytest.raises(OmniqError) as e:
        omniq.get_scheme(name, **params)
    assert allowed in str(e.value)


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("w", [torch.randn(64), torch.randn(2, 32, 64), torch.tensor(1.0)])
def test_weight_must_be_2d(name, w):
    with pytest.raises(OmniqError, match=r"2-D .*\[N, K\]"):
        omniq.get_scheme(name, **SCHEMES[name]).quantize(w, name="blocks.0.ff")


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.uint8])
def test_weight_must_be_floating_point(name, dtype):
    w = torch.ones(32, 64, dtype=dtype)
    with pytest.raises(OmniqError, match="floating point") as e:
        omniq.get_scheme(name, **SCHEMES[name]).quantize(w, name="blocks.0.ff")
    assert "blocks.0.ff" in str(e.value) and str(dtype) in str(e.value)


@pytest.mark.parametrize("name", SCHEMES)
@given(st.lists(st.tuples(st.integers(0, 31), st.integers(0, 63), st.sampled_from([float("nan"), float("inf"),
                                                                                   float("-inf")])),
                min_size=1, max_size=6), st.data())
def test_nan_or_inf_reports_how_many_and_where(name, bad, data):
    w = torch.randn(32, 64)
    for n, k, v in bad:
        w[n, k] = v
    where = sorted({(n, k) for n, k, _ in bad})
    with pytest.raises(OmniqError) as e:
        omniq.get_scheme(name, **SCHEMES[name]).quantize(w, name="proj")
    msg = str(e.value)
    assert "'proj'" in msg and "NaN/Inf" in msg
    assert f"has {len(where)} NaN/Inf" in msg
    assert str(list(where[0])) in msg   # the first position, [n, k]


@pytest.mark.parametrize("name,params,shape,needle", [
    ("awq", dict(group_size=32), (16, 100), "K (in_features)=100 is not a multiple of group_size=32"),
    ("awq", dict(group_size=128), (16, 192), "K (in_features)=192 is not a multiple of group_size=128"),
    ("awq", dict(group_size=32), (12, 64), "N (out_features)=12 is not a multiple of 8"),
    ("gptq", dict(bits=4, group_size=32), (16, 100), "K (in_features)=100 is not a multiple of 8"),
    ("gptq", dict(bits=8, group_size=32), (16, 66), "K (in_features)=66 is not a multiple of 4"),
    ("gptq", dict(bits=4, group_size=-1), (12, 64), "N (out_features)=12 is not a multiple of 8"),
])
def test_shape_that_does_not_fit_the_format(name, params, shape, needle):
    with pytest.raises(OmniqError) as e:
        omniq.get_scheme(name, **params).quantize(torch.randn(*shape), name="attn.to_q")
    assert needle in str(e.value) and "'attn.to_q'" in str(e.value)


def test_gptq_k_off_the_group_boundary_is_fine():
    """GPTQ groups are defined by g_idx: K = 200 with G = 128 is two groups, the last partial."""
    qw = omniq.get_scheme("gptq", bits=4, group_size=128).quantize(torch.randn(16, 200))
    assert qw.tensors["scales"].shape == (2, 16) and qw.tensors["g_idx"][-1] == 1


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_weight_too_large_for_fp16_scales(name):
    w = torch.randn(16, 64)
    w[3, 5] = 1e7
    with pytest.raises(OmniqError, match="fp16") as e:
        omniq.get_scheme(name, **SCHEMES[name]).quantize(w, name="out")
    assert "'out'" in str(e.value)


def _quantized(name):
    s = omniq.get_scheme(name, **SCHEMES[name])
    return s, s.quantize(torch.randn(32, 64))


@pytest.mark.parametrize("name,tensor", [("fp8", "weight_scale"), ("int8", "weight"), ("gptq", "qzeros"),
                                         ("awq", "scales")])
def test_missing_tensor_is_named(name, tensor):
    s, qw = _quantized(name)
    tensors = {k: v for k, v in qw.tensors.items() if k != tensor}
    with pytest.raises(OmniqError) as e:
        QuantizedWeight(s, qw.shape, tensors, name="blocks.3.attn.to_k")
    msg = str(e.value)
    assert "blocks.3.attn.to_k" in msg and f"missing tensor(s) ['{tensor}']" in msg


@pytest.mark.parametrize("name,tensor,bad,expect", [
    ("fp8", "weight", torch.zeros(32, 63, dtype=torch.float8_e4m3fn), "expected (32, 64)"),
    ("fp8", "weight_scale", torch.ones(1, 32), "expected (32, 1)"),
    ("int8", "weight_scale", torch.ones(64, 1), "expected (32, 1)"),
    ("gptq", "qweight", torch.zeros(64, 32, dtype=torch.int32), "expected (8, 32)"),
    ("gptq", "g_idx", torch.zeros(32, dtype=torch.int32), "expected (64,)"),
    ("awq", "qweight", torch.zeros(64, 32, dtype=torch.int32), "expected (64, 4)"),
    ("awq", "qzeros", torch.zeros(2, 4, dtype=torch.int64), "dtype torch.int64, expected torch.int32"),
])
def test_misshapen_tensor_is_named_with_the_expected_shape(name, tensor, bad, expect):
    s, qw = _quantized(name)
    with pytest.raises(OmniqError) as e:
        QuantizedWeight(s, qw.shape, {**qw.tensors, tensor: bad}, name="layer7")
    msg = str(e.value)
    assert "layer7" in msg and repr(tensor) in msg and expect in msg


def test_wrong_dtype_says_which_dtypes_are_allowed():
    s, qw = _quantized("gptq")
    with pytest.raises(OmniqError, match=re.escape("expected torch.float16 or torch.bfloat16")):
        QuantizedWeight(s, qw.shape, {**qw.tensors, "scales": qw.tensors["scales"].float()})
    s, qw = _quantized("fp8")
    with pytest.raises(OmniqError, match="float8_e4m3fn"):
        QuantizedWeight(s, qw.shape, {**qw.tensors, "weight": qw.tensors["weight"].float()})


def test_unexpected_tensor_is_named():
    s, qw = _quantized("int8")
    with pytest.raises(OmniqError, match="unexpected tensor.*input_scale"):
        QuantizedWeight(s, qw.shape, {**qw.tensors, "input_scale": torch.ones(1)})


@pytest.mark.parametrize("name", SCHEMES)
def test_activation_with_wrong_k(name):
    s, qw = _quantized(name)
    qw.name = "ff.net.2"
    with pytest.raises(OmniqError, match=r"'ff.net.2'.*65 input features.*K=64"):
        s.matmul(torch.randn(3, 65), qw)
