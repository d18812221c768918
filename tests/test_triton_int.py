"""The Triton integer and W8A8 kernels under Triton's interpreter (conftest sets TRITON_INTERPRET=1
when there is no GPU): every kernel, forced, against scheme.matmul on generated shapes, values
and dtypes; the fused activation quantizer against each scheme's quantize_activation, bit for
bit, rounding ties included; the prepared layout against scheme.dequantize; and the rule that
interpreted Triton is never chosen on its own."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.errors import KernelError
from omniq.kernels import triton_affine as affine
from omniq.kernels import triton_w8a8 as w8a8
from omniq.kernels._common import next_pow2

from _int_util import (HALF_ULP, activations, affine_cases, assert_within, error_bound, fake_from_kernel,
                       quantized, tie_rows, w8a8_cases)
from _scheme_util import make_tensor

pytestmark = pytest.mark.skipif(not affine.interpreting(),
                                reason="runs under the Triton interpreter (no GPU here); on a GPU the same "
                                       "kernels are compiled by tests/test_gpu_int.py")

CPU = torch.device("cpu")
AFFINE_KERNELS = {"triton.affine.gemv": affine.GEMV_MAX_M, "triton.affine.splitk": 40, "triton.affine.gemm": 40,
                  "triton.affine.dequant_mm": 40}
W8A8_KERNELS = {"triton.w8a8.splitk": 40, "triton.w8a8.gemm": 40}


def _bias(draw, n: int):
    if draw(st.booleans()):
        return None
    return make_tensor((n,), "normal", draw(st.integers(0, 2**31 - 1))).to(draw(st.sampled_from(
        (torch.float32, torch.bfloat16))))


def _run_forced(kernel: str, qw, x, bias):
    with omniq.use_kernel(kernel):
        p = omniq.prepare(qw, CPU, x.dtype)
        assert p.kernel_for(x.reshape(-1, x.shape[-1]).shape[0], x.dtype).name == kernel
        return omniq.linear(x, p, bias)


# ---- grouped integer weight-only (and W4A8) ------------------------------------------------------
@pytest.mark.parametrize("kernel", list(AFFINE_KERNELS))
@settings(max_examples=10)
@given(data=st.data())
def test_affine_kernel_matches_scheme_matmul(kernel, data):
    sch, n, k = data.draw(affine_cases())
    if kernel in ("triton.affine.gemv", "triton.affine.dequant_mm") and sch.name == "w4a8_dynamic":
        return  # W4A8 runs on the tensor-core kernels (the others reject it, tested below)
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    x = data.draw(activations(k, AFFINE_KERNELS[kernel]))
    if kernel == "triton.affine.dequant_mm":
        x = x.reshape(-1, k).repeat(-(-affine.DEQUANT_MM_MIN_M // x.reshape(-1, k).shape[0]), 1)
    bias = _bias(data.draw, n)
    y = _run_forced(kernel, qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    # dequant_mm hands torch a weight rounded to x's dtype: half an ulp per weight
    dot_rel = HALF_ULP[x.dtype] if kernel.endswith("dequant_mm") else 0.0
    assert_within(y, ref, error_bound(x, qw, ref, bias, dot_rel), f"{kernel} {sch.key} N={n} K={k} x={tuple(x.shape)}")


@pytest.mark.parametrize("kernel", ["triton.affine.gemv", "triton.affine.gemm", "triton.affine.dequant_mm"])
@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(2, 4), m=st.integers(1, 4),
       dtype=st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
def test_irregular_g_idx_takes_the_gather_path(kernel, seed, groups, m, dtype):
    # a g_idx that no sorting turns into equal groups (group sizes differ): per-element scales
    sch = omniq.get_scheme("gptq", bits=4, group_size=32, desc_act=True, sym=False)
    n, k = 16, 32 * groups
    g = torch.Generator().manual_seed(seed)
    w = make_tensor((n, k), "normal", seed) * 0.1
    base = sch.quantize(w)
    sizes = torch.full((groups,), 32)
    sizes[0] += 8
    sizes[-1] -= 8
    g_idx = torch.repeat_interleave(torch.arange(groups, dtype=torch.int32), sizes)
    g_idx = g_idx[torch.randperm(k, generator=g)].contiguous()
    qw = sch.pack_codes(sch.unpack(base), sch.zero_points(base), base.tensors["scales"], g_idx)
    p = affine.prepare_affine(qw, CPU)
    assert p.g_idx is not None and p.perm is None
    if kernel.endswith("dequant_mm"):
        m = affine.DEQUANT_MM_MIN_M
    x = make_tensor((m, k), "normal", seed + 1).to(dtype)
    y = _run_forced(kernel, qw, x, None)
    ref = sch.matmul(x, qw)
    # per-element scales round the weight to the dot dtype (the interpreter dots bf16 in fp32);
    # dequant_mm rounds it to x's dtype and multiplies in torch (bf16 / fp16 accumulation order)
    dot = torch.float32 if dtype == torch.bfloat16 and not kernel.endswith("dequant_mm") else dtype
    assert_within(y, ref, error_bound(x, qw, ref, None, 0.0 if kernel.endswith("gemv") else HALF_ULP[dot]),
                  f"{kernel} irregular g_idx")


@settings(max_examples=15)
@given(case=affine_cases(small_n=False), seed=st.integers(0, 2**31 - 1))
def test_affine_layout_holds_exactly_the_scheme_weight(case, seed):
    sch, n, k = case
    qw = quantized(sch, n, k, seed)
    p = affine.prepare_affine(qw, CPU)
    torch.testing.assert_close(affine.dequantize_prepared(p), sch.dequantize(qw), rtol=1e-6, atol=1e-7)
    if sch.name in ("gptq", "awq") and not getattr(sch, "sym", False):
        assert p.zmode == 1 and p.zeros.dtype == torch.uint8  # integer zero points stay one byte
    if getattr(sch, "desc_act", False) and sch.group(k) < k:
        assert p.perm is not None and p.g_idx is None      # act-order sorted once, not gathered per element


# ---- fp8 / int8 W8A8 and msModelSlim W8A8 ----------------------------------------------------------
@pytest.mark.parametrize("kernel", list(W8A8_KERNELS))
@settings(max_examples=12)
@given(data=st.data())
def test_w8a8_kernel_matches_scheme_matmul(kernel, data):
    sch, n, k = data.draw(w8a8_cases())
    x = data.draw(activations(k, W8A8_KERNELS[kernel]))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)), x_sample=x)
    bias = _bias(data.draw, n)
    y = _run_forced(kernel, qw, x, bias)
    ref = sch.matmul(x, qw, bias)
    # 8-bit weights are exact in fp16 / bf16 dot operands: no weight rounding term
    assert_within(y, ref, error_bound(x, qw, ref, bias), f"{kernel} {sch.key} N={n} K={k} x={tuple(x.shape)}")


# ---- the fused activation quantizer, bit for bit ----------------------------------------------------
QUANT_SCHEMES = [
    ("fp8", dict()), ("fp8", dict(activation="dynamic_tensor")),
    ("fp8", dict(activation="static_tensor", input_scale=0.5)),
    ("fp8", dict(weight_granularity="block", activation="block")),
    ("int8", dict()), ("int8", dict(act_symmetric=False)),
    ("int8", dict(activation="static_tensor", input_scale=0.25)),
    ("int8", dict(activation="static_tensor", act_symmetric=False, input_scale=0.25, input_zero_point=-3)),
    ("w8a8", dict(input_scale=0.25, input_offset=5)), ("w8a8_dynamic", dict()),
]


@pytest.mark.parametrize("name,params", QUANT_SCHEMES, ids=[f"{n}-{'-'.join(map(str, p.values()))}"
                                                            for n, p in QUANT_SCHEMES])
@settings(max_examples=8)
@given(m=st.integers(1, 5), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       dist=st.sampled_from(("ties", "normal", "heavy", "zero_rows", "constant_rows", "grid", "positive")),
       mag=st.floats(-3, 3), dtype=st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
def test_activation_quantizer_is_bit_exact(name, params, m, k, seed, dist, mag, dtype):
    sch = omniq.get_scheme(name, **params)
    qw = quantized(sch, 8, k, seed)
    if dist == "ties":
        x = tie_rows(name, m, k, seed)
    else:
        x = make_tensor((m, k), dist, seed, 10.0 ** mag)
    x = x.to(dtype) if dtype != torch.float16 or x.abs().max() < 6e4 else x
    p = w8a8.prepare_w8a8(qw, CPU)
    got = fake_from_kernel(qw, p, x)
    want = sch.quantize_activation(x, qw)
    assert torch.equal(got, want), (f"{sch.key}: {int((got != want).sum())} of {got.numel()} values differ, "
                                    f"first at {(got != want).nonzero()[0].tolist()}")


SPLIT_SCHEMES = [("fp8", dict()), ("fp8", dict(activation="static_tensor", input_scale=0.5)),
                 ("int8", dict()), ("int8", dict(act_symmetric=False)), ("w8a8_dynamic", dict())]


@pytest.mark.parametrize("name,params", SPLIT_SCHEMES, ids=[f"{n}-{'-'.join(map(str, p.values()))}"
                                                            for n, p in SPLIT_SCHEMES])
@settings(max_examples=6)
@given(m=st.integers(1, 3), k=st.integers(1, 2100), split=st.sampled_from((2, 4, 8)),
       seed=st.integers(0, 2**31 - 1), dist=st.sampled_from(("ties", "normal", "heavy", "zero_rows", "grid")),
       mag=st.floats(-6, 3), dtype=st.sampled_from((torch.float32, torch.bfloat16)))
def test_activation_quantizer_split_rows_give_the_same_bits(name, params, m, k, split, seed, dist, mag, dtype):
    """Programs sharing a row (decode-size M on a GPU) cast the same codes and scales as one
    program per row, and those equal the scheme's quantize_activation."""
    sch = omniq.get_scheme(name, **params)
    qw = quantized(sch, 8, k, seed)
    x = tie_rows(name if name != "w8a8_dynamic" else "int8", m, k, seed) if dist == "ties" \
        else make_tensor((m, k), dist, seed, 10.0 ** mag)
    x = x.to(dtype)
    p = w8a8.prepare_w8a8(qw, CPU)
    split = min(split, next_pow2(k))
    one = w8a8.quantize_activation(x, p.act, p.fp8, p.act_symmetric, p.input_scale, p.input_zero_point, split=1)
    many = w8a8.quantize_activation(x, p.act, p.fp8, p.act_symmetric, p.input_scale, p.input_zero_point,
                                    split=split)
    for a, b in zip(one, many):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), f"split={split}"
    assert torch.equal(fake_from_kernel(qw, p, x), sch.quantize_activation(x, qw))


def test_quant_split_rule():
    """One program per row off decode sizes and for the 1 x 128 block mode; at decode M about
    SPLIT_CHUNK columns per program, never more than about one program per SM."""
    assert w8a8.quant_split(w8a8.ACT_TOKEN, 1, 12288) == 16 and w8a8.quant_split(w8a8.ACT_TOKEN, 1, 3072) == 4
    assert w8a8.quant_split(w8a8.ACT_TOKEN, 1, 1000) == 1
    assert w8a8.quant_split(w8a8.ACT_TOKEN, 64, 8192) == 2 and w8a8.quant_split(w8a8.ACT_TOKEN, 512, 8192) == 1
    assert w8a8.quant_split(w8a8.ACT_BLOCK, 1, 8192) == 1 and w8a8.quant_split(w8a8.ACT_TOKEN, 1, 32768) == 1
    for m in (1, 3, 16, 40):
        for k in (128, 3000, 8192, 16384):
            sp = w8a8.quant_split(w8a8.ACT_TOKEN, m, k)
            assert sp & (sp - 1) == 0 and (sp == 1 or m * sp <= 132)
    # the cap follows the device's SM count
    assert w8a8.quant_split(w8a8.ACT_TOKEN, 1, 12288, sms=8) == 8 and w8a8.quant_split(w8a8.ACT_TOKEN, 4, 8192, sms=8) == 2


def test_quantize_activation_refuses_a_bad_split():
    x = torch.randn(2, 300)
    for bad in (3, 0, 1024):
        with pytest.raises(ValueError, match="split="):
            w8a8.quantize_activation(x, w8a8.ACT_TOKEN, True, split=bad)
    with pytest.raises(ValueError, match="one pass"):
        w8a8.quantize_activation(x, w8a8.ACT_BLOCK, True, split=2)
# ---- the 4-bit decode PTX of the compiled split-K / GEMM kernels, run on the CPU ---------------------
@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_lop3_slots_ptx_gives_u_minus_z(half):
    """The exact string _lop3_slots hands to inline asm (tests/_fp_ptx_util.py executes it): output i
    holds nibble i of the word, output i + 4 nibble i + 4, each minus the zero point, for every nibble
    value in every position and every zero point the kernels pass (bf16 z <= 127, fp16 z <= 1023)."""
    import ml_dtypes
    import numpy as np
    from _fp_ptx_util import lanes, pack, run_ptx
    bf = half == "bf16"
    asm = affine._LOP3_SLOTS_BF16 if bf else affine._LOP3_SLOTS_F16
    asm = getattr(asm, "value", asm)
    dt = ml_dtypes.bfloat16 if bf else np.float16
    magic = 128.0 if bf else 1024.0
    g = torch.Generator().manual_seed(0)
    zs = [0, 1, 8, 15, 127] + ([255, 1023] if not bf else [])
    for z in zs:
        neg = pack(-(magic + z), -(magic + z), dt)
        words = [0, 0xFFFFFFFF, 0x76543210, 0xFEDCBA98] + torch.randint(0, 2**32, (40,), generator=g).tolist()
        for w in words:
            out = run_ptx(asm, {**{i: 0 for i in range(8)}, 8: w, 9: neg})
            for i in range(8):
                want = float(((w >> (4 * i)) & 15) - z)
                assert lanes(out[i], dt)[0] == want, (half, z, hex(w), i)


# ---- W4A8 activations: the same quantizer, msModelSlim's division form ---------------------------
@settings(max_examples=8)
@given(m=st.integers(1, 4), k=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       dist=st.sampled_from(("ties", "normal", "zero_rows", "grid")))
def test_w4a8_activation_quantizer_is_bit_exact(m, k, seed, dist):
    from omniq.schemes.msmodelslim import quantize_per_token_int8
    x = tie_rows("int8", m, k, seed) if dist == "ties" else make_tensor((m, k), dist, seed)
    q, s, azp = w8a8.quantize_activation(x, w8a8.ACT_TOKEN_DIV, fp8=False)
    want_q, want_s = quantize_per_token_int8(x)
    assert azp is None
    assert torch.equal(q.float(), want_q) and torch.equal(s, want_s.reshape(-1))


# ---- the epilogue used after torch._int_mm ----------------------------------------------------------
@pytest.mark.parametrize("name,params", [("int8", {}), ("int8", {"act_symmetric": False}),
                                         ("w8a8", {"input_scale": 0.03, "input_offset": 4}),
                                         ("w8a8_dynamic", {})])
def test_int_epilogue_matches_scheme_matmul(name, params):
    sch = omniq.get_scheme(name, **params)
    n, k, m = 24, 96, 5
    qw = quantized(sch, n, k, 7)
    p = w8a8.prepare_w8a8(qw, CPU)
    x = make_tensor((m, k), "normal", 8)
    bias = make_tensor((n,), "normal", 9)
    xq, xs, azp = w8a8.quantize_prepared_activation(x, p)
    acc = xq.to(torch.int32) @ p.weight.to(torch.int32).T
    y = w8a8.int_epilogue(acc, p, xs, azp, bias, x.dtype)
    ref = sch.matmul(x, qw, bias)
    assert_within(y, ref, error_bound(x, qw, ref, bias), f"int epilogue {sch.key}")


# ---- split-K bookkeeping -------------------------------------------------------------------------
def test_split_k_counters_are_left_at_zero_and_results_repeat():
    sch = omniq.get_scheme("gptq", bits=4, group_size=32, sym=False)
    qw = quantized(sch, 24, 256, 3)
    p = affine.prepare_affine(qw, CPU)
    x = make_tensor((3, 256), "normal", 4)
    cfg = dict(affine.DEFAULTS["splitk"], SPLIT_K=2)
    y1 = affine.run_dot(x, p, None, "splitk", cfg)
    y2 = affine.run_dot(x, p, None, "splitk", cfg)
    assert torch.equal(y1, y2)
    assert int(affine.tile_counters(CPU, 1).abs().sum()) == 0
    assert_within(y1, sch.matmul(x, qw), error_bound(x, qw, sch.matmul(x, qw), None), "split-K 2")


# ---- selection rules ---------------------------------------------------------------------------
def test_interpreted_triton_is_never_chosen_unless_forced():
    qw = quantized(omniq.get_scheme("gptq", bits=4, group_size=32), 16, 64, 1)
    verdicts = {v.kernel: v for v in omniq.explain(qw, m=1, device="cpu")}
    for name in (*AFFINE_KERNELS, *W8A8_KERNELS):
        assert verdicts[name].status in ("unavailable", "rejected"), verdicts[name]
    assert "interpreter" in verdicts["triton.affine.gemv"].reason
    p = omniq.prepare(qw, "cpu", torch.float32)
    assert not p.kernel_for(1, torch.float32).name.startswith("triton.")


def test_forced_kernel_outside_its_range_says_why():
    qw = quantized(omniq.get_scheme("gptq", bits=4, group_size=32), 16, 64, 1)
    with omniq.use_kernel("triton.affine.gemv"):
        p = omniq.prepare(qw, CPU, torch.float32)
        with pytest.raises(KernelError, match="M=9"):
            omniq.linear(torch.randn(9, 64), p)
    w4a8 = quantized(omniq.get_scheme("w4a8_dynamic"), 16, 64, 1)
    with omniq.use_kernel("triton.affine.gemv"), pytest.raises(KernelError, match="W4A8"):
        omniq.linear(torch.randn(1, 64), w4a8)
    with omniq.use_kernel("triton.affine.dequant_mm"):
        p = omniq.prepare(qw, CPU, torch.float32)
        with pytest.raises(KernelError, match="M=4"):
            omniq.linear(torch.randn(4, 64), p)
    int8 = quantized(omniq.get_scheme("int8"), 16, 64, 1)
    with omniq.use_kernel("triton.affine.gemm"), pytest.raises(KernelError, match="triton.w8a8"):
        omniq.linear(torch.randn(1, 64), int8)


@pytest.mark.parametrize("name,params", [("gptq", {"bits": 4, "group_size": 32, "sym": False}),
                                         ("gptq", {"bits": 4, "group_size": 128, "desc_act": True}),
                                         ("awq", {"group_size": 64}), ("int8", {"activation": None}),
                                         ("w4a8_dynamic", {}), ("fp8", {}), ("int8", {"act_symmetric": False}),
                                         ("w8a8", {}), ("w8a8_dynamic", {"group_size": 64})])
def test_prepared_layouts_keep_the_memory_promise(name, params):
    sch = omniq.get_scheme(name, **params)
    n, k = 256, 1024
    qw = quantized(sch, n, k, 0)
    from omniq.linear import _nbytes
    for layout in (affine.LAYOUT, w8a8.LAYOUT):
        try:
            prepared = layout.prepare(qw, CPU)
        except KernelError:
            continue  # the layout does not take this scheme
        assert _nbytes(prepared) <= 1.05 * sch.nominal_nbytes(n, k), (layout.name, _nbytes(prepared))


@pytest.mark.parametrize("name,params", [("fp8", {}), ("fp8", {"activation": "dynamic_tensor"}),
                                         ("fp8", {"activation": "static_tensor", "input_scale": 0.02}),
                                         ("int8", {}), ("w8a8_dynamic", {})])
def test_torch_fallback_quantizer_gives_the_schemes_codes(name, params):
    """backends/cuda.py's quantizer for machines without Triton runs the schemes' own code-and-scale
    functions: its codes times its scales are the scheme's fake-quantized activation, bit for bit."""
    from omniq.backends.cuda import _quantize_torch
    sch = omniq.get_scheme(name, **params)
    qw = quantized(sch, 8, 300, 0)
    p = w8a8.prepare_w8a8(qw, torch.device("cpu"))
    for i, dist in enumerate(("normal", "heavy", "zero_rows")):
        x = make_tensor((9, 300), dist, 30 + i)
        q, s, azp = _quantize_torch(x, p)
        assert azp is None and s.shape == (9,) and s.is_contiguous()
        got = (q.float() * s[:, None]).float()
        assert torch.equal(got, sch.quantize_activation(x, qw)), f"{sch.key} {dist}"
