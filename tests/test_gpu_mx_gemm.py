"""The one-dot-per-K-tile MX GEMM (triton_mx._mx_gemm_kernel: kind="gemm" for MXFP4 / NVFP4 /
mxfp4_dualscale and MXFP8 W8A16 / W8A8) compiled on a CUDA GPU against the schemes' reference
matmul: bf16 and fp16 activations, awkward shapes (N off every tile, K off the 64-element unit,
M around the tile edges), every K order of the decoded tile, the PTX and the portable decode,
split-K, and CUDA-graph replay of a split launch.

Tolerance as tests/test_triton_mx_gemm.py: |y - ref| <= tol(dtype) * (|xq| @ |W|^T + |b|), xq the
scheme's quantized activation: the kernel multiplies exactly the reference's values.
"""
import pytest
import torch

import omniq
from omniq.kernels import triton_mx as tm

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9}


def close(y, ref, x, qw, bias, dtype, what):
    xq = qw.scheme.quantize_activation(x.float(), qw)
    mag = xq.abs() @ qw.scheme.dequantize(qw).float().abs().T
    if bias is not None:
        mag = mag + bias.float().abs()
    yf, rf = y.float(), ref.float()
    assert torch.equal(torch.isnan(yf), torch.isnan(rf)), f"{what}: NaN placement differs"
    ok = torch.isnan(rf) | (yf == rf) | ((yf - rf).abs() <= TOL[dtype] * mag + 1e-30)
    if not ok.all():
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {(~ok).sum().item()} of {ok.numel()} off; at {i} got {yf[i].item()} "
                             f"want {rf[i].item()} (bound {TOL[dtype] * mag[i].item()})")


def problem(name, params, n, k, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = omniq.get_scheme(name, **params)
    w = (torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 7, (n, 1), generator=g).float()) * 0.05).to(DEV)
    qw = s.quantize(w, mul_scale=torch.rand(k, device=DEV) + 0.5) if name == "mxfp4_dualscale" else s.quantize(w)
    x = (torch.randn(m, k, generator=g) * 2).to(DEV, dtype)
    if name == "nvfp4" and s.activation is not None:
        qw = s.calibrate(qw, x.float())
    b = torch.randn(n, generator=g).to(DEV, dtype)
    return s, qw, x, b


def cfg_of(bn, bm, bk, order, split, warps=4, stages=3):
    return dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, ORDER=order, SPLIT_K=split, GROUP_N=4,
                num_warps=warps, num_stages=stages)


CONFIGS = [cfg_of(128, 128, 128, 1, 1, 8, 3), cfg_of(128, 64, 64, 0, 1), cfg_of(64, 32, 256, 2, 1),
           cfg_of(128, 64, 256, 1, 3), None]
FP4 = [("mxfp4", {"activation": None}, 1056), ("mxfp4", {"activation": None}, 2048),
       ("mxfp4", {"activation": "mxfp8"}, 1024), ("nvfp4", {"activation": None}, 1040),
       ("nvfp4", {"activation": "nvfp4"}, 1024), ("mxfp4_dualscale", {"activation": "mxfp4_dualscale"}, 1536)]


@pytest.mark.parametrize("name,params,k", FP4, ids=[f"{c[0]}-{c[1]['activation']}-{c[2]}" for c in FP4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp4_gemm_compiled(name, params, k, dtype):
    for m in (1, 67, 300):
        s, qw, x, b = problem(name, params, 1000, k, m, dtype, seed=m)
        p = tm.prepare_fp4(qw, DEV)
        ref = s.matmul(x, qw, b)
        for cfg in CONFIGS:
            for asm in (True, False):
                y = tm.run_fp4(x, p, b, "gemm", cfg, asm)
                close(y, ref, x, qw, b, dtype, f"{name} {params} K={k} M={m} {dtype} asm={asm} {cfg}")


@pytest.mark.parametrize("activation", [None, "mxfp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1024, 1000])
def test_mxfp8_gemm_compiled(activation, dtype, k):
    for m in (1, 67, 300):
        s, qw, x, b = problem("mxfp8", {"activation": activation}, 1000, k, m, dtype, seed=m)
        p = tm.prepare_mxfp8(qw, DEV)
        ref = s.matmul(x, qw, b)
        for cfg in CONFIGS:
            close(tm.run_mxfp8(x, p, b, "gemm", cfg), ref, x, qw, b, dtype, f"mxfp8 {activation} K={k} M={m} {cfg}")
        if activation is not None:   # the per-group e4m3 split-K kernel agrees as well
            close(tm.run_mxfp8(x, p, b, "splitk"), ref, x, qw, b, dtype, f"mxfp8 splitk K={k} M={m}")


def test_split_gemm_graph_replay():
    """A split-K launch of the GEMM (partials parked, arrival counters reset by the last CTA)
    captured in a CUDA graph gives the eager result on every replay with new inputs."""
    s, qw, x, _ = problem("mxfp4", {"activation": None}, 2048, 4096, 48, torch.bfloat16)
    p = tm.prepare_fp4(qw, DEV)
    cfg = cfg_of(128, 64, 256, 1, 4)
    tm.run_fp4(x, p, None, "gemm", cfg)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = tm.run_fp4(x, p, None, "gemm", cfg)
    for seed in range(4):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(DEV, x.dtype))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, tm.run_fp4(x, p, None, "gemm", cfg)), f"replay {seed}"
