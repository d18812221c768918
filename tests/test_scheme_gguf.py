"""GGUF scheme: block codecs against gguf-py 0.19.0 (the oracle), the K-quant search against
plain round-to-nearest, round trips, the reference matmul and bad input."""
import numpy as np
import pytest
import torch
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, strategies as st

import omniq
from omniq.errors import OmniqError
from omniq.formats import gguf_blocks as gb
from omniq.schemes import QuantizedWeight, get_scheme, list_schemes

ALL = list(gb.BLOCK_TYPES)
LEGACY = [t for t in ALL if not gb.BLOCK_TYPES[t].kquant]
KQUANTS = [t for t in ALL if gb.BLOCK_TYPES[t].kquant]


@pytest.fixture(autouse=True)
def _one_thread():
    # many tiny tensor ops: thread hand-offs cost more than they give on a shared CI box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def qtype(name):
    return GGMLQuantizationType[name.upper()]


def assert_same_floats(got, ref):
    """Bit-exact float32 equality; NaN only where the oracle has NaN (payloads may differ)."""
    got = np.ascontiguousarray(got.numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float32)
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    assert got.shape == ref.shape
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    g, r = np.where(nan, 0, got).view(np.int32), np.where(nan, 0, ref).view(np.int32)
    bad = np.argwhere(g != r)
    assert bad.size == 0, f"{len(bad)} mismatches, first at {bad[0]}: {got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"


# ---- generated inputs -------------------------------------------------------------------------

@st.composite
def raw_blocks(draw, name, finite=True):
    """uint8 [N, K/block*type_size]: random block bytes. finite=True draws no byte whose
    bits 2-6 are all set, so no half-float anywhere in the block can be Inf/NaN, whatever the
    field offsets are."""
    bt = gb.BLOCK_TYPES[name]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, nb = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    raw = rng.integers(0, 256, size=(n, nb * bt.type_size), dtype=np.uint8)
    if finite:
        bad = (raw & 0x7C) == 0x7C
        raw[bad] &= 0xFB
    return raw


KINDS = ("normal", "heavy", "grid", "const", "sparse", "zeros")


@st.composite
def weights(draw, name, kinds=KINDS, max_rows=5, max_blocks=3):
    """float32 [N, K] weights of one of several shapes of distribution, each block scaled by
    its own power of two (exact, so "grid" keeps its exact ties)."""
    bt = gb.BLOCK_TYPES[name]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(kinds))
    n, nb = draw(st.integers(1, max_rows)), draw(st.integers(1, max_blocks))
    shape = (n, nb, bt.block_size)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "heavy":
        x = rng.standard_t(draw(st.sampled_from([2, 3, 5])), shape)
    elif kind == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.2)
    elif kind == "zeros":   # non-negative with +0 and -0 mixed: a zero is the block's min
        x = np.abs(rng.standard_normal(shape)) * (rng.random(shape) < 0.3)
        x = np.where(x == 0, rng.choice([0.0, -0.0], size=shape), x)
    elif kind == "const":
        x = np.broadcast_to(rng.choice([0.0, 1.0, -3.0, 0.25], size=(n, nb, 1)), shape).copy()
    else:
        # half-integer multiples of the step the legacy quantizers will pick (d = 1 before the
        # power-of-two block scale), so x/d lands exactly on .5 ties
        lv = {"q8_0": 127, "q4_0": 8, "q5_0": 16, "q4_1": 15, "q5_1": 31}.get(name, 15)
        if name in ("q4_1", "q5_1"):
            x = rng.integers(0, 2 * lv + 1, shape) / 2
            x[..., 0], x[..., 1] = 0, lv
        else:
            x = rng.integers(-2 * lv, 2 * lv + 1, shape) / 2
            x[..., 0] = -lv
    x = x * 2.0 ** rng.integers(-20, 12, size=(n, nb, 1))
    return x.reshape(n, nb * bt.block_size).astype(np.float32)


# ---- dequantization: bit-exact with gguf-py ----------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_dequantize_equals_gguf_py(name, data):
    raw = data.draw(raw_blocks(name, finite=True))
    s = get_scheme("gguf", type=name)
    k = raw.shape[1] // s.block.type_size * s.block.block_size
    qw = QuantizedWeight(s, (raw.shape[0], k), {"weight": torch.from_numpy(raw)})
    assert_same_floats(s.dequantize(qw), gq.dequantize(raw, qtype(name)))


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_dequantize_any_bytes_follows_gguf_py(name, data):
    """Unfiltered bytes, Inf/NaN half floats included: same values, NaN in the same places."""
    raw = data.draw(raw_blocks(name, finite=False))
    bt = gb.BLOCK_TYPES[name]
    blocks = raw.reshape(-1, bt.type_size)
    with np.errstate(invalid="ignore", over="ignore"):   # inf*0 in gguf-py
        ref = gq.dequantize(blocks, qtype(name))
    assert_same_floats(gb.dequantize_blocks(bt, torch.from_numpy(blocks)), ref)


@pytest.mark.parametrize("name", ALL)
def test_block_facts_match_gguf(name):
    """Sizes from gguf's table; the f16 scale fields sit where BLOCK_FACTS says: zeroing them
    makes gguf-py decode the block to zeros."""
    facts = gb.BLOCK_FACTS[name]
    assert (facts["block_elems"], facts["block_bytes"]) == GGML_QUANT_SIZES[qtype(name)]
    assert facts["type_id"] == int(qtype(name))
    raw = np.random.default_rng(0).integers(0, 256, size=(8, facts["block_bytes"]), dtype=np.uint8)
    for field in ("d", "m", "dmin"):
        if field in facts["fields"]:
            off, nbytes = facts["fields"][field]
            assert nbytes == 2
            raw[:, off:off + 2] = 0
    assert np.all(gq.dequantize(raw, qtype(name)) == 0)
    spans = sorted(facts["fields"].values())
    assert sum(n for _, n in spans) == facts["block_bytes"]


# ---- quantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", LEGACY)
@given(data=st.data())
def test_legacy_quantize_bytes_equal_gguf_py(name, data):
    """q8_0 RHAZ with the fp32 d; q4_0/q5_0 trunc(x/d + n + 0.5) with the signed max;
    q4_1/q5_1 trunc((x - min)/d + 0.5): omniq writes gguf-py's bytes, ties included, and
    always decodes to gguf-py's values."""
    w = data.draw(weights(name))
    qw = get_scheme("gguf", type=name).quantize(torch.from_numpy(w))
    ref = gq.quantize(w, qtype(name))
    got = qw.tensors["weight"].numpy()
    if name in ("q4_1", "q5_1"):
        # documented difference: when a block's min (or max) is a zero and the block holds both
        # +0 and -0, omniq keeps the first zero as ggml's C loop does, gguf-py's numpy reduction
        # may return the other; only the f16 sign bit of a zero m/d can differ, values cannot
        got, ref = zero_sign_blind(got, name), zero_sign_blind(ref, name)
    assert np.array_equal(got, ref)
    assert_same_floats(gq.dequantize(qw.tensors["weight"].numpy(), qtype(name)) + 0.0,
                       gq.dequantize(gq.quantize(w, qtype(name)), qtype(name)) + 0.0)


def zero_sign_blind(raw: np.ndarray, name: str) -> np.ndarray:
    """raw blocks with the sign bit of every zero-valued f16 scale field cleared."""
    facts = gb.BLOCK_FACTS[name]
    blocks = raw.reshape(-1, facts["block_bytes"]).copy()
    for field in ("d", "m"):
        off, _ = facts["fields"][field]
        half = blocks[:, off:off + 2].copy().view(np.float16)[:, 0]
        blocks[half == 0, off + 1] &= 0x7F
    return blocks.reshape(raw.shape)


@pytest.mark.parametrize("name", ["q4_1", "q5_1"])
def test_zero_min_keeps_the_first_zero_like_ggml_c(name):
    """ggml's quantize_row_q4_1_ref scans `if (v < min) min = v`, so a zero min is the first
    zero of the block, sign included."""
    s = get_scheme("gguf", type=name)
    off = gb.BLOCK_FACTS[name]["fields"]["m"][0]
    for i, j in ((0, 1), (0, 8), (3, 8), (5, 20), (8, 0), (1, 9), (31, 16)):
        for first, sign_bit in ((0.0, 0), (-0.0, 0x80)):
            w = torch.linspace(0.5, 3.0, 32).reshape(1, 32)
            w[0, i], w[0, j] = first, -first      # position i is scanned first when i < j
            raw = s.quantize(w).tensors["weight"][0]
            expect = sign_bit if i < j else 0x80 - sign_bit
            assert raw[off] == 0 and raw[off + 1] == expect, (i, j, first)


def rtn_reference(x: np.ndarray, name: str) -> np.ndarray:
    """Plain round-to-nearest in a K-quant's format, written from formats.md with the float op
    order of ggml's quantize_row_*_ref (so ties round as there): sub-block scale amax/nmax
    (symmetric, extreme -> -nmax) or (max - min)/nmax with min <= 0, sub-block scales rounded
    against a float16 super-block scale, codes rounded to the final scales."""
    bt = gb.BLOCK_TYPES[name]
    b = x.shape[0]
    xs = x.reshape(b, -1, bt.group_size).astype(np.float32)

    def div(a, c):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(c != 0, a / np.where(c != 0, c, 1), 0).astype(np.float32)

    def signed_max(v):
        return np.take_along_axis(v, np.abs(v).argmax(-1)[..., None], -1)[..., 0]

    if bt.zero:   # q3_k, q6_k: codes (q - zero) in [-zero, zero-1]
        nmax = bt.zero
        s = signed_max(xs) / np.float32(-nmax)
        smax = {"q3_k": 31, "q6_k": 127}[name]
        ms = signed_max(s)[:, None]
        iscale = div(np.float32(-(smax + 1)), ms)              # ggml: iscale = -128/max_scale
        d = div(np.float32(1), iscale).astype(np.float16).astype(np.float32)
        sc = np.clip(np.round(iscale * s), -(smax + 1), smax)
        S = d * sc
        q = np.clip(np.round(div(xs, S[..., None])), -nmax, nmax - 1)
        return (S[..., None] * q).reshape(b, -1)
    nmax, qmax = (1 << bt.bits) - 1, (15 if name == "q2_k" else 63)
    lo = np.minimum(xs.min(-1), 0)
    s, m = (xs.max(-1) - lo) / np.float32(nmax), -lo

    def quant_scales(v):
        vm = v.max(-1, keepdims=True)
        return ((vm / np.float32(qmax)).astype(np.float16).astype(np.float32),
                np.clip(np.round(div(np.float32(qmax), vm) * v), 0, qmax))   # ggml: inv*v
    d, sc = quant_scales(s)
    dmin, mn = quant_scales(m)
    S, M = d * sc, dmin * mn
    q = np.clip(np.round(div(xs + M[..., None], S[..., None])), 0, nmax)
    return (S[..., None] * q - M[..., None]).reshape(b, -1)


def rms(a, b):
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("name", KQUANTS)
@given(data=st.data())
def test_kquant_search_error_at_most_rtn(name, data):
    """The least-squares search never loses to round-to-nearest (errors measured on gguf-py's
    decoding of omniq's bytes)."""
    w = data.draw(weights(name, kinds=("normal", "heavy", "sparse", "grid", "const"), max_rows=3, max_blocks=2))
    qw = get_scheme("gguf", type=name).quantize(torch.from_numpy(w))
    got = gq.dequantize(qw.tensors["weight"].numpy(), qtype(name))
    flat = w.reshape(-1, 256)
    base = rtn_reference(flat, name).reshape(w.shape)
    assert rms(got, w) <= rms(base, w) * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_kquant_search_beats_rtn_by_a_margin(dist, capsys):
    """On 64 super-blocks the search is clearly better than RTN for every K-quant; prints the
    table the README carries (pytest -s)."""
    rng = np.random.default_rng(1234)
    x = (rng.standard_normal((64, 256)) if dist == "normal" else rng.standard_t(3, (64, 256))).astype(np.float32)
    margin = {"normal": 0.95, "student_t3": 0.98}[dist]
    lines = []
    for name in KQUANTS:
        qw = get_scheme("gguf", type=name).quantize(torch.from_numpy(x))
        ours = rms(gq.dequantize(qw.tensors["weight"].numpy(), qtype(name)), x)
        base = rms(rtn_reference(x, name), x)
        lines.append(f"{dist:10s} {name}: rms search {ours:.5f}  rtn {base:.5f}  ratio {ours / base:.3f}")
        assert ours <= margin * base, lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("name", KQUANTS)
def test_rtn_mode_matches_reference_rtn(name):
    """search=False is the plain rounding the README compares against (same errors as the
    formats.md RTN written in this file, up to float ulps)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    bt = gb.BLOCK_TYPES[name]
    raw = gb.pack_blocks(bt, gb.quantize_blocks(bt, torch.from_numpy(x), search=False)).numpy()
    assert rms(gq.dequantize(raw, qtype(name)), x) == pytest.approx(rms(rtn_reference(x, name), x), rel=1e-3)


@pytest.mark.parametrize("name", KQUANTS)
def test_pack_with_given_scales_rounds_codes_to_nearest(name):
    """pack(w, scales without codes) re-rounds the codes against those scales: for K-quants
    that is what quantize stores; each code is the nearest level of its group."""
    s = get_scheme("gguf", type=name)
    w = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 512)).astype(np.float32))
    fields = s.scale(w)
    qw = s.pack(w, {k: v for k, v in fields.items() if k != "codes"})
    assert torch.equal(qw.tensors["weight"], s.quantize(w).tensors["weight"])
    av = s.affine_view(qw)
    g = av.group_size
    sc = av.scales.repeat_interleave(g, 1)
    off = torch.zeros_like(sc) if av.offsets is None else av.offsets.repeat_interleave(g, 1)
    levels = torch.arange(1 << av.bits, dtype=torch.float32)
    best = ((levels * sc.unsqueeze(-1) + off.unsqueeze(-1)) - w.unsqueeze(-1)).abs().amin(-1)
    mine = (av.codes.float() * sc + off - w).abs()
    assert torch.all(mine <= best + 1e-6 * w.abs().max())


def test_quantize_chunking_is_invisible():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((5, 256)).astype(np.float32))
    bt = gb.BLOCK_TYPES["q4_k"]
    a, b = gb.quantize_blocks(bt, x), gb.quantize_blocks(bt, x, chunk=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- round trips and views ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_unpack_then_encode_gives_the_bytes(name, data):
    raw = data.draw(raw_blocks(name, finite=False))
    bt = gb.BLOCK_TYPES[name]
    blocks = torch.from_numpy(raw.reshape(-1, bt.type_size))
    fields = gb.unpack_blocks(bt, blocks)
    lo, hi = (-128, 127) if bt.signed else (0, (1 << bt.bits) - 1)
    assert fields["codes"].min() >= lo and fields["codes"].max() <= hi
    assert torch.equal(gb.pack_blocks(bt, fields), blocks)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_affine_view_reproduces_gguf_py(name, data):
    """codes*scales + offsets == gguf-py's values (float32, as values: +0 vs -0 allowed), and
    the codes are the stored ones: (value - offset)/scale recovers them (exactly without an
    added min; by rounding where the min does not swamp the step)."""
    raw = data.draw(raw_blocks(name, finite=True))
    s = get_scheme("gguf", type=name)
    n, k = raw.shape[0], raw.shape[1] // s.block.type_size * s.block.block_size
    qw = QuantizedWeight(s, (n, k), {"weight": torch.from_numpy(raw)})
    av = s.affine_view(qw)
    ref = torch.from_numpy(gq.dequantize(raw, qtype(name)))
    assert av.group_size == gb.BLOCK_FACTS[name]["group_size"] and av.bits == gb.BLOCK_FACTS[name]["bits"]
    assert av.scales.dtype == torch.float32 and av.scales.shape == (n, k // av.group_size)
    sc = av.scales.repeat_interleave(av.group_size, 1)
    off = torch.zeros_like(sc) if av.offsets is None else av.offsets.repeat_interleave(av.group_size, 1)
    assert torch.equal(av.codes.float() * sc + off, ref)
    assert torch.equal(av.codes, s.unpack(qw))
    ok = (sc != 0) & (off.abs() < 2.0**20 * sc.abs())
    back = (ref - off) / torch.where(ok, sc, 1)
    if gb.BLOCK_TYPES[name].zero == 0 and av.offsets is not None:
        back = torch.round(back)
    assert torch.equal(back[ok], av.codes.float()[ok])


# ---- the reference matmul ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1", "q3_k", "q6_k"])
@given(data=st.data())
def test_matmul_equals_x_at_dequantized(name, data):
    raw = data.draw(raw_blocks(name, finite=True))
    s = get_scheme("gguf", type=name)
    n, k = raw.shape[0], raw.shape[1] // s.block.type_size * s.block.block_size
    qw = QuantizedWeight(s, (n, k), {"weight": torch.from_numpy(raw)})
    lead = data.draw(st.sampled_from([(1,), (3,), (2, 1), (2, 3)]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))).to(dtype)
    bias = torch.randn(n) if data.draw(st.booleans()) else None
    w = torch.from_numpy(gq.dequantize(raw, qtype(name))).double()
    ref = x.double() @ w.T + (0 if bias is None else bias.double())
    y = s.matmul(x, qw, bias)
    assert y.shape == (*lead, n) and y.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-30) if dtype == torch.float32 \
        else dict(rtol=1e-2, atol=1e-2 * float(ref.abs().max()) + 1e-30)
    torch.testing.assert_close(y.double(), ref, **tol)


def test_matmul_odd_n_single_row_quantized():
    s = get_scheme("gguf", type="q4_k")
    w = torch.randn(7, 512)
    qw = s.quantize(w, name="proj")
    x = torch.randn(1, 512)
    ref = x @ torch.from_numpy(gq.dequantize(qw.tensors["weight"].numpy(), qtype("q4_k"))).T
    torch.testing.assert_close(s.matmul(x, qw), ref, rtol=1e-5, atol=1e-5)


# ---- scheme facts and parameters ---------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_scheme_facts(name):
    s = get_scheme("gguf", type=name.upper())
    assert s.type == name and s.key == f"gguf(type={name})"
    assert s.k_multiple == GGML_QUANT_SIZES[qtype(name)][0]
    k = 2 * s.k_multiple
    spec = s.tensor_specs(3, k)["weight"]
    assert spec.shape == gq.quant_shape_to_byte_shape((3, k), qtype(name)) and spec.dtype == torch.uint8
    assert s.nominal_nbytes(3, k) == 3 * k * gb.BLOCK_TYPES[name].bits_per_weight / 8
    assert get_scheme("gguf", type=qtype(name)) == s == get_scheme("gguf", type=int(qtype(name)))
    assert "gguf" in list_schemes()


def test_k_multiple_is_per_instance():
    assert get_scheme("gguf", type="q8_0").k_multiple == 32
    assert get_scheme("gguf", type="q6_k").k_multiple == 256


def test_omniq_linear_runs_gguf():
    s = get_scheme("gguf", type="q5_k")
    qw = s.quantize(torch.randn(5, 256))
    x = torch.randn(2, 256)
    torch.testing.assert_close(omniq.linear(x, qw), s.matmul(x, qw), rtol=1e-4, atol=1e-4)


# ---- bad input ---------------------------------------------------------------------------------

def test_unknown_type_lists_allowed_types():
    for bad in ("q7_k", "iq2_xs", 99, True, None):
        with pytest.raises(OmniqError) as e:
            get_scheme("gguf", type=bad)
        assert "allowed" in str(e.value) and "q4_k" in str(e.value) and "q8_0" in str(e.value)


@pytest.mark.parametrize("name,k", [("q4_k", 300), ("q6_k", 128), ("q4_0", 48)])
def test_k_not_multiple_of_block_names_block_size(name, k):
    s = get_scheme("gguf", type=name)
    with pytest.raises(OmniqError, match=f"block size {s.k_multiple}") as e:
        s.quantize(torch.randn(2, k), name="blk.0.ffn_up")
    assert "blk.0.ffn_up" in str(e.value)
    with pytest.raises(OmniqError, match=f"block size {s.k_multiple}"):
        QuantizedWeight(s, (2, k), {"weight": torch.zeros(2, 10, dtype=torch.uint8)}, name="blk.0")


def test_wrong_weight_byte_width_is_named():
    s = get_scheme("gguf", type="q4_k")
    with pytest.raises(OmniqError, match=r"290 bytes per row.*2 blocks x 144 bytes = 288") as e:
        QuantizedWeight(s, (4, 512), {"weight": torch.zeros(4, 290, dtype=torch.uint8)}, name="attn_q")
    assert "attn_q" in str(e.value)
    with pytest.raises(OmniqError, match="dtype"):
        QuantizedWeight(s, (4, 512), {"weight": torch.zeros(4, 288, dtype=torch.int8)}, name="attn_q")


def test_scale_overflow_is_an_error():
    with pytest.raises(OmniqError, match="float16") as e:
        get_scheme("gguf", type="q8_0").quantize(torch.full((1, 32), 1e7), name="lm_head")
    assert "lm_head" in str(e.value)


def test_nan_weight_is_refused():
    w = torch.randn(2, 256)
    w[1, 3] = float("nan")
    with pytest.raises(OmniqError, match="NaN"):
        get_scheme("gguf", type="q2_k").quantize(w)
