"""cuda.fp4.mma_gemv (CUDA C++ via NVRTC) compiled on a GPU against scheme.matmul: MXFP4 and
NVFP4 weight-only, M = 1..16, bf16 and fp16, awkward N and K (both split-halves unit sizes),
rows whose scales span many octaves, NaN scales, split-K and single-split launches, bias,
CUDA-graph capture, and the decoded weight itself (identity activations) bit for bit; plus CPU
checks of the launch arithmetic, the kernel signature and the reasons it gives."""
from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.kernels import cuda_fp4_mma as fp4
from omniq.kernels import triton_mx as tm

from _int_util import ULP
from _scheme_util import make_tensor

GPU = torch.device("cuda")
HALF = (torch.bfloat16, torch.float16)
KERNEL = "cuda.fp4.mma_gemv"


def _weight(n, k, seed, spread):
    """Rows (and 64-column blocks) at scales 2^-spread .. 2^spread: many relative group scales
    and row exponents."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    rows = torch.randint(-spread, spread + 1, (n, 1), generator=g).float()
    cols = torch.randint(-spread, spread + 1, (1, -(-k // 64)), generator=g).float().repeat_interleave(64, 1)[:, :k]
    return w * torch.exp2(rows + cols) * 0.05


def _scheme(name):
    return omniq.get_scheme(name, activation=None)


def _bound(x, qw, ref, bias):
    """One output rounding on each side, fp32 accumulation over K, relative to |x| @ |W|^T;
    an absolute fp16 subnormal ulp for tiny outputs. The kernel's weights are exact, so
    nothing else may differ."""
    k = qw.shape[1]
    mag = x.float().abs() @ qw.scheme.dequantize(qw).abs().T
    if bias is not None:
        mag = mag + bias.float().abs()
    tiny = 2.0 ** -24 if x.dtype == torch.float16 else 0.0
    return ULP[x.dtype] * ref.float().abs() + k * 2.0 ** -22 * mag + tiny + 1e-30


def _run(qw, x, bias, target=None):
    old = fp4.TARGET_CTAS
    try:
        if target is not None:
            fp4.TARGET_CTAS = target
        with omniq.use_kernel(KERNEL):
            p = omniq.prepare(qw, GPU)
            return omniq.linear(x, p, bias)
    finally:
        fp4.TARGET_CTAS = old


def _check(qw, x, bias, what, target=None):
    """The kernel against scheme.matmul, computed where the weight lives (big shapes: on the GPU,
    fp32 without TF32)."""
    y = _run(qw, x, bias, target)
    dev = next(iter(qw.tensors.values())).device
    xc, bc = x.to(dev), None if bias is None else bias.to(dev)
    ref = qw.scheme.matmul(xc, qw, bc)
    yc = y.to(dev)
    assert yc.shape == ref.shape and yc.dtype == ref.dtype
    assert torch.equal(torch.isnan(yc), torch.isnan(ref)), f"{what}: NaN placement differs"
    fin = ~torch.isnan(ref)
    err = (yc.float() - ref.float()).abs()
    bound = _bound(xc, qw, ref, bc)
    bad = fin & ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; worst err "
                           f"{float(err[bad].max())} vs bound {float(bound[bad].min())}")


@st.composite
def fp4_cases(draw):
    name = draw(st.sampled_from(("mxfp4", "nvfp4")))
    n = draw(st.integers(1, 300))
    if name == "mxfp4":      # K % 64 == 0: units of 64 (H = 32); else units of 32 (H = 16)
        k = 32 * draw(st.integers(1, 40))
    else:
        k = 16 * draw(st.integers(1, 80))
    return name, n, k


@pytest.mark.gpu
@settings(max_examples=40)
@given(data=st.data())
def test_fp4_mma_against_reference(data):
    name, n, k = data.draw(fp4_cases())
    dtype = data.draw(st.sampled_from(HALF))
    spread = data.draw(st.sampled_from((0, 3, 12))) if dtype == torch.bfloat16 else data.draw(st.sampled_from((0, 3)))
    qw = _scheme(name).quantize(_weight(n, k, data.draw(st.integers(0, 2**31 - 1)), spread))
    m = data.draw(st.integers(1, 16))
    x = make_tensor((m, k), data.draw(st.sampled_from(("normal", "uniform", "sparse", "zero_rows"))),
                    data.draw(st.integers(0, 2**31 - 1)), 2.0).to(dtype)
    bias = None if data.draw(st.booleans()) else make_tensor((n,), "normal", 1).to(dtype)
    target = data.draw(st.sampled_from((None, 1, 4096)))    # default, one split, many splits
    _check(qw, x.to(GPU), None if bias is None else bias.to(GPU),
           f"{name} N={n} K={k} M={m} {dtype} spread={spread} target={target}", target)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("k", [96, 1024])
def test_fp4_mma_decodes_every_weight_exactly(name, dtype, k):
    """Identity activations make y the decoded weight: every K position and both rows of a
    fragment, through the MMA's k permutation. MXFP4 (E2M1 times a power of two) must come
    out bit-exact; NVFP4 up to the reference's fp32 rounding of weight_scale * weight_scale_2."""
    n = 72
    qw = _scheme(name).quantize(_weight(n, k, 5, 3 if dtype == torch.float16 else 8))
    want = qw.scheme.dequantize(qw).T.to(dtype)              # [K, N]
    eye = torch.eye(k, device=GPU, dtype=dtype)
    with omniq.use_kernel(KERNEL):
        p = omniq.prepare(qw, GPU)
        got = torch.cat([omniq.linear(eye[k0:k0 + 16], p) for k0 in range(0, k, 16)]).cpu()
    if name == "mxfp4":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0 ** -7, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_fp4_mma_nan_scale_rows(name):
    n, k = 40, 256
    qw = _scheme(name).quantize(_weight(n, k, 2, 2))
    s = qw.tensors["weight_scale"].clone()
    if name == "mxfp4":
        s.view(torch.uint8)[3, 2] = 0xFF                  # E8M0 NaN
    else:
        s.view(torch.uint8)[17, 5] = 0x7F                 # E4M3 NaN
    qw = type(qw)(qw.scheme, qw.shape, {**qw.tensors, "weight_scale": s}, name=qw.name, validate=False)
    x = make_tensor((3, k), "normal", 4).to(torch.bfloat16).to(GPU)
    _check(qw, x, None, f"{name} NaN scale")


@functools.lru_cache(maxsize=None)
def _big_weight(name, n, k):
    return _scheme(name).quantize(_weight(n, k, 7, 2).to(GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n,k", [(3072, 12288), (12288, 3072), (8192, 8192)])
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_fp4_mma_benchmark_shapes(name, n, k, m, dtype):
    assert not torch.backends.cuda.matmul.allow_tf32     # the reference runs in true fp32 on the GPU
    qw = _big_weight(name, n, k)
    x = make_tensor((m, k), "normal", 8).to(GPU, dtype)
    _check(qw, x, None, f"{name} {n}x{k} M={m} {dtype}")


@pytest.mark.gpu
def test_fp4_mma_graph_replay():
    sch = _scheme("mxfp4")
    n, k = 1024, 2048
    qw = sch.quantize(_weight(n, k, 3, 2))
    with omniq.use_kernel(KERNEL):
        p = omniq.prepare(qw, GPU)
    xs = torch.zeros(4, k, device=GPU, dtype=torch.bfloat16)
    omniq.linear(xs, p)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = omniq.linear(xs, p)
    for seed in (1, 2, 3):
        x = make_tensor((4, k), "normal", seed).to(torch.bfloat16)
        xs.copy_(x.to(GPU))
        g.replay()
        torch.cuda.synchronize()
        ref = sch.matmul(x, qw)
        err = (out.cpu().float() - ref.float()).abs()
        assert (err <= _bound(x, qw, ref, None)).all(), f"graph replay {seed}"


# ---- CPU: launch arithmetic, signature and reasons -------------------------------------------
@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 40000), kb=st.integers(1, 800), target=st.sampled_from((1, 528, 4096)))
def test_launch_config_covers_every_row_and_step(m, n, kb, target):
    kb *= 16
    tiles, splits, bps, mt = fp4.launch_config(m, n, kb, target)
    steps = -(-kb // fp4.STEP_BYTES)
    assert tiles * fp4.ROWS_PER_CTA >= n > (tiles - 1) * fp4.ROWS_PER_CTA
    assert splits * bps >= steps > (splits - 1) * bps  # every K step once, no empty split
    assert mt * 8 >= m and (mt == 1 or m > 8)


def test_signature_matches_kernel_parameters():
    """The launcher's argument kinds against the C parameter list (a mismatch is a silent
    garbage launch on the GPU)."""
    params = re.search(r"fp4_mma_gemv\((.*?)\)\s*\{", fp4.SOURCE, re.S).group(1).split(",")
    kinds = "".join("p" if "*" in q else "f" if q.split()[0] == "float" else "i" for q in params)
    assert kinds == fp4.SIGNATURE


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_embedded_decoder_is_triton_mx_ptx():
    """The kernel embeds triton_mx's decoder strings (checked bit-exactly by tests/_fp_ptx_util
    emulation) with the pair taken from a 32-bit word by one prmt: on random words, factors and
    both selectors it decodes exactly what the 16-bit form decodes from that byte pair."""
    import random

    from _fp_ptx_util import run_ptx
    rnd = random.Random(0)
    for ptx in (tm.PTX_FP4_BF16, tm.PTX_FP4_F16):
        wp = fp4.word_decoder(ptx)
        c = fp4._c_string(wp)
        assert c[0] == c[-1] == '"' and "\n" not in c
        assert c[1:-1].replace("\\n", "\n").replace("%", "$") == wp
        for _ in range(300):  # (random factors may be inf / NaN: numpy warns, the bits still compare)
            w = rnd.getrandbits(32)
            f = {3: rnd.getrandbits(32) & 0x7F7F7F7F, 4: rnd.getrandbits(32) & 0x7F7F7F7F}
            for h, sel in ((0, 0x1404), (1, 0x3424)):
                got = run_ptx(wp, {0: 0, 1: 0, 2: w, 5: sel, **f})
                want = run_ptx(ptx, {0: 0, 1: 0, 2: (w >> (16 * h)) & 0xFFFF, **f})
                assert (got[0], got[1]) == (want[0], want[1]), (hex(w), h)
    src = fp4.variant(True, 1, tm.FMT_MXFP4, 32, False).source
    assert fp4._c_string(fp4.word_decoder(tm.PTX_FP4_BF16)) in src


def test_reasons_on_cpu():
    from omniq.dispatch import Problem, get_kernel
    k = get_kernel(KERNEL)
    cpu = torch.device("cpu")
    assert "CUDA" in k.available(cpu)

    def why(name, m=1, dtype=torch.bfloat16, kk=256, **params):
        return k.can_implement(Problem(omniq.get_scheme(name, **params), 64, kk, m, dtype, cpu))

    assert why("mxfp4", activation=None) is None
    assert why("nvfp4", activation=None, m=16, dtype=torch.float16) is None
    assert "weight-only" in why("mxfp4", activation="mxfp8")
    assert "weight-only" in why("nvfp4", activation="nvfp4")
    assert "M=17" in why("mxfp4", m=17, activation=None)
    assert "bf16 or fp16" in why("nvfp4", dtype=torch.float32, activation=None)
    assert "K % 32" in why("mxfp4", kk=48, activation=None)
    assert "mxfp4_dualscale" in k.serves(omniq.get_scheme("mxfp4_dualscale"))


def test_static_order_between_the_gemv_and_the_triton_gemm():
    """Without a measurement: weight-only MXFP4 at 8 < M <= 64 goes to triton.fp4.gemm (fastest on
    every H200 table shape at M = 16); the GEMV keeps M <= 8 and NVFP4; split-K stays below both."""
    from omniq.dispatch import Problem, get_kernel
    gemv, gemm, splitk = (get_kernel(n) for n in (KERNEL, "triton.fp4.gemm", "triton.fp4.splitk"))

    def order(name, m, **params):
        pr = Problem(omniq.get_scheme(name, **params), 4096, 4096, m, torch.bfloat16, GPU)
        return sorted((gemv, gemm, splitk), key=lambda k: -k.static_rank(pr))[0].name

    assert [order("mxfp4", m, activation=None) for m in (1, 8, 9, 16, 32, 64)] == \
        [KERNEL, KERNEL, "triton.fp4.gemm", "triton.fp4.gemm", "triton.fp4.gemm", "triton.fp4.gemm"]
    assert [order("nvfp4", m, activation=None) for m in (1, 16)] == [KERNEL, KERNEL]
    assert order("mxfp4", 16, activation="mxfp8") == KERNEL   # ranks only: validity is can_implement's
    assert gemm.static_rank(Problem(omniq.get_scheme("mxfp4", activation=None), 64, 64, 128,
                                    torch.bfloat16, GPU)) == gemm.priority


def test_prepared_forms_it_refuses_say_why():
    qw = _scheme("mxfp4").quantize(_weight(16, 128, 0, 1))
    p = tm.prepare_fp4(qw, "cpu")
    assert fp4.unsupported(p) is None and p.h == 32
    p16 = tm.prepare_fp4(_scheme("mxfp4").quantize(_weight(16, 96, 0, 1)), "cpu")
    assert fp4.unsupported(p16) is None and p16.h == 16
    pn = tm.prepare_fp4(_scheme("nvfp4").quantize(_weight(16, 96, 0, 1)), "cpu")
    assert fp4.unsupported(pn) is None
    pa = tm.prepare_fp4(omniq.get_scheme("mxfp4", activation="mxfp8").quantize(_weight(16, 128, 0, 1)), "cpu")
    assert "weight-only" in fp4.unsupported(pa)
    ds = omniq.get_scheme("mxfp4_dualscale", activation=None)
    pd = tm.prepare_fp4(ds.quantize(_weight(16, 512, 0, 1), mul_scale=torch.ones(512)), "cpu")
    assert "dualscale" in fp4.unsupported(pd)


# ---- CPU: the kernel's data flow, step by step ----------------------------------------------
def _emulate(p, x, bias):
    """The CUDA kernel transliterated (one warp per 16 rows, one split): each lane's byte offsets,
    scale bytes and factor2, the embedded PTX decoder run by tests/_fp_ptx_util, the A / B / C
    fragments placed by the PTX ISA's m16n8k16 tables, and the epilogue. It checks the design
    (k permutation, factors, row exponents) where CI has no GPU."""
    import functools
    import math

    import ml_dtypes
    import numpy as np
    from _fp_ptx_util import run_ptx

    bf = x.dtype == torch.bfloat16
    dt = ml_dtypes.bfloat16 if bf else np.float16
    ptx = tm.PTX_FP4_BF16 if bf else tm.PTX_FP4_F16
    qb, sc, rexp = p.qweight.numpy(), p.scales.numpy().astype(int), p.rexp.numpy().astype(int)
    n_, k_, kb, h, grp = p.n, p.k, qb.shape[1], p.h, p.group
    m_ = x.shape[0]
    xf = x.float().numpy()

    def half(bits):
        return float(np.array([bits & 0xFFFF], np.uint16).view(dt)[0])

    def bits_of(v):
        return int(np.array([v], np.float32).astype(dt).view(np.uint16)[0])

    def factor2(s, rex):
        if p.fmt == tm.FMT_MXFP4:
            f = (s << 7) if bf else (min(max(s - 224, 0), 30) << 10)
        else:
            e, mt = (s >> 3) & 15, s & 7
            v = (1 + mt / 8) * 2.0 ** (e - 7) if e else mt * 2.0 ** -9
            v = -v if s & 0x80 else v
            v = float("nan") if s & 0x7F == 0x7F else v
            v = np.float32(v) * np.float32(2.0 ** -rex) * np.float32(2.0 ** 126 if bf else 2.0 ** 14)
            f = bits_of(v)
        return f | (f << 16)

    wptx = fp4.word_decoder(ptx)

    @functools.lru_cache(maxsize=None)
    def decode(w, sel, flo, fhi):
        out = run_ptx(wptx, {0: 0, 1: 0, 2: w, 3: flo, 4: fhi, 5: sel})
        return out[0], out[1]

    y = np.zeros((m_, n_))
    for n0 in range(0, n_, 16):
        acc = np.zeros((16, 16))                      # [row in the warp, m]
        for st in range(math.ceil(kb / 64)):
            a = np.zeros((8, 16, 16))                 # per MMA i: A[row, k-slot]
            b = np.zeros((8, 16, 16))                 # B[k-slot, m]
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                off = st * 64 + 16 * t
                klo = (off // h) * 2 * h + off % h
                khi = klo + h
                for r, row in ((min(n0 + g, n_ - 1), g), (min(n0 + g + 8, n_ - 1), g + 8)):
                    if off < kb:
                        by = [int(v) for v in qb[r, off:off + 16]]
                        flo, fhi = factor2(sc[klo // grp, r], rexp[r]), factor2(sc[khi // grp, r], rexp[r])
                    else:
                        by, flo, fhi = [0] * 16, 0, 0
                    for i in range(8):
                        q = i // 2                # word q of the 16 bytes, selector by pair
                        w = by[4 * q] | (by[4 * q + 1] << 8) | (by[4 * q + 2] << 16) | (by[4 * q + 3] << 24)
                        lo, hi = decode(w, 0x3424 if i % 2 else 0x1404, flo, fhi)
                        a[i, row, 2 * t], a[i, row, 2 * t + 1] = half(lo), half(lo >> 16)
                        a[i, row, 2 * t + 8], a[i, row, 2 * t + 9] = half(hi), half(hi >> 16)
                for mt in range(2):
                    m = mt * 8 + g
                    for i in range(8):
                        for kk, slot in ((klo + 2 * i, 2 * t), (klo + 2 * i + 1, 2 * t + 1),
                                         (khi + 2 * i, 2 * t + 8), (khi + 2 * i + 1, 2 * t + 9)):
                            b[i, slot, m] = xf[m, kk] if m < m_ and kk < k_ else 0.0
            for i in range(8):
                acc += a[i] @ b[i]
        for r in range(16):
            n = n0 + r
            if n < n_:
                rf = float("nan") if rexp[n] == tm.REXP_NAN else 2.0 ** rexp[n] * p.gscale
                y[:, n] = acc[r, :m_] * rf + (0.0 if bias is None else float(bias[n]))
    return torch.from_numpy(y).float().to(x.dtype)


@pytest.mark.parametrize("name,k", [("mxfp4", 128), ("mxfp4", 96), ("nvfp4", 80)])
@pytest.mark.parametrize("dtype", HALF)
def test_kernel_design_emulated_on_cpu(name, k, dtype):
    n, m = 20, 11
    qw = _scheme(name).quantize(_weight(n, k, 11, 3))
    s = qw.tensors["weight_scale"].clone()
    s.view(torch.uint8)[7, 1] = 0xFF if name == "mxfp4" else 0x7F     # a NaN row
    qw = type(qw)(qw.scheme, qw.shape, {**qw.tensors, "weight_scale": s}, name=qw.name, validate=False)
    p = tm.prepare_fp4(qw, "cpu")
    assert p.h == (32 if k % 64 == 0 and name == "mxfp4" else 16)
    x = make_tensor((m, k), "normal", 3).to(dtype)
    bias = make_tensor((n,), "normal", 4).to(dtype)
    import numpy as np
    with np.errstate(invalid="ignore", over="ignore"):   # the NaN row, and its overflowing factors
        y = _emulate(p, x, bias)
    ref = qw.scheme.matmul(x, qw, bias)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    err = (y.float() - ref.float()).abs()
    assert (err <= _bound(x, qw, ref, bias))[fin].all(), float(err[fin].max())
