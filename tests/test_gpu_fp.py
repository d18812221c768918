"""The MXFP4 / NVFP4 / dualscale / MXFP8 / GGUF Triton kernels compiled on a CUDA GPU, against
the schemes' reference matmul: bf16 and fp16 activations, awkward shapes (N not a multiple of
any tile, K off the 64-element unit, M around the tile edges), the PTX decode and the portable
one, split-K partial sums, and capture/replay in a CUDA graph.

Tolerance as in tests/test_triton_fp.py: |y - ref| <= tol(dtype) * (|x| @ |W|^T + |b|); the
kernels see the reference's exact weight and activation values, only roundings differ.
"""
import pytest
import torch

import omniq
from omniq.kernels import triton_gguf as tg
from omniq.kernels import triton_mx as tm

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9, torch.float32: 1e-5}


def close(y, ref, x, w, b, dtype, what):
    x2 = x.reshape(-1, x.shape[-1]).float()
    mag = x2.abs() @ w.abs().T
    if b is not None:
        mag = mag + b.float().abs()
    mag = mag.reshape(ref.shape)
    yf, rf = y.float(), ref.float()
    assert torch.equal(torch.isnan(yf), torch.isnan(rf)), f"{what}: NaN placement differs"
    ok = torch.isnan(rf) | ((yf - rf).abs() <= TOL[dtype] * mag + 1e-30)
    if not ok.all():
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {(~ok).sum().item()} of {ok.numel()} off; at {i} got {yf[i].item()} "
                             f"want {rf[i].item()} (bound {TOL[dtype] * mag[i].item()})")


def weight(n, k, seed=0, spread=6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-spread, spread + 1, (n, 1), generator=g).float())
    return (w * 0.05).to(DEV)


def act(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(DEV, dtype)


def forced(kernel, qw, x, b):
    with omniq.use_kernel(kernel):
        return omniq.linear(x, qw, b)


FP4 = [("mxfp4", {"activation": None}, 1056), ("mxfp4", {"activation": None}, 2048),
       ("mxfp4", {"activation": "mxfp4"}, 1024), ("mxfp4", {"activation": "mxfp8"}, 1056),
       ("nvfp4", {"activation": None}, 1040), ("nvfp4", {"activation": "nvfp4"}, 1024),
       ("mxfp4_dualscale", {"activation": None}, 1024), ("mxfp4_dualscale", {"activation": "mxfp4_dualscale"}, 1536)]


def fp4_weight(name, params, n, k):
    s = omniq.get_scheme(name, **params)
    w = weight(n, k)
    if name == "mxfp4_dualscale":
        return s.quantize(w, mul_scale=torch.rand(k, device=DEV) + 0.5)
    return s.quantize(w)


@pytest.mark.parametrize("name,params,k", FP4, ids=[f"{c[0]}-{c[1]['activation']}-{c[2]}" for c in FP4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp4_compiled(name, params, k, dtype):
    n = 1000
    qw = fp4_weight(name, params, n, k)
    for kernel, ms in (("splitk", (1, 7, 32)), ("gemm", (1, 33, 100, 257)), ("dequant_mm", (130, 300))):
        for m in ms:
            x = act((m, k), dtype, seed=m)
            if name == "nvfp4" and qw.scheme.activation is not None:
                qw = qw.scheme.calibrate(qw, x.float())
            b = torch.randn(n, device=DEV).to(dtype)
            y = forced(f"triton.fp4.{kernel}", qw, x, b)
            close(y, qw.scheme.matmul(x, qw, b), x, qw.scheme.dequantize(qw), b, dtype, f"{name} {kernel} M={m}")


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp4_ptx_decode_equals_portable_decode(name, dtype):
    """The PTX lop3 decode and the portable one produce the same weights: exactly the same y
    up to fp32 summation order (identity x makes y the decoded weight itself)."""
    n, k = 192, 1056 if name == "mxfp4" else 1040
    qw = fp4_weight(name, {"activation": None}, n, k)
    p = tm.prepare_fp4(qw, DEV)
    eye = torch.eye(k, device=DEV, dtype=dtype)[:256]
    a = tm.run_fp4(eye, p, None, "gemm", asm=True)
    c = tm.run_fp4(eye, p, None, "gemm", asm=False)
    assert torch.equal(a, c)
    want = qw.scheme.dequantize(qw)[:, :256].T.to(dtype)
    if name == "mxfp4":       # E2M1 * 2^E: every value exact
        assert torch.equal(a, want)
    else:                     # NVFP4 rounds weight_scale * weight_scale_2 in the reference's order
        torch.testing.assert_close(a.float(), want.float(), rtol=2.0 ** -7, atol=0)


@pytest.mark.parametrize("activation", ["mxfp8", None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mxfp8_compiled(activation, dtype):
    n, k = 1000, 1000            # K not a multiple of 32: a partial last block
    s = omniq.get_scheme("mxfp8", activation=activation)
    qw = s.quantize(weight(n, k))
    for kernel, ms in (("splitk", (1, 9, 32)), ("gemm", (3, 130, 300)), ("dequant_mm", (128, 257))):
        for m in ms:
            x = act((m, k), dtype, seed=m)
            b = torch.randn(n, device=DEV).to(dtype)
            y = forced(f"triton.mxfp8.{kernel}", qw, x, b)
            close(y, s.matmul(x, qw, b), x, s.dequantize(qw), b, dtype, f"mxfp8 {activation} {kernel} M={m}")


def test_mxfp8_activation_quantizer_bit_exact_on_gpu():
    from omniq.schemes.mx import E4M3, mx_quantize
    x = act((64, 1000), torch.float32) * torch.exp2(torch.randint(-30, 30, (64, 1), device=DEV).float())
    x[3, 5] = float("nan")
    x[7, :32] = 0
    for rule in ("floor", "ceil", "even", "rceil"):
        q, s = tm.quantize_mxfp8_activation(x, rule)
        wq, ws = mx_quantize(x, E4M3, rule, "rne")
        assert torch.equal(s, ws), rule
        fin = ws.repeat_interleave(32, dim=1)[:, :1000] != 255
        assert torch.equal(q.view(torch.float8_e4m3fn).float()[fin], wq[fin]), rule


GGUF = list(tg.TYPE_IDS)


@pytest.mark.parametrize("gtype", GGUF)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gguf_compiled(gtype, dtype):
    qk = tg.BLOCK[gtype][0]
    n, k = 1000, qk * (5 if qk == 256 else 37)
    s = omniq.get_scheme("gguf", type=gtype)
    qw = s.quantize(weight(n, k, spread=3))
    w = s.dequantize(qw)
    for kernel, ms in (("splitk", (1, 17)), ("gemm", (2, 150)), ("dequant_mm", (150,))):
        for m in ms:
            x = act((m, k), dtype, seed=m)
            b = torch.randn(n, device=DEV).to(dtype)
            y = forced(f"triton.gguf.{kernel}", qw, x, b)
            close(y, s.matmul(x, qw, b), x, w, b, dtype, f"{gtype} {kernel} M={m}")
    if gtype in tg.PTX_TYPES:   # the PTX decode against the portable one
        x = act((5, k), dtype)
        a = tg.run_gguf(x, qw, None, "splitk", asm=True)
        c = tg.run_gguf(x, qw, None, "splitk", asm=False)
        close(a, c, x, w, None, dtype, f"{gtype} ptx vs portable")


def test_scheme_quantization_is_the_same_on_the_gpu():
    """Scales divided by constants (omniq.schemes.base.div_const) round once on every device:
    NVFP4's weight scales and the dual-scale MXFP4 activation's coarse scale, CUDA against CPU."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(5)) * 0.02
    s = omniq.get_scheme("nvfp4", activation=None)
    cpu, gpu = s.quantize(w), s.quantize(w.to(DEV))
    for name, t in cpu.tensors.items():
        assert torch.equal(gpu.tensors[name].cpu().view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                           else gpu.tensors[name].cpu(), t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                           else t), f"nvfp4 {name} differs"
    d = omniq.get_scheme("mxfp4_dualscale", activation="mxfp4_dualscale")
    qw = d.quantize(w, mul_scale=torch.rand(1024, generator=torch.Generator().manual_seed(6)) + 0.5)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(7)) * 3
    assert torch.equal(d.quantize_activation(x.to(DEV), qw.to(DEV)).cpu(), d.quantize_activation(x, qw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("over", [{"WIDE": False}, {"WIDE": True}, {"WIDE": True, "BLOCK_N": 64, "K_PER_ITER": 128},
                                  {"WIDE": True, "K_PER_ITER": 512, "num_warps": 8}])
def test_gguf_q8_0_wide_tiles(over, dtype):
    """q8_0 with an iteration's blocks decoded as one tile (WIDE) or one block at a time, with
    4, 8 and 16 blocks per iteration, split-K and the tiled GEMM, against the reference."""
    s = omniq.get_scheme("gguf", type="q8_0")
    n, k = 520, 32 * 64
    qw = s.quantize(weight(n, k, spread=3))
    w = s.dequantize(qw)
    for kind, m in (("splitk", 1), ("splitk", 17), ("gemm", 70)):
        x = act((m, k), dtype, seed=m)
        b = torch.randn(n, device=DEV).to(dtype)
        y = tg.run_gguf(x, qw, b, kind, dict(tg.config_for(kind, "q8_0", m, n, k), **over))
        close(y, s.matmul(x, qw, b), x, w, b, dtype, f"q8_0 {kind} M={m} {over}")


@pytest.mark.parametrize("kernel,name,params", [("triton.fp4.splitk", "mxfp4", {"activation": None}),
                                                ("triton.gguf.splitk", "gguf", {"type": "q4_k"}),
                                                ("triton.mxfp8.splitk", "mxfp8", {}),
                                                ("triton.fp4.dequant_mm", "nvfp4", {"activation": None})])
def test_cuda_graph_capture_and_replay(kernel, name, params):
    """Split-K kernels park partials and count arrivals: replaying a captured graph many times
    with new inputs must keep giving the eager result (the counters reset themselves)."""
    s = omniq.get_scheme(name, **params)
    n, k = 2048, 1024
    qw = s.quantize(weight(n, k, spread=2))
    m = 128 if kernel.endswith("dequant_mm") else 4
    x = act((m, k), torch.bfloat16)
    with omniq.use_kernel(kernel):
        p = omniq.prepare(qw, DEV)
        p(x)                                   # choose and compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = p(x)
        for seed in range(5):
            x.copy_(act((m, k), torch.bfloat16, seed=seed + 10))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, p(x)), f"replay {seed}"
