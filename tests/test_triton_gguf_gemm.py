"""The triton.gguf.v2 layout (q8_0 / q4_k / q6_k repacked) and its one-dot-per-K-tile kernels,
under the Triton interpreter, against gguf-py's dequantizer (an oracle omniq did not write).

Exactness: the layout's dequantize kernel must give gguf-py's fp32 values exactly, and each
rounded once to fp16 (torch's RNE cast of gguf-py's values). bf16 is checked on the GPU only
(tests/test_gpu_gguf_gemm.py): the interpreter's fp32 -> bf16 cast truncates. The matmuls use
fp32 activations (IEEE dots: only summation order differs from x @ W^T, tol 1e-5 of |x| @ |W|^T)
and fp16 activations (W rounded once to fp16, tol 2^-9).
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import omniq
from _gguf_util import gguf_py_values, random_blocks
from omniq.kernels import triton_gguf as tg
from omniq.linear import _nbytes
from omniq.schemes.base import QuantizedWeight

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests (TRITON_INTERPRET=1, set by conftest without a GPU); "
           "tests/test_gpu_gguf_gemm.py runs the same kernels compiled")

TYPES = list(tg.REPACKED)


def weight(gtype, n, nb, seed):
    raw = random_blocks(gtype, n, nb, seed)
    qw = QuantizedWeight(omniq.get_scheme("gguf", type=gtype), (n, nb * tg.BLOCK[gtype][0]), {"weight": raw})
    return qw, gguf_py_values(gtype, raw)


@pytest.mark.parametrize("gtype", TYPES)
def test_layout_holds_the_checkpoint_bytes(gtype):
    """The repack keeps exactly the checkpoint's bytes (memory ratio 1.0), the codes contiguous
    with 16-byte aligned rows for K a multiple of 256."""
    qw, _ = weight(gtype, 8, 4, 0)
    p = tg.prepare_gguf(qw, "cpu")
    assert p.raw is None and p.qs.is_contiguous()
    assert _nbytes(p) == qw.nbytes
    assert (p.qs.stride(0) * p.qs.element_size()) % 16 == 0


@pytest.mark.parametrize("gtype", TYPES)
@settings(max_examples=3, deadline=None)
@given(n=st.integers(1, 40), nb=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_dequantize_kernel_equals_gguf_py(gtype, n, nb, seed):
    """Random valid bytes: fp32 values bit-exact with gguf-py, fp16 = gguf-py's rounded once."""
    qw, want = weight(gtype, n, nb, seed)
    p = tg.prepare_gguf(qw, "cpu")
    for dt in (torch.float32, torch.float16):
        got = tg.dequantize_gguf(p, dt)
        assert got.dtype == dt and torch.equal(got, want.to(dt)), (gtype, dt)


def oracle_check(y, x, w, bias, dtype, what):
    wd = w.to(dtype).float() if dtype != torch.float32 else w
    ref = x.float() @ wd.T + (0 if bias is None else bias.float())
    mag = x.float().abs() @ wd.abs().T + (0 if bias is None else bias.float().abs())
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -9
    err = (y.float() - ref).abs()
    assert y.dtype == dtype and y.shape == ref.shape, what
    assert (err <= tol * mag + 1e-30).all(), f"{what}: max err {err.max().item()} (mag {mag.max().item()})"


@pytest.mark.parametrize("gtype", TYPES)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_repacked_matmul_matches_gguf_py(gtype, data):
    """Awkward N / M, every BLOCK_K the kernel may take, split-K forced, bias or not."""
    qk = tg.BLOCK[gtype][0]
    nb = data.draw(st.integers(1, 3) if qk == 256 else st.sampled_from([3, 5, 8]), label="blocks")
    n = data.draw(st.integers(1, 40), label="n")
    m = data.draw(st.integers(1, 20), label="m")
    kind = data.draw(st.sampled_from(["gemm", "splitk"]), label="kind")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    cfg = dict(BLOCK_N=data.draw(st.sampled_from([16, 32]), label="bn"), BLOCK_M=16,
               BLOCK_K=data.draw(st.sampled_from([32, 64, 128, 256, 512]), label="bk"),
               num_warps=4, num_stages=2, SPLIT_K=data.draw(st.integers(1, 3), label="split"))
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    qw, w = weight(gtype, n, nb, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, nb * qk, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if seed % 2 else None
    y = tg.run_gguf(x, tg.prepare_gguf(qw, "cpu"), bias, kind, cfg)
    oracle_check(y, x, w, bias, dtype, f"{gtype} n={n} m={m} {kind} {cfg}")


def test_block_k_divides_k():
    assert tg._block_k(256, 96) == 32 and tg._block_k(256, 768) == 256 and tg._block_k(128, 8192) == 128


def test_dispatch_prepares_one_layout_for_every_gguf_kernel():
    """splitk, gemm and dequant_mm share the triton.gguf.v2 layout; omniq.linear through each
    forced kernel agrees with gguf-py's values."""
    qw, w = weight("q4_k", 24, 2, 7)
    x = torch.randn(3, 512)
    from omniq.dispatch import get_kernel
    names = ("triton.gguf.splitk", "triton.gguf.gemm", "triton.gguf.dequant_mm")
    assert {get_kernel(k).layout.name for k in names} == {tg.GGUF_LAYOUT}
    for name in names[:2]:
        with omniq.use_kernel(name):
            y = omniq.linear(x, qw)
        oracle_check(y, x, w, None, torch.float32, name)
