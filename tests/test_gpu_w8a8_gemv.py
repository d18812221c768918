"""cuda.w8a8.gemv compiled on a CUDA GPU (`pytest -m gpu`): fp8 and int8 W8A8 with dynamic
per-token activations against scheme.matmul on hypothesis-drawn shapes (odd N, K at and off the
64-byte step, every M in 1..16, bf16 / fp16, with and without bias, every launch split), the
decode shapes of the speed target, each fp8 conversion variant, omniq.linear captured in a
CUDA graph and replayed; the CUDA activation quantizer bit-exact against the scheme's
quantize_activation and the Triton quantizer; Programmatic Dependent Launch on / off and
each quantizer giving bitwise the same y; and a chain of PDL layers (each
layer's input the previous layer's output) in a CUDA graph, where a missing wait would race."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.kernels import cuda_w8a8_gemv as gemv
from omniq.kernels import triton_w8a8 as w8a8

from _int_util import activations, assert_within, check_graph_replay, error_bound, quantized
from _scheme_util import make_tensor

pytestmark = pytest.mark.gpu
GPU = torch.device("cuda")
HALF = (torch.bfloat16, torch.float16)
KERNEL = "cuda.w8a8.gemv"
SCHEMES = {"fp8": {}, "fp8_tensor": {"weight_granularity": "tensor"}, "int8": {}}


def _scheme(key):
    return omniq.get_scheme(key.split("_")[0], **SCHEMES[key])


def _forced(qw, x, bias):
    with omniq.use_kernel(KERNEL):
        p = omniq.prepare(qw, GPU, x.dtype)
        return omniq.linear(x, p, bias)


def _check(sch, qw, x, bias, what=""):
    y = _forced(qw, x.to(GPU), None if bias is None else bias.to(GPU))
    ref = sch.matmul(x, qw, bias)
    assert_within(y.cpu(), ref, error_bound(x, qw, ref, bias),
                  f"{KERNEL} {sch.key} N={qw.shape[0]} K={qw.shape[1]} x={tuple(x.shape)} {x.dtype} {what}")


@settings(max_examples=40)
@given(data=st.data())
def test_matches_reference(data):
    key = data.draw(st.sampled_from(tuple(SCHEMES)))
    sch = _scheme(key)
    n = data.draw(st.integers(1, 300))
    k = 16 * data.draw(st.one_of(st.integers(1, 12), st.integers(1, 128)))
    x = data.draw(activations(k, gemv.MAX_M, dtypes=HALF))
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    bias = None if data.draw(st.booleans()) else make_tensor((n,), "normal", 1).to(x.dtype)
    _check(sch, qw, x, bias)


@pytest.mark.parametrize("key", ["fp8", "int8"])
@pytest.mark.parametrize("n,k", [(3072, 12288), (12288, 3072), (8192, 8192), (264, 4096 + 16)])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16])
def test_decode_shapes(key, n, k, m):
    sch = _scheme(key)
    qw = quantized(sch, n, k, n + m)
    dtype = HALF[m % 2]
    x = make_tensor((m, k), "normal", m).to(dtype)
    bias = make_tensor((n,), "normal", 2).to(dtype) if m % 3 == 0 else None
    _check(sch, qw, x, bias)


@pytest.mark.parametrize("key,mode", [("fp8", gemv.FP8_F16), ("fp8", gemv.FP8_NATIVE), ("int8", gemv.FP8_F16)])
@pytest.mark.parametrize("cfg", [dict(), dict(WN=2, WK=2, UNROLL=4, ctas_per_sm=2),
                                 dict(WK=8, UNROLL=1, ctas_per_sm=16),
                                 dict(WN=1, WK=1, UNROLL=1, ctas_per_sm=1, max_split=1)])
def test_variants_and_splits(key, mode, cfg):
    """Each fp8 MMA variant and a spread of warp layouts /
    pipeline depths / K splits (one split included) against the reference, with an fp32 bias and
    heavy-tailed values (fp8 MMA accumulation precision included)."""
    # (int8 has one MMA path; `mode` picks among the fp8 ones, so int8 runs once per config)
    sch = _scheme(key)
    n, k = 200, 1024 + 48
    qw = quantized(sch, n, k, 7)
    p = w8a8.prepare_w8a8(qw, GPU)
    for m in (1, 8, 13):
        x = make_tensor((m, k), "heavy", m).to(torch.bfloat16)
        bias = make_tensor((n,), "normal", 3)
        y = gemv.run_gemv(x.to(GPU), p, bias.to(GPU), cfg=dict(gemv.DEFAULT, **cfg, FP8_MODE=mode))
        ref = sch.matmul(x, qw, bias)
        assert_within(y.cpu(), ref, error_bound(x, qw, ref, bias), f"{key} mode={mode} {cfg} M={m}")


def test_repeated_split_launches_reset_their_counters():
    """Split-K arrival counters must be back at zero after each launch: many launches in a row
    (and a different grid in between) keep giving the same, right answer."""
    sch = _scheme("int8")
    qw = quantized(sch, 520, 4096, 9)
    p = w8a8.prepare_w8a8(qw, GPU)
    x = make_tensor((4, 4096), "normal", 4).to(torch.bfloat16)
    ref = sch.matmul(x, qw)
    first = None
    for i in range(6):
        cfg = dict(gemv.DEFAULT, ctas_per_sm=8 if i % 2 else 3)
        y = gemv.run_gemv(x.to(GPU), p, None, cfg=cfg).cpu()
        assert_within(y, ref, error_bound(x, qw, ref, None), f"launch {i}")
        if i % 2:
            first = y if first is None else first
            assert torch.equal(y, first), "split-K reduction is not deterministic"


@pytest.mark.parametrize("key", ["fp8", "int8"])
def test_cuda_graph_capture_and_replay(key):
    sch = _scheme(key)
    n, k = 1536, 2048
    qw = quantized(sch, n, k, 21)
    check_graph_replay(sch, qw, (1, 7, 16), kernel=KERNEL)


def test_dispatcher_picks_it_for_decode_m():
    """Without a tuning entry for the shape, the static priority puts the GEMV first for M <= 16
    and leaves larger M to the GEMMs."""
    sch = _scheme("fp8")
    qw = quantized(sch, 328, 1104, 5)
    p = omniq.prepare(qw, GPU, torch.bfloat16)
    assert p.kernel_for(4, torch.bfloat16).name == KERNEL
    assert p.kernel_for(17, torch.bfloat16).name != KERNEL


# ---- the CUDA activation quantizer ------------------------------------------------------------
QUANT_DISTS = ("normal", "heavy", "zero_rows", "grid", "constant_rows", "sparse")


@settings(max_examples=40)
@given(data=st.data())
def test_cuda_quantizer_is_bit_exact(data):
    """codes and scales equal the Triton quantizer's, and codes * scale equal the scheme's
    quantize_activation bit for bit (the oracle: torch arithmetic in omniq/schemes)."""
    name = "int8"    # the CUDA quantizer is int8 only (fp8 keeps the Triton one: see quantize_cuda)
    sch = omniq.get_scheme(name)
    m = data.draw(st.integers(1, 40))
    k = 8 * data.draw(st.one_of(st.integers(1, 40), st.integers(1, 2048)))
    dtype = data.draw(st.sampled_from(HALF))
    mag = 10.0 ** data.draw(st.floats(-4, 3))
    x = make_tensor((m, k), data.draw(st.sampled_from(QUANT_DISTS)), data.draw(st.integers(0, 2**31 - 1)), mag)
    x = x.clamp(-3e4, 3e4).to(dtype)     # finite in fp16 too
    xg = x.to(GPU)
    q, s, azp = gemv.quantize_cuda(xg, name == "fp8")
    assert azp is None and q.shape == (m, k) and s.shape == (m,)
    tq, ts, _ = w8a8.quantize_activation(xg, w8a8.ACT_TOKEN, name == "fp8")
    assert torch.equal(q.view(torch.uint8), tq.view(torch.uint8)), f"{name} codes differ from Triton's M={m} K={k}"
    assert torch.equal(s, ts), f"{name} scales differ from Triton's"
    qw = sch.quantize(torch.randn(4, k), name="t.layer")
    want = sch.quantize_activation(x, qw)
    got = q.cpu().float() * s.cpu()[:, None]
    assert torch.equal(got, want), f"{name} {dtype} M={m} K={k}: max diff {(got - want).abs().max()}"


def test_cuda_quantizer_takes_strided_rows():
    x = make_tensor((5, 200), "heavy", 3).to(torch.bfloat16).to(GPU)[:, 8:168]   # row stride 200, offset 16 B
    q, s, _ = gemv.quantize_cuda(x, False)
    tq, ts, _ = w8a8.quantize_activation(x.contiguous(), w8a8.ACT_TOKEN, False)
    assert torch.equal(q.view(torch.uint8), tq.view(torch.uint8)) and torch.equal(s, ts)


# ---- PDL and the quantizer switches ----------------------------------------------------------
SWITCHES = [dict(pdl=False, quant="triton"), dict(pdl=True, quant="triton"),
            dict(pdl=False, quant="cuda"), dict(pdl=True, quant="cuda")]


@pytest.mark.parametrize("key", ["fp8", "int8"])
@pytest.mark.parametrize("n,k,m", [(3072, 12288, 1), (12288, 3072, 16), (200, 1024 + 48, 9), (40, 64, 3)])
def test_pdl_and_quantizers_give_the_same_bits(key, n, k, m):
    sch = _scheme(key)
    qw = quantized(sch, n, k, n + k + m)
    p = w8a8.prepare_w8a8(qw, GPU)
    x = make_tensor((m, k), "heavy", m).to(torch.bfloat16)
    ref = sch.matmul(x, qw)
    bases = (gemv.config_for(m, n, k, key == "fp8"), dict(gemv.DEFAULT, WK=8, UNROLL=1, ctas_per_sm=16))
    first = {}
    for sw in SWITCHES:
        for i, base in enumerate(bases):
            y = gemv.run_gemv(x.to(GPU), p, None, cfg=dict(base, **sw)).cpu()
            assert_within(y, ref, error_bound(x, qw, ref, None), f"{key} {sw} {base}")
            first.setdefault(i, y)
            assert torch.equal(y, first[i]), f"{sw} changed the result bits ({base})"


@pytest.mark.parametrize("quant", ["cuda", "triton"])
@pytest.mark.parametrize("key", ["fp8", "int8"])
def test_pdl_layer_chain_in_a_cuda_graph(key, quant):
    """Layers whose input is the previous layer's output, each a quantizer + PDL GEMV, captured in
    one graph: a GEMV reading activations before its quantizer finished would show up here. Both
    quantizers trigger early (fp8 always takes the Triton one)."""
    sch = _scheme(key)
    n = k = 2048
    layers = [w8a8.prepare_w8a8(quantized(sch, n, k, 50 + i), GPU) for i in range(6)]
    cfg_pdl = dict(gemv.DEFAULT, pdl=True, quant=quant)
    cfg_plain = dict(gemv.DEFAULT, pdl=False, quant="triton")

    def chain(x, cfg):
        for p in layers:
            x = gemv.run_gemv(x, p, None, cfg=cfg) * (1.0 / 32)   # keep the magnitudes in range
        return x

    for m in (1, 16):
        static_x = torch.zeros(m, k, device=GPU, dtype=torch.bfloat16)
        chain(static_x, cfg_pdl)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain(static_x, cfg_pdl)
        for trial in range(3):
            x = make_tensor((m, k), "normal", 7 * trial + m).to(torch.bfloat16).to(GPU)
            static_x.copy_(x)
            g.replay()
            want = chain(x, cfg_plain)
            torch.cuda.synchronize()
            assert torch.equal(out, want), f"{key} M={m} replay {trial}: PDL chain differs from the plain one"


def test_pdl_back_to_back_launches_stay_exact():
    """Many eager PDL launches in a row with changing inputs (no sync in between) equal the plain path."""
    sch = _scheme("fp8")
    qw = quantized(sch, 1040, 4096, 11)
    p = w8a8.prepare_w8a8(qw, GPU)
    xs = [make_tensor((1 + i % 16, 4096), "normal", i).to(torch.bfloat16).to(GPU) for i in range(24)]
    got = [gemv.run_gemv(x, p, None, cfg=dict(gemv.DEFAULT, pdl=True, quant="cuda")) for x in xs]
    want = [gemv.run_gemv(x, p, None, cfg=dict(gemv.DEFAULT, pdl=False, quant="triton")) for x in xs]
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"launch {i}"
