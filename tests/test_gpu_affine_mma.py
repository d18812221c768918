"""cuda.affine.mma_gemv (CUDA C++ via NVRTC) compiled on a GPU against scheme.matmul: GPTQ
(sym / asym, act-order, per-channel) and AWQ 4-bit, M = 1..16, bf16 and fp16, awkward N and K,
split-K and single-split launches, bias, CUDA-graph capture; plus CPU checks of the launch
arithmetic and the reasons it gives where it cannot run."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.kernels import cuda_affine_mma as mma
from omniq.kernels import triton_affine as affine

from _int_util import activations, assert_within, check_graph_replay, error_bound, quantized
from _scheme_util import make_tensor

GPU = torch.device("cuda")
HALF = (torch.bfloat16, torch.float16)
KERNEL = "cuda.affine.mma_gemv"


def _forced(qw, x, bias):
    with omniq.use_kernel(KERNEL):
        p = omniq.prepare(qw, GPU, x.dtype)
        return omniq.linear(x, p, bias)


def _check(sch, qw, x, bias):
    y = _forced(qw, x, bias)
    xc, bc = x.cpu(), None if bias is None else bias.cpu()
    ref = sch.matmul(xc, qw, bc)
    assert_within(y.cpu(), ref, error_bound(xc, qw, ref, bc),
                  f"{KERNEL} {sch.key} N={qw.shape[0]} K={qw.shape[1]} x={tuple(x.shape)} {x.dtype}")


@st.composite
def int4_cases(draw):
    fam = draw(st.sampled_from(("gptq", "gptq", "awq")))
    g = draw(st.sampled_from((128, -1, 128)))
    if fam == "gptq":
        sch = omniq.get_scheme("gptq", bits=4, group_size=g, sym=draw(st.booleans()),
                               desc_act=draw(st.booleans()))
    else:
        sch = omniq.get_scheme("awq", group_size=g)
    n = draw(st.integers(1, 40)) * 8
    k = draw(st.integers(1, 9)) * 128 + draw(st.sampled_from((0, 0, 8, -8, 64)))
    if g == 128:
        k = max(128, k - k % 128)
    return sch, n, k


@pytest.mark.gpu
@settings(max_examples=30)
@given(data=st.data())
def test_mma_gemv_against_reference(data):
    rt = data.draw(st.sampled_from((1, 2)))
    minb = data.draw(st.sampled_from((0, 6)))
    sch, n, k = data.draw(int4_cases())
    qw = quantized(sch, n, k, data.draw(st.integers(0, 2**31 - 1)))
    x = data.draw(activations(k, 16, dtypes=HALF)).to(GPU)
    bias = None if data.draw(st.booleans()) else make_tensor((n,), "normal", 1).to(GPU, x.dtype)
    saved = mma.ROW_TILES, mma.MIN_BLOCKS   # module settings: put back whatever happens
    mma.ROW_TILES, mma.MIN_BLOCKS = rt, minb
    try:
        _check(sch, qw, x, bias)
    finally:
        mma.ROW_TILES, mma.MIN_BLOCKS = saved


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n,k", [(3072, 12288), (12288, 3072), (8192, 8192)])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("rt", [1, 2])
def test_mma_gemv_benchmark_shapes(n, k, m, dtype, rt, monkeypatch):
    monkeypatch.setattr(mma, "ROW_TILES", rt)
    sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=False)
    qw = quantized(sch, n, k, 7)
    x = make_tensor((m, k), "normal", 8).to(GPU, dtype)
    _check(sch, qw, x, None)


@pytest.mark.gpu
def test_mma_gemv_graph_replay():
    sch = omniq.get_scheme("gptq", bits=4, group_size=128)
    n, k = 1024, 2048
    qw = quantized(sch, n, k, 3)
    check_graph_replay(sch, qw, (1, 4, 16), kernel=KERNEL)


# ---- CPU: launch arithmetic and reasons ------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 40000), blocks=st.integers(1, 400), rt=st.sampled_from((1, 2)))
def test_launch_config_covers_every_row_and_block(m, n, blocks, rt):
    tiles, splits, bps, mt = mma.launch_config(m, n, blocks * 16, row_tiles=rt)
    rows = mma.ROWS_PER_CTA * rt
    assert tiles * rows >= n > (tiles - 1) * rows
    assert splits * bps >= blocks > (splits - 1) * bps  # every K block once, no empty split
    assert mt * 8 >= m


def test_launch_choice_applies_tuned_only_to_its_shape(monkeypatch):
    monkeypatch.setattr(mma, "TUNED", {(3072, 12288, 1): dict(target_ctas=792, min_blocks=6)})
    default = dict(target_ctas=mma.TARGET_CTAS, row_tiles=mma.ROW_TILES, min_blocks=mma.MIN_BLOCKS)
    assert mma.launch_choice(1, 3072, 12288) == dict(default, target_ctas=792, min_blocks=6)
    assert mma.launch_choice(8, 3072, 12288) == mma.launch_choice(1, 3072, 12288)
    assert mma.launch_choice(9, 3072, 12288) == default      # two MMA token tiles: not measured
    assert mma.launch_choice(1, 12288, 3072) == default


def test_static_order_hands_m_above_8_to_splitk():
    """Without a measurement, the GEMV leads up to M = 8 and triton.affine.splitk from M = 9 (the
    H200 table's M = 16 cells)."""
    from omniq.dispatch import Problem, get_kernel
    mma_k, splitk = get_kernel(KERNEL), get_kernel("triton.affine.splitk")
    sch = omniq.get_scheme("gptq", bits=4, group_size=128)

    def pr(m):
        return Problem(sch, 4096, 4096, m, torch.bfloat16, GPU)
    assert all(mma_k.static_rank(pr(m)) > splitk.static_rank(pr(m)) for m in range(1, 9))
    assert all(mma_k.static_rank(pr(m)) < splitk.static_rank(pr(m)) for m in range(9, 17))


def test_reasons_on_cpu():
    from omniq.dispatch import Problem, get_kernel
    k = get_kernel(KERNEL)
    assert "CUDA" in k.available(torch.device("cpu"))
    pr = Problem(omniq.get_scheme("gptq", bits=4, group_size=64), 64, 256, 1, torch.bfloat16, torch.device("cpu"))
    assert "power-of-two multiple of 128" in k.can_implement(pr)
    pr = Problem(omniq.get_scheme("gptq", bits=8, group_size=128), 64, 256, 1, torch.bfloat16, torch.device("cpu"))
    assert "4-bit" in k.can_implement(pr)
    pr = Problem(omniq.get_scheme("gptq", bits=4, group_size=128), 64, 256, 17, torch.bfloat16, torch.device("cpu"))
    assert "M=17" in k.can_implement(pr)
    pr = Problem(omniq.get_scheme("gptq", bits=4, group_size=128), 64, 256, 1, torch.float32, torch.device("cpu"))
    assert "bf16 or fp16" in k.can_implement(pr)


def test_group_args_are_a_shift():
    sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=False)
    p = affine.prepare_affine(quantized(sch, 16, 512, 0), "cpu")
    assert mma.group_args(p) == (1, 0)
    p.group_size = 512
    assert mma.group_args(p) == (1, 2)
    p.group_size = 384
    assert "power-of-two multiple of 128" in mma.unsupported(p)
    p1 = affine.prepare_affine(quantized(omniq.get_scheme("gptq", bits=4, group_size=-1), 16, 512, 0), "cpu")
    assert mma.group_args(p1) == (0, 0)


def test_prepared_forms_it_refuses_say_why():
    sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=False)
    p = affine.prepare_affine(quantized(sch, 16, 256, 0), "cpu")
    assert mma.unsupported(p) is None
    p.zmode = 2
    assert "float zero offsets" in mma.unsupported(p)
