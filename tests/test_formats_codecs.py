"""omniq.formats codecs (E2M1, E8M0, FP8, nibble packing) against codecs omniq did not write:
ml_dtypes (`float4_e2m1fn`, `float8_e8m0fnu`, `float8_e4m3fn`) and torch (`float8_e8m0fnu`,
`float4_e2m1fn_x2`), plus the formulas of formats.md §3.3 computed in numpy.

torch 2.13 has no conversion kernels for `float4_e2m1fn_x2` on the CPU (only views), so for
it we check storage compatibility (same bytes, K/2 per row); the nibble order is checked
against ml_dtypes here and against vLLM's `break_fp4_bytes` in test_scheme_nvfp4.py.
"""
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from _mx_util import e2m1_codes, scale_byte
from omniq.formats.e2m1 import ROUNDING_RULES, decode_e2m1, encode_e2m1
from omniq.formats.e8m0 import SCALE_RULES, decode_e8m0, encode_e8m0, shared_exponent
from omniq.formats.fp8 import saturating_cast
from omniq.formats.packing import pack_nibbles, unpack_nibbles

MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
ELEMS = {"e2m1": (2, 6.0, 1), "e4m3": (8, 448.0, 3)}

# values that exercise E2M1 rounding: ties, grid points, out of range, tiny, huge
_e2m1_inputs = st.one_of(
    st.sampled_from(MIDPOINTS + tuple(-m for m in MIDPOINTS) + (0.0, 6.0, -6.0, 7.0, 1e30, -1e-30)),
    st.floats(-8, 8, width=32),
    st.floats(width=32, allow_nan=False),
)
# positive float32 bit patterns cover every binade, subnormals and zero
_amax = st.one_of(
    st.integers(0, 0x7F7FFFFF).map(lambda b: float(np.uint32(b).view(np.float32))),
    st.builds(lambda e, m: float(np.float32(m * 2.0 ** e)), st.integers(-140, 127),
              st.sampled_from((1.0, 1.5, 1.75, 1.875, 1.9375, 1 - 2 ** -24, 1 + 2 ** -23, 6.0 / 4, 448.0 / 256))),
)


# ---- E8M0 ---------------------------------------------------------------------------------
def test_decode_e8m0_matches_ml_dtypes_and_torch_for_every_byte():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = decode_e8m0(b).numpy()
    ml = b.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    th = b.view(torch.float8_e8m0fnu).float().numpy()
    np.testing.assert_array_equal(ours, ml)
    np.testing.assert_array_equal(ours, th)
    assert np.isnan(ours[255]) and np.isfinite(ours[:255]).all()


def test_encode_e8m0_is_the_biased_exponent_and_saturates_to_nan():
    e = torch.arange(-140, 141, dtype=torch.int32)
    b = encode_e8m0(e)
    expect = np.clip(e.numpy() + 127, 0, None)
    expect = np.where(e.numpy() > 127, 255, expect)
    np.testing.assert_array_equal(b.numpy(), expect.astype(np.uint8))
    inside = (e >= -127) & (e <= 127)
    # the byte decodes (through torch's own dtype) to 2^e
    np.testing.assert_array_equal(b[inside].view(torch.float8_e8m0fnu).float().numpy(),
                                  np.exp2(e[inside].numpy().astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("elem", sorted(ELEMS))
@pytest.mark.parametrize("rule", SCALE_RULES)
@given(amax=st.lists(_amax, min_size=1, max_size=64))
def test_shared_exponent_matches_the_formula(rule, elem, amax):
    emax, emax_val, mbits = ELEMS[elem]
    a = np.array(amax, dtype=np.float32)
    ours = encode_e8m0(shared_exponent(torch.from_numpy(a), emax, emax_val, mbits, rule)).numpy()
    np.testing.assert_array_equal(ours, scale_byte(a, rule, elem))


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_shared_exponent_of_nan_or_inf_block_is_the_nan_byte(rule):
    a = torch.tensor([float("nan"), float("inf"), 1.0])
    b = encode_e8m0(shared_exponent(a, 2, 6.0, 1, rule))
    assert b.tolist()[:2] == [255, 255] and b[2] != 255


# ---- E2M1 ---------------------------------------------------------------------------------
def test_decode_e2m1_matches_ml_dtypes_for_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    ours = decode_e2m1(codes).numpy()
    ml = codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(ours, ml)
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(ml))  # code 8 is -0


@given(x=arrays(np.float32, st.integers(1, 64), elements=_e2m1_inputs))
def test_encode_e2m1_rne_matches_ml_dtypes(x):
    ml = x.astype(ml_dtypes.float4_e2m1fn)
    ours = encode_e2m1(torch.from_numpy(x), "rne")
    np.testing.assert_array_equal(decode_e2m1(ours).numpy(), ml.astype(np.float32))
    # with signed_zero the code itself is ml_dtypes' (the sign bit is kept, -0.0 included)
    signed = encode_e2m1(torch.from_numpy(x), "rne", signed_zero=True).numpy()
    np.testing.assert_array_equal(signed, ml.view(np.uint8) & 0xF)
    # without it, zero is always +0
    assert not (ours.numpy() == 8).any()


@pytest.mark.parametrize("rounding", ["rhaz", "rtz"])
@given(x=arrays(np.float32, st.integers(1, 64), elements=_e2m1_inputs))
def test_encode_e2m1_rhaz_rtz_pick_the_nearest_grid_point_with_their_tie_rule(rounding, x):
    ours = encode_e2m1(torch.from_numpy(x), rounding, signed_zero=True).numpy()
    np.testing.assert_array_equal(ours, e2m1_codes(x, rounding))


# formats.md §3.3 / §3.5 / §5: the value each rule gives at every tie point
_TIES = {
    "rne": (0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0),
    "rhaz": (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    "rtz": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
}


@pytest.mark.parametrize("rounding", ROUNDING_RULES)
def test_encode_e2m1_tie_table(rounding):
    x = torch.tensor(MIDPOINTS)
    got = decode_e2m1(encode_e2m1(x, rounding))
    assert got.tolist() == list(_TIES[rounding])
    assert decode_e2m1(encode_e2m1(-x, rounding)).tolist() == [-v for v in _TIES[rounding]]


def test_encode_e2m1_nan_is_zero_and_inf_saturates():
    got = encode_e2m1(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    assert decode_e2m1(got).tolist() == [0.0, 6.0, -6.0]


# ---- FP8 ----------------------------------------------------------------------------------
@given(x=arrays(np.float32, st.integers(1, 64),
                elements=st.one_of(st.floats(width=32, allow_nan=False), st.floats(-500, 500, width=32))))
def test_saturating_cast_matches_ml_dtypes_after_clamping(x):
    ours = saturating_cast(torch.from_numpy(x)).view(torch.uint8).numpy()
    ml = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(ours, ml)


# ---- nibble packing -----------------------------------------------------------------------
@given(b=arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 16))))
def test_packed_bytes_hold_element_2i_in_the_low_nibble(b):
    t = torch.from_numpy(b)
    vals = decode_e2m1(unpack_nibbles(t)).numpy()
    np.testing.assert_array_equal(vals[:, 0::2], (b & 0xF).view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    np.testing.assert_array_equal(vals[:, 1::2], (b >> 4).view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert torch.equal(pack_nibbles(unpack_nibbles(t)), t)
    # the same bytes are a valid torch float4_e2m1fn_x2 tensor of K/2 columns
    fp4 = pack_nibbles(unpack_nibbles(t)).view(torch.float4_e2m1fn_x2)
    assert fp4.shape == t.shape and torch.equal(fp4.view(torch.uint8), t)


@given(codes=arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 8).map(lambda h: 2 * h)),
                    elements=st.integers(0, 15)))
def test_unpack_nibbles_inverts_pack_nibbles(codes):
    t = torch.from_numpy(codes)
    assert torch.equal(unpack_nibbles(pack_nibbles(t)), t)
