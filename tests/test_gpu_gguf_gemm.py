"""The repacked GGUF kernels (q8_0 / q4_k / q6_k, triton.gguf.v2 layout) compiled on a CUDA GPU:
the dequantize kernel bit-exact with gguf-py's values rounded once (bf16 included: compiled,
the cast is RNE), and the one-dot-per-K-tile matmul against scheme.matmul on bf16 and fp16
activations, awkward shapes (N off every tile, M around the tile edges, K whose BLOCK_K must
shrink), forced configs with split-K, and every config of the probe's grid at one shape.

Tolerance: |y - ref| <= tol(dtype) * (|x| @ |W|^T + |b|), tol 2^-7 (bf16) / 2^-9 (fp16), as in
tests/test_gpu_fp.py; the weight is rounded once to the dot dtype, exactly as dequant_mm does.
"""
import os
import sys

import pytest
import torch

import omniq
from _gguf_util import gguf_py_values, random_blocks
from omniq.kernels import triton_gguf as tg
from omniq.schemes.base import QuantizedWeight

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9}
TYPES = list(tg.REPACKED)


def close(y, ref, x, w, b, dtype, what):
    mag = x.float().abs() @ w.float().abs().T + (0 if b is None else b.float().abs())
    err = (y.float() - ref.float()).abs()
    ok = err <= TOL[dtype] * mag + 1e-30
    assert y.dtype == dtype and y.shape == ref.shape, what
    if not ok.all():
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {(~ok).sum().item()} of {ok.numel()} off; at {i} got {y[i].item()} "
                             f"want {ref[i].item()} (bound {TOL[dtype] * mag[i].item()})")


def random_weight(gtype, n, nb, seed):
    """Random valid block bytes on the GPU and gguf-py's values for them."""
    raw = random_blocks(gtype, n, nb, seed)
    qw = QuantizedWeight(omniq.get_scheme("gguf", type=gtype), (n, nb * tg.BLOCK[gtype][0]), {"weight": raw.to(DEV)})
    return qw, gguf_py_values(gtype, raw).to(DEV)


@pytest.mark.parametrize("gtype", TYPES)
def test_dequantize_bit_exact(gtype):
    qw, want = random_weight(gtype, 333, 3 if gtype != "q8_0" else 40, 1)
    p = tg.prepare_gguf(qw, DEV)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        got = tg.dequantize_gguf(p, dt)
        assert torch.equal(got, want.to(dt)), (gtype, dt)


@pytest.mark.parametrize("gtype", TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_repacked_kernels_against_scheme_matmul(gtype, dtype):
    qk = tg.BLOCK[gtype][0]
    for n, nb in ((1000, 5 if qk == 256 else 37), (130, 3 if qk == 256 else 24)):
        qw, w = random_weight(gtype, n, nb, n)
        k = nb * qk
        p = tg.prepare_gguf(qw, DEV)
        for kind, m in (("splitk", 1), ("splitk", 17), ("splitk", 64), ("gemm", 2), ("gemm", 150), ("gemm", 513)):
            x = torch.randn(m, k, device=DEV).to(dtype)
            b = torch.randn(n, device=DEV).to(dtype)
            y = tg.run_gguf(x, p, b, kind)
            close(y, qw.scheme.matmul(x, qw, b), x, w, b, dtype, f"{gtype} {kind} n={n} k={k} M={m}")
        x = torch.randn(200, k, device=DEV).to(dtype)
        close(tg.run_gguf_dequant_mm(x, p, None), qw.scheme.matmul(x, qw, None), x, w, None, dtype,
              f"{gtype} dequant_mm")


@pytest.mark.parametrize("gtype", ["q4_k", "q8_0"])
def test_every_probe_config_compiles_and_is_right(gtype):
    """The probe's whole grid at one shape, split-K forced on a few (the probe times them)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import probe_gguf_gemm as pg
    qw, w = random_weight(gtype, 384, 4 if gtype != "q8_0" else 32, 5)
    p = tg.prepare_gguf(qw, DEV)
    k = qw.shape[1]
    for kind, grid, m in (("splitk", pg.SPLITK_GRID, 16), ("gemm", pg.GEMM_GRID, 300)):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        ref = qw.scheme.matmul(x, qw, None)
        for bn, bm, bk, nw, ns in grid:
            for split in (None, 3):
                cfg = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns, "GROUP_N": 8}
                if split:
                    cfg["SPLIT_K"] = split
                close(tg.run_gguf(x, p, None, kind, cfg), ref, x, w, None, torch.bfloat16, f"{gtype} {kind} {cfg}")


def test_linear_under_cuda_graph_and_dispatch():
    """omniq.linear picks a triton.gguf kernel over the v2 layout; graph replay matches eager."""
    qw, w = random_weight("q4_k", 2048, 4, 9)
    prepared = omniq.prepare(qw, DEV)
    x = torch.randn(8, 1024, device=DEV, dtype=torch.bfloat16)
    with omniq.use_kernel("triton.gguf.splitk"):
        eager = omniq.linear(x, prepared)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            omniq.linear(x, prepared)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            out = omniq.linear(x, prepared)
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, eager)
    close(eager, qw.scheme.matmul(x, qw, None), x, w, None, torch.bfloat16, "graph")
