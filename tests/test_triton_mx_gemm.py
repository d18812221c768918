"""The one-dot-per-K-tile GEMM of omniq.kernels.triton_mx (_mx_gemm_kernel: what kind="gemm"
runs for MXFP4 / NVFP4 / mxfp4_dualscale and MXFP8 W8A16 / W8A8) under the Triton interpreter,
called directly with generated configurations (tile sizes, K order of the decoded tile, split-K,
ragged K) and compared with the scheme's reference matmul.

Tolerance (as tests/test_triton_fp.py): |y - ref| <= tol(dtype) * (|x| @ |W|^T + |b|). The
kernel multiplies exactly the reference's weight values (each group factor folds exactly into
the bf16/fp16 decoded value) and exactly its fake-quantized activations; only the fp32
summation order and the output rounding differ, both far below one quantization step.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import omniq
from omniq.kernels import triton_mx as tm

from _mx_util import gen_weight as mx_weight

pytestmark = pytest.mark.skipif(
    not tm.interpreting(),
    reason="runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest where there is no "
           "GPU); on a GPU tests/test_gpu_mx_gemm.py runs the same kernel compiled")

TOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9, torch.float32: 1e-5}


def close(y, ref, x, qw, bias, dtype, what):
    """y within the bound above of ref, |x| taken after the scheme's activation quantization."""
    xq = qw.scheme.quantize_activation(x.float(), qw)
    mag = xq.abs() @ qw.scheme.dequantize(qw).float().abs().T
    if bias is not None:
        mag = mag + bias.float().abs()
    assert y.shape == ref.shape and y.dtype == ref.dtype, what
    yf, rf = y.float(), ref.float()
    assert torch.equal(torch.isnan(yf), torch.isnan(rf)), f"{what}: NaN placement differs"
    ok = torch.isnan(rf) | (yf == rf) | ((yf - rf).abs() <= TOL[dtype] * mag + 1e-30)   # == : equal infinities
    if not ok.all():
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {(~ok).sum().item()} of {ok.numel()} off; at {i} got {yf[i].item()} "
                             f"want {rf[i].item()} (bound {TOL[dtype] * mag[i].item()})")


@st.composite
def configs(draw, min_bk):
    """A configuration of the gemm kind: every knob the kernel takes, small tiles."""
    return {"BLOCK_N": draw(st.sampled_from([16, 32])), "BLOCK_M": draw(st.sampled_from([16, 32])),
            "BLOCK_K": draw(st.sampled_from([b for b in (32, 64, 128, 256) if b >= min_bk])),
            "ORDER": draw(st.sampled_from([0, 1, 2])), "SPLIT_K": draw(st.sampled_from([1, 2, 3])),
            "GROUP_N": draw(st.sampled_from([1, 2])), "num_warps": 4, "num_stages": 2}


def weight_and_x(scheme, n, k, m, dtype, seed):
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(mx_weight(rng, n, k))
    if scheme.name == "mxfp4_dualscale":
        qw = scheme.quantize(w, mul_scale=torch.from_numpy(rng.random(k).astype(np.float32)) + 0.5)
    else:
        qw = scheme.quantize(w)
    x = (torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)) * 2).to(dtype)
    if scheme.name == "nvfp4" and scheme.activation is not None:
        qw = scheme.calibrate(qw, x.float())
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype) if seed % 2 else None
    return qw, x, bias


FP4_CASES = [
    ("mxfp4", {"activation": None}, [64, 96, 192, 320]),     # 96, 320: K % 64 != 0 (H = 16)
    ("mxfp4", {"activation": "mxfp8", "scale_rule": "even"}, [128, 160]),
    ("nvfp4", {"activation": None}, [32, 48, 144]),
    ("nvfp4", {"activation": "nvfp4"}, [64, 80]),
    ("mxfp4_dualscale", {"activation": None}, [512]),
    ("mxfp4_dualscale", {"activation": "mxfp4_dualscale"}, [1024]),
]


@pytest.mark.parametrize("name,params,ks", FP4_CASES, ids=[f"{c[0]}-{c[1].get('activation')}" for c in FP4_CASES])
@settings(max_examples=5)
@given(data=st.data())
def test_fp4_gemm_matches_reference(name, params, ks, data):
    scheme = omniq.get_scheme(name, **params)
    n, k, m = data.draw(st.integers(1, 48)), data.draw(st.sampled_from(ks)), data.draw(st.integers(1, 40))
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    seed = data.draw(st.integers(0, 2 ** 16))
    qw, x, bias = weight_and_x(scheme, n, k, m, dtype, seed)
    p = tm.prepare_fp4(qw, "cpu")
    cfg = data.draw(configs(2 * p.h))
    y = tm.run_fp4(x, p, bias, "gemm", cfg)
    close(y, scheme.matmul(x, qw, bias), x, qw, bias, dtype,
          f"{name} {params} N={n} K={k} M={m} {dtype} {cfg}")


@pytest.mark.parametrize("activation", [None, "mxfp8"])
@settings(max_examples=8)
@given(data=st.data())
def test_mxfp8_gemm_matches_reference(activation, data):
    """W8A16 and W8A8 (the fake-quantized activation fed as exact bf16), K ragged or not."""
    scheme = omniq.get_scheme("mxfp8", activation=activation,
                              scale_rule=data.draw(st.sampled_from(["floor", "ceil", "even", "rceil"])))
    n, k, m = data.draw(st.integers(1, 48)), data.draw(st.sampled_from([32, 70, 128, 200])), data.draw(
        st.integers(1, 40))
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    qw, x, bias = weight_and_x(scheme, n, k, m, dtype, data.draw(st.integers(0, 2 ** 16)))
    cfg = data.draw(configs(64))
    y = tm.run_mxfp8(x, tm.prepare_mxfp8(qw, "cpu"), bias, "gemm", cfg)
    close(y, scheme.matmul(x, qw, bias), x, qw, bias, dtype,
          f"mxfp8 {activation} N={n} K={k} M={m} {dtype} {cfg}")


@pytest.mark.parametrize("m", [1, 48, 300])
def test_default_configs_of_every_m_bucket(m):
    """config_for's defaults (split-K below M = 64, large tiles above) run and are right."""
    for name, params, k in (("mxfp4", {"activation": None}, 256), ("mxfp8", {"activation": "mxfp8"}, 192)):
        scheme = omniq.get_scheme(name, **params)
        qw, x, bias = weight_and_x(scheme, 24, k, m, torch.bfloat16, m)
        if name == "mxfp8":
            y = tm.run_mxfp8(x, tm.prepare_mxfp8(qw, "cpu"), bias, "gemm")
        else:
            y = tm.run_fp4(x, tm.prepare_fp4(qw, "cpu"), bias, "gemm")
        close(y, scheme.matmul(x, qw, bias), x, qw, bias, torch.bfloat16, f"{name} M={m}")


def test_nan_scale_row_and_extreme_scales():
    """A NaN scale byte makes exactly its row NaN; rows whose scales span the whole E8M0 range
    (2^-126 .. 2^123 in one row) stay exact: the in-loop factors are relative to the row."""
    scheme = omniq.get_scheme("mxfp4", activation=None)
    g = torch.Generator().manual_seed(5)
    n, k = 8, 256
    qw = scheme.quantize(torch.randn(n, k, generator=g))
    s = qw.tensors["weight_scale"]
    s[0, :] = torch.tensor([1, 250, 127, 2, 200, 60, 127, 127], dtype=torch.uint8)
    s[3, 2] = 0xFF
    x = torch.randn(5, k, generator=g) * 2.0 ** -60
    p = tm.prepare_fp4(qw, "cpu")
    for order in (0, 1, 2):
        cfg = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=128, ORDER=order, SPLIT_K=1, GROUP_N=1, num_warps=4, num_stages=2)
        y = tm.run_fp4(x, p, None, "gemm", cfg)
        close(y, scheme.matmul(x, qw), x, qw, None, torch.float32, f"ORDER {order}")
        assert torch.isnan(y[:, 3]).all() and not torch.isnan(y[:, [0, 1, 2, 4]]).any()


if tm.triton is not None:
    tl = tm.tl

    @tm.triton.jit
    def _order_probe(out_ptr, H: tl.constexpr, BLOCK_K: tl.constexpr, ORDER: tl.constexpr):
        """Writes, per column of a merged tile, the K its value came from, and _tile_k's K."""
        NU: tl.constexpr = BLOCK_K // (2 * H)
        base = tl.arange(0, NU)[:, None] * (2 * H) + tl.arange(0, H)[None, :]
        lo = tl.broadcast_to(base[None, :, :], (2, NU, H)).to(tl.float32)
        w = tm._merge_halves(lo, lo + H, 2, BLOCK_K, ORDER)
        c = tl.arange(0, BLOCK_K)
        tl.store(out_ptr + c, tl.sum(w, axis=0) * 0.5)
        tl.store(out_ptr + BLOCK_K + c, tm._tile_k(BLOCK_K, H, ORDER).to(tl.float32))


@pytest.mark.parametrize("h", [16, 32])
@pytest.mark.parametrize("bk", [64, 128])
@pytest.mark.parametrize("order", [0, 1, 2])
def test_tile_k_names_the_merged_columns(h, bk, order):
    """The activation rows are read in _tile_k's order; the decoded tile's columns come out of
    _merge_halves: both must name the same K for every column (and cover each K once)."""
    out = torch.zeros(2 * bk)
    _order_probe[(1,)](out, H=h, BLOCK_K=bk, ORDER=order)
    merged, named = out[:bk], out[bk:]
    assert torch.equal(merged, named)
    assert torch.equal(named.sort().values, torch.arange(bk, dtype=torch.float32))
    if order == 0:
        assert torch.equal(named, torch.arange(bk, dtype=torch.float32))
