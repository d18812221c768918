"""Triton kernels of the floating-point microscaled families and GGUF, run under the Triton
interpreter: each kernel is forced (omniq.use_kernel) and omniq.linear is compared with the
scheme's reference matmul on generated shapes, dtypes and values.

Tolerance (one bound for every family): |y - ref| <= tol(dtype) * (|x| @ |W|^T) + tiny.
With a bias, |b| joins that magnitude (it enters the rounded output). The kernels see exactly the reference's weight values (E2M1/E4M3 times a power of two, or an
E4M3 block scale, is exact in bf16/fp16/fp32) and exactly its fake-quantized activations, so
only roundings differ: the output cast (2^-9 relative in bf16, 2^-11 in fp16), the GGUF weight
rounded once to the dot dtype (2^-9 / 2^-11 of each |w|), dualscale's x * mul_scale rounded to
the activation dtype, and fp32 summation order. Each is bounded by that unit times |x| @ |W|^T,
so tol is 2^-7 (bf16), 2^-9 (fp16), 1e-5 (fp32): a factor 2 to 4 of margin, and far below any
real error (a wrong code, scale or sub-block moves y by a whole quantization step).
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import omniq
from omniq.kernels import triton_gguf as tg
from omniq.kernels import triton_mx as tm

pytestmark = pytest.mark.skipif(
    not tm.interpreting(),
    reason="runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest where there is no "
           "GPU); on a GPU tests/test_gpu_fp.py runs the same kernels compiled")

TOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9, torch.float32: 1e-5}
# Triton 3.9's interpreter casts fp32 -> bf16 by truncation, not round-to-nearest (1 + 2^-8 + 2^-10
# becomes 1.0): a decoded weight can lose up to 2 bf16 ulps (a scale cast, then the product) and
# the output one more, all in one direction, so bf16 gets twice the compiled bound here
TOL_INTERPRETED_BF16 = 2.0 ** -6
DTYPES = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])


def assert_close_to_reference(y, ref, x, w_deq, dtype, what, bias=None):
    x2 = x.reshape(-1, x.shape[-1]).float()
    mag = x2.abs() @ w_deq.abs().T
    if bias is not None:   # the output rounding scales with |y| <= |x| @ |W|^T + |b|
        mag = mag + bias.float().abs()
    mag = mag.reshape(ref.shape)
    assert y.shape == ref.shape and y.dtype == ref.dtype, what
    yf, rf = y.float(), ref.float()
    same_nan = torch.isnan(yf) == torch.isnan(rf)
    assert same_nan.all(), f"{what}: NaN placement differs"
    tol = TOL_INTERPRETED_BF16 if dtype == torch.bfloat16 and tm.interpreting() else TOL[dtype]
    ok = torch.isnan(rf) | ((yf - rf).abs() <= tol * mag + 1e-30)
    bad = (~ok).nonzero()
    assert ok.all(), (f"{what}: {len(bad)} outputs off, first at {bad[0].tolist()}: "
                      f"got {yf[tuple(bad[0])].item()} want {rf[tuple(bad[0])].item()}")


def gen_weight(n, k, seed, spread=6):
    """Rows of very different magnitudes (exercises the per-row exponent), some zero rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    row = torch.randint(-spread, spread + 1, (n, 1), generator=g).float()
    w = w * torch.exp2(row) * 0.05
    w[torch.rand(n, generator=g) < 0.1] = 0.0
    return w


def gen_x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(*shape, generator=g) * 2.0).to(dtype)


def check_kernel(kernel, qw, x, bias, dtype, what):
    with omniq.use_kernel(kernel):
        y = omniq.linear(x, qw, bias)
    ref = qw.scheme.matmul(x, qw, bias)
    assert_close_to_reference(y, ref, x, qw.scheme.dequantize(qw), dtype, what, bias)


@st.composite
def problems(draw, k_choices, max_m=40):
    n = draw(st.integers(16, 72))
    k = draw(st.sampled_from(k_choices))
    kernel = draw(st.sampled_from(["splitk", "gemm"]))
    m = draw(st.integers(1, max_m if kernel == "gemm" else min(max_m, 32)))   # split-K serves M <= 32
    three_d = draw(st.booleans()) and m > 1
    return {"n": n, "k": k, "m": m, "shape": (2, (m + 1) // 2, k) if three_d else (m, k),
            "dtype": draw(DTYPES), "bias": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
            "kernel": kernel}


FP4_CASES = [
    ("mxfp4", {"activation": None}, [32, 64, 96, 160]),
    ("mxfp4", {"activation": "mxfp4"}, [64, 96]),
    ("mxfp4", {"activation": "mxfp8", "scale_rule": "even"}, [64, 128]),
    ("nvfp4", {"activation": None}, [16, 48, 64]),
    ("nvfp4", {"activation": "nvfp4"}, [32, 80]),
    ("mxfp4_dualscale", {"activation": None}, [512]),
    ("mxfp4_dualscale", {"activation": "mxfp4_dualscale"}, [512, 1024]),
]


@pytest.mark.parametrize("name,params,ks", FP4_CASES, ids=[f"{c[0]}-{c[1].get('activation')}" for c in FP4_CASES])
@settings(max_examples=4)
@given(data=st.data())
def test_fp4_kernels_match_reference(name, params, ks, data):
    p = data.draw(problems(ks))
    scheme = omniq.get_scheme(name, **params)
    w = gen_weight(p["n"], p["k"], p["seed"])
    if name == "mxfp4_dualscale":
        g = torch.Generator().manual_seed(p["seed"] + 7)
        qw = scheme.quantize(w, mul_scale=torch.rand(p["k"], generator=g) + 0.5)
    else:
        qw = scheme.quantize(w)
    x = gen_x(p["shape"], p["dtype"], p["seed"])
    if name == "nvfp4" and scheme.activation is not None:
        qw = scheme.calibrate(qw, x.float())
    bias = torch.randn(p["n"]).to(p["dtype"]) if p["bias"] else None
    check_kernel(f"triton.fp4.{p['kernel']}", qw, x, bias, p["dtype"], f"{name} {params} {p}")


@pytest.mark.parametrize("activation", ["mxfp8", None])
@settings(max_examples=5)
@given(data=st.data())
def test_mxfp8_kernels_match_reference(activation, data):
    p = data.draw(problems([32, 70, 128, 200]))
    scheme = omniq.get_scheme("mxfp8", activation=activation,
                              scale_rule=data.draw(st.sampled_from(["floor", "ceil", "even", "rceil"])))
    qw = scheme.quantize(gen_weight(p["n"], p["k"], p["seed"]))
    x = gen_x(p["shape"], p["dtype"], p["seed"])
    bias = torch.randn(p["n"]).to(p["dtype"]) if p["bias"] else None
    check_kernel(f"triton.mxfp8.{p['kernel']}", qw, x, bias, p["dtype"], f"mxfp8 {activation} {p}")


GGUF_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.mark.parametrize("gtype", GGUF_TYPES)
@settings(max_examples=2)
@given(data=st.data())
def test_gguf_kernels_match_reference(gtype, data):
    qk = tg.BLOCK[gtype][0]
    p = data.draw(problems([qk * 2, qk * 3] if qk == 256 else [32, 96, 160], max_m=24))
    scheme = omniq.get_scheme("gguf", type=gtype)
    qw = scheme.quantize(gen_weight(p["n"], p["k"], p["seed"], spread=3))
    x = gen_x(p["shape"], p["dtype"], p["seed"])
    bias = torch.randn(p["n"]).to(p["dtype"]) if p["bias"] else None
    check_kernel(f"triton.gguf.{p['kernel']}", qw, x, bias, p["dtype"], f"gguf {gtype} {p}")


@pytest.mark.parametrize("over", [{"WIDE": True, "K_PER_ITER": 128}, {"WIDE": True, "K_PER_ITER": 256, "BLOCK_N": 32},
                                  {"WIDE": True, "K_PER_ITER": 512}])
@pytest.mark.parametrize("kind,m", [("splitk", 1), ("splitk", 5), ("gemm", 20)])
def test_gguf_q8_0_wide_tiles_match_reference(over, kind, m):
    """q8_0 with an iteration's 4, 8 or 16 blocks decoded as one tile (WIDE)."""
    scheme = omniq.get_scheme("gguf", type="q8_0")
    n, k = 40, 32 * 16
    qw = scheme.quantize(gen_weight(n, k, 7, spread=3))
    x = gen_x((m, k), torch.bfloat16, 8)
    bias = torch.randn(n).to(torch.bfloat16)
    y = tg.run_gguf(x, qw, bias, kind, dict(tg.config_for(kind, "q8_0", m, n, k), **over))
    assert_close_to_reference(y, scheme.matmul(x, qw, bias), x, scheme.dequantize(qw), torch.bfloat16,
                              f"q8_0 wide {kind} M={m} {over}", bias)


@pytest.mark.parametrize("gtype", ["q8_0", "q4_k", "q6_k", "q3_k"])
def test_gguf_kernel_decodes_random_block_bytes(gtype):
    """Any valid bytes (finite f16 d/dmin), not only what omniq's quantizer writes: the kernel
    against gguf-py's dequantizer (an oracle omniq did not write), through an identity x."""
    import gguf  # a test dependency (requirements-test.txt): missing it is a failure, not a skip
    qk, bpb = tg.BLOCK[gtype]
    n, nb = 16, 2
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (n, nb, bpb), generator=g, dtype=torch.uint8)
    # keep every f16 field finite and modest: exponent bits of the high byte forced low
    for name, (off, size) in omniq.formats.gguf_blocks.BLOCK_FACTS[gtype]["fields"].items():
        if name in ("d", "dmin", "m"):
            raw[:, :, off + 1] &= 0x3B
    raw = raw.reshape(n, nb * bpb)
    qtype = getattr(gguf.GGMLQuantizationType, gtype.upper())
    want = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).copy()).float()
    qw = omniq.schemes.base.QuantizedWeight(omniq.get_scheme("gguf", type=gtype), (n, nb * qk), {"weight": raw})
    eye = torch.eye(nb * qk, dtype=torch.float32)
    got = tg.run_gguf(eye, qw, None, "gemm").T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


DEQUANT_CASES = [("triton.fp4.dequant_mm", "mxfp4", {"activation": None}, 64),
                 ("triton.fp4.dequant_mm", "nvfp4", {"activation": "nvfp4"}, 48),
                 ("triton.fp4.dequant_mm", "mxfp4_dualscale", {"activation": "mxfp4_dualscale"}, 512),
                 ("triton.mxfp8.dequant_mm", "mxfp8", {"activation": "mxfp8"}, 70),
                 ("triton.gguf.dequant_mm", "gguf", {"type": "q4_k"}, 256),
                 ("triton.gguf.dequant_mm", "gguf", {"type": "q5_0"}, 64)]


@pytest.mark.parametrize("kernel,name,params,k", DEQUANT_CASES,
                         ids=[f"{c[1]}-{list(c[2].values())[0]}" for c in DEQUANT_CASES])
@settings(max_examples=2)
@given(m=st.integers(128, 150), n=st.integers(16, 40), dtype=DTYPES, seed=st.integers(0, 2**16), bias=st.booleans())
def test_dequant_mm_kernels_match_reference(kernel, name, params, k, m, n, dtype, seed, bias):
    """Large-M path: one Triton pass dequantizes, torch's dense matmul multiplies."""
    scheme = omniq.get_scheme(name, **params)
    w = gen_weight(n, k, seed, spread=3)
    qw = scheme.quantize(w, mul_scale=torch.rand(k) + 0.5) if name == "mxfp4_dualscale" else scheme.quantize(w)
    x = gen_x((m, k), dtype, seed)
    if name == "nvfp4":
        qw = scheme.calibrate(qw, x.float())
    b = torch.randn(n).to(dtype) if bias else None
    check_kernel(kernel, qw, x, b, dtype, f"{kernel} {name} M={m} N={n} {dtype}")


@settings(max_examples=12)
@given(rule=st.sampled_from(["floor", "ceil", "even", "rceil"]), m=st.integers(1, 5),
       k=st.sampled_from([32, 40, 96, 130]), seed=st.integers(0, 2**16),
       special=st.sampled_from(["none", "zeros", "nan", "inf", "tiny", "ties"]))
def test_mxfp8_activation_quantizer_is_bit_exact(rule, m, k, seed, special):
    """The fused Triton quantizer equals omniq.schemes.mx.mx_quantize (codes and E8M0 bytes)."""
    from omniq.formats.e8m0 import decode_e8m0
    from omniq.schemes.mx import E4M3, expand_blocks, mx_quantize
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-20, 20, (m, 1), generator=g).float())
    if special == "zeros":
        x[:, :32] = 0
    elif special == "nan":
        x[0, 3] = float("nan")
    elif special == "inf":
        x[-1, 1] = float("-inf")
    elif special == "tiny":
        x[:, :32] *= 2.0 ** -130          # subnormal amax
    elif special == "ties":                # values exactly halfway between E4M3 neighbours
        x = torch.randint(-64, 64, (m, k), generator=g).float() * 2 + 1
        x = x * 2.0 ** -5
    q, s = tm.quantize_mxfp8_activation(x, rule)
    want_q, want_s = mx_quantize(x, E4M3, rule, "rne")
    assert torch.equal(s, want_s)
    got = q.view(torch.float8_e4m3fn).float() * expand_blocks(decode_e8m0(s), 32, k)
    want = want_q * expand_blocks(decode_e8m0(want_s), 32, k)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.equal(got[fin], want[fin])


@settings(max_examples=20)
@given(n=st.integers(1, 5), units=st.integers(1, 4), h=st.sampled_from([16, 32]), tail=st.booleans(),
       seed=st.integers(0, 2**16))
def test_split_halves_layout_round_trips(n, units, h, tail, seed):
    k = units * 2 * h - (h if tail else 0)
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = tm.split_halves(codes, h)
    assert packed.shape == (n, units * h)
    assert torch.equal(tm.unsplit_halves(packed, h, k), codes)
    # byte j of unit u: element u*2h + j low, u*2h + h + j high (read straight off the bytes)
    b = packed.reshape(n, units, h)
    padded = torch.nn.functional.pad(codes, (0, units * 2 * h - k)).reshape(n, units, 2, h)
    assert torch.equal(b & 15, padded[:, :, 0]) and torch.equal(b >> 4, padded[:, :, 1])


def test_nan_scale_byte_makes_its_outputs_nan():
    scheme = omniq.get_scheme("mxfp4", activation=None)
    qw = scheme.quantize(gen_weight(20, 64, 1, spread=0))
    qw.tensors["weight_scale"][3, 1] = 0xFF
    x = gen_x((3, 64), torch.float32, 2)
    check_kernel("triton.fp4.gemm", qw, x, None, torch.float32, "nan scale")


def test_interpreted_kernels_are_never_chosen_on_cpu():
    scheme = omniq.get_scheme("mxfp4", activation=None)
    qw = scheme.quantize(gen_weight(32, 64, 0))
    verdicts = {v.kernel: v for v in omniq.explain(qw, m=1, device="cpu")}
    for name in ("triton.fp4.splitk", "triton.fp4.gemm"):
        assert verdicts[name].status == "unavailable"
        assert "forced" in verdicts[name].reason
    y = omniq.linear(gen_x((2, 64), torch.float32, 0), qw)   # runs, on a non-Triton kernel
    assert y.shape == (2, 32)


def test_available_needs_the_interpreter_on_cpu(monkeypatch):
    from omniq.dispatch import get_kernel
    k = get_kernel("triton.gguf.gemm")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "does not compile for the CPU" in k.available(torch.device("cpu"))
    assert k.available(torch.device("mps")) is not None


def test_splitk_kernel_rejects_large_m_with_reason():
    from omniq.dispatch import Problem, get_kernel
    s = omniq.get_scheme("gguf", type="q4_k")
    why = get_kernel("triton.gguf.splitk").can_implement(Problem(s, 64, 256, 65, torch.bfloat16, torch.device("cpu")))
    assert why and "M <= 64" in why
    assert get_kernel("triton.gguf.gemm").can_implement(Problem(s, 64, 256, 65, torch.bfloat16,
                                                                 torch.device("cpu"))) is None
    why = get_kernel("triton.fp4.gemm").can_implement(
        Problem(omniq.get_scheme("mxfp4"), 64, 256, 1, torch.int8, torch.device("cpu")))
    assert why and "bf16" in why
    why = get_kernel("triton.fp4.dequant_mm").can_implement(
        Problem(omniq.get_scheme("mxfp4"), 64, 256, 16, torch.bfloat16, torch.device("cpu")))
    assert why and "M >= 128" in why


# ---- the PTX decoders, executed on the CPU ---------------------------------------------------
# Compiled NVIDIA kernels decode with the PTX strings below; CI has no GPU, so a small PTX
# interpreter (tests/_fp_ptx_util.py, written from the PTX ISA) runs the exact strings on every
# pair of bytes and the result is compared with the E2M1 table / integer codes of formats.md.
E2M1_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_value(code):
    return (-1.0 if code & 8 else 1.0) * E2M1_TABLE[code & 7]


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_fp4_ptx_decoder_on_every_byte_pair(half):
    import ml_dtypes
    import numpy as np
    from _fp_ptx_util import lanes, pack, run_ptx
    asm = tm.PTX_FP4_BF16 if half == "bf16" else tm.PTX_FP4_F16
    dt = ml_dtypes.bfloat16 if half == "bf16" else np.float16
    place = 2.0 ** (126 if half == "bf16" else 14)      # the placement's exponent offset
    # factors <= 2^offset, as in the kernels (group scale / row max <= 1)
    flo, fhi = pack(place * 0.25, place * 0.5, dt), pack(place * 0.125, place, dt)
    for h in range(1 << 16):
        b0, b1 = h & 0xFF, h >> 8
        out = run_ptx(asm, {0: 0, 1: 0, 2: h, 3: flo, 4: fhi})
        assert lanes(out[0], dt) == (e2m1_value(b0 & 15) * 0.25, e2m1_value(b1 & 15) * 0.5), hex(h)
        assert lanes(out[1], dt) == (e2m1_value(b0 >> 4) * 0.125, e2m1_value(b1 >> 4)), hex(h)


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_gguf_ptx_decoders_on_every_byte_pair(half):
    import ml_dtypes
    import numpy as np
    from _fp_ptx_util import lanes, pack, run_ptx
    dt = ml_dtypes.bfloat16 if half == "bf16" else np.float16
    i8 = tg.PTX_I8_BF16 if half == "bf16" else tg.PTX_I8_F16
    u4 = tg.PTX_U4_BF16 if half == "bf16" else tg.PTX_U4_F16
    a, c = pack(0.5, 0.25, dt), pack(-3.0, 2.0, dt)
    for h in range(0, 1 << 16, 3):
        b0, b1 = h & 0xFF, h >> 8
        q0, q1 = (b0 ^ 0x80) - 0x80, (b1 ^ 0x80) - 0x80          # int8 two's complement
        out = run_ptx(i8, {0: 0, 1: h, 2: a, 3: c})
        assert lanes(out[0], dt) == (float(dt(q0 * 0.5 - 3.0)), float(dt(q1 * 0.25 + 2.0))), hex(h)
        out = run_ptx(u4, {0: 0, 1: 0, 2: h, 3: a, 4: c, 5: c, 6: a})
        assert lanes(out[0], dt) == ((b0 & 15) * 0.5 - 3.0, (b1 & 15) * 0.25 + 2.0), hex(h)
        assert lanes(out[1], dt) == ((b0 >> 4) * -3.0 + 0.5, (b1 >> 4) * 2.0 + 0.25), hex(h)
