"""cuda.w8a8.gemv compiled on a CUDA GPU (`pytest -m gpu`): fp8 and int8 W8A8 with dynamic
per-token activations against scheme.matmul on hypothesis-drawn shapes (odd N, K at and off the
64-byte step, every M in 1..16, bf16 / fp16, with and without bias, every launch split), the
decode shapes of the speed target, each fp8 conversion variant, and omniq.linear captured in a
CUDA graph and replayed."""
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
