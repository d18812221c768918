"""Shared by test_triton_int.py (interpreter) and test_gpu_int.py (compiled): scheme strategies
for the integer and W8A8 families, activations with rounding ties, and the error bound."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

import omniq
from _scheme_util import make_tensor

ACT_DISTS = ("normal", "uniform", "sparse", "positive", "negative", "constant_rows", "zero_rows", "grid")

# output dtype -> relative size of one ulp (the kernel and the reference each round once)
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# dot operand dtype -> half an ulp (a weight rounded once to it)
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@st.composite
def affine_cases(draw, small_n: bool = True):
    """(scheme, N, K) for the integer weight-only family and msModelSlim W4A8."""
    fam = draw(st.sampled_from(("gptq", "gptq", "awq", "int8", "w4a8_dynamic")))
    hi_n = 48 if small_n else 160
    if fam == "gptq":
        bits = draw(st.sampled_from((4, 8)))
        g = draw(st.sampled_from((32, 64, 128, -1)))
        sch = omniq.get_scheme("gptq", bits=bits, group_size=g, sym=draw(st.booleans()),
                               desc_act=draw(st.booleans()),
                               checkpoint_format=draw(st.sampled_from(("gptq", "gptq_v2"))))
        f = 32 // bits
        n = draw(st.integers(1, hi_n // f)) * f
        gg = 64 if g == -1 else g
        k = max(f, draw(st.integers(1, 3)) * gg + draw(st.sampled_from((-f, 0, f))))
    elif fam == "awq":
        g = draw(st.sampled_from((32, 64, -1)))
        sch = omniq.get_scheme("awq", group_size=g)
        n = draw(st.integers(1, hi_n // 8)) * 8
        k = draw(st.integers(1, 3)) * (g if g > 0 else 48)
    elif fam == "int8":
        sch = omniq.get_scheme("int8", activation=None)
        n = draw(st.integers(1, hi_n))
        k = draw(st.integers(1, 300))
    else:
        v = draw(st.sampled_from(("1.0.0", "0")))
        if v == "0":
            g = draw(st.sampled_from((32, 64)))
            sch = omniq.get_scheme("w4a8_dynamic", version="0", group_size=g)
            n = draw(st.integers(1, hi_n))
            k = draw(st.integers(1, 3)) * g
        else:
            sch = omniq.get_scheme("w4a8_dynamic", row_parallel=False)
            n = draw(st.integers(1, hi_n // 2)) * 2
            k = draw(st.integers(1, 300))
    return sch, n, k


@st.composite
def w8a8_cases(draw, small_n: bool = True):
    """(scheme, N, K) for fp8 / int8 W8A8 (and 8-bit weight-only) and msModelSlim W8A8."""
    fam = draw(st.sampled_from(("fp8", "fp8", "int8", "int8", "w8a8", "w8a8_dynamic")))
    hi_n = 48 if small_n else 160
    n = draw(st.integers(1, hi_n))
    k = draw(st.integers(1, 300))
    if fam == "fp8":
        kind = draw(st.sampled_from(("token", "token_tensor_w", "tensor", "static", "block", "weight_only")))
        params = {"token": dict(), "token_tensor_w": dict(weight_granularity="tensor"),
                  "tensor": dict(activation="dynamic_tensor"), "static": dict(activation="static_tensor"),
                  "block": dict(weight_granularity="block", activation="block"),
                  "weight_only": dict(activation=None)}[kind]
        sch = omniq.get_scheme("fp8", **params)
    elif fam == "int8":
        act = draw(st.sampled_from(("dynamic_token", "static_tensor", None)))
        sch = omniq.get_scheme("int8", activation=act, act_symmetric=draw(st.booleans()) if act else True)
    elif fam == "w8a8":
        sch = omniq.get_scheme("w8a8", deq_scale_dtype=draw(st.sampled_from(("float32", "int64"))))
    else:
        g = draw(st.sampled_from((-1, 32, 64)))
        sch = omniq.get_scheme("w8a8_dynamic", group_size=g)
        if g > 0:
            k = draw(st.integers(1, 4)) * g
    return sch, n, k


def quantized(sch, n: int, k: int, seed: int, x_sample: torch.Tensor | None = None):
    """A weight of the scheme (static activation parameters calibrated on x_sample)."""
    w = make_tensor((n, k), "normal", seed) * 0.1
    qw = sch.quantize(w, name="test.layer")
    if x_sample is not None:
        qw = sch.calibrate(qw, x_sample.reshape(-1, k).float())
    return qw


@st.composite
def activations(draw, k: int, max_m: int, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """x [M, K] or [B, S, K] with M <= max_m, in a drawn dtype, moderate magnitude."""
    m = draw(st.one_of(st.just(1), st.integers(1, max_m)))
    shape = (m, k)
    if m > 1 and draw(st.booleans()):
        shape = (2, m // 2, k) if m % 2 == 0 else (1, m, k)
    dist = draw(st.sampled_from(ACT_DISTS))
    mag = 10.0 ** draw(st.floats(-2, 1))
    dtype = draw(st.sampled_from(dtypes))
    return make_tensor(shape, dist, draw(st.integers(0, 2**31 - 1)), mag).to(dtype)


# sm_90 fp8 MMAs add their products into the accumulator with fewer bits than fp32: each k32
# instruction may lose up to about 2^-13 of the magnitude it sums (DeepSeek-V3 report section
# 3.3.2; 2^-13.6 measured, benchmarks/results/h200-2026-11-29e/probe_fp8_accuracy.txt)
FP8_MMA_REL = 2.0**-13


def fp8_mma_rel(sch, k: int) -> float:
    """dot_rel for a kernel that may run fp8 x fp8 MMAs over all of K without promoting its
    accumulator: one FP8_MMA_REL per 32-wide instruction (0 for a scheme without fp8 codes)."""
    return FP8_MMA_REL * -(-k // 32) if sch.name == "fp8" and sch.activation is not None else 0.0


def error_bound(x: torch.Tensor, qw, ref: torch.Tensor, bias: torch.Tensor | None, dot_rel: float = 0.0):
    """Elementwise bound on |kernel - reference|: one output rounding on each side, fp32
    accumulation over K (and `dot_rel` for weights rounded to the dot dtype), relative to
    sum_k |x| |W| (+|bias|)."""
    k = qw.shape[1]
    xf = qw.scheme.quantize_activation(x.reshape(-1, k).float(), qw)
    mag = xf.abs() @ qw.scheme.dequantize(qw).abs().T
    if bias is not None:
        mag = mag + bias.float().abs()
    mag = mag.reshape(ref.shape)
    return ULP[x.dtype] * ref.float().abs() + (k * 2.0**-22 + dot_rel) * mag + 1e-30


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str):
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
    err = (y.float() - ref.float()).abs()
    bad = ~(err <= bound)  # NaN fails
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; worst err "
                           f"{float(err[bad].max())} vs bound {float(bound[bad].min())}")


def _e4m3_midpoints(n: int, g: torch.Generator) -> torch.Tensor:
    codes = torch.randint(0, 0x7E, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    lo = codes.view(torch.float8_e4m3fn).float()
    hi = (codes + 1).view(torch.float8_e4m3fn).float()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return sign * (lo + hi) / 2


def tie_rows(name: str, m: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose scaled values sit exactly halfway between two codes: an fp8 row with amax 448
    (scale 1) of E4M3 midpoints, an int8 row with amax 127 (scale 1) of half-integers, and
    quarter-grid values for the static scales (powers of two)."""
    g = torch.Generator().manual_seed(seed)
    if name == "fp8":
        x = _e4m3_midpoints(m * k, g).reshape(m, k)
        x[:, 0] = 448.0
    else:
        x = (torch.randint(-254, 255, (m, k), generator=g) + 0.5).float() / 2
        x[:, 0] = 127.0
    return x


def fake_from_kernel(qw, p, x):
    """The activation the W8A8 kernels multiply: their quantizer's codes times its scales."""
    from omniq.kernels import triton_w8a8 as w8a8
    q, s, azp = w8a8.quantize_prepared_activation(x, p)
    if p.act == w8a8.ACT_BLOCK:
        m, k = x.shape
        nb = s.shape[1]
        qf = torch.zeros(m, nb * w8a8.BLOCK, device=q.device)
        qf[:, :k] = q.float()
        return (qf.reshape(m, nb, w8a8.BLOCK) * s[..., None]).reshape(m, -1)[:, :k]
    if p.act == w8a8.ACT_STATIC_OFFSET:
        return (q.float() - p.input_zero_point) * p.input_scale
    qd = q.double() if q.dtype == torch.int8 else q.float().double()
    if azp is not None:
        qd = qd - azp.double()[:, None]
    return qd.float() * s[:, None]


def check_graph_replay(sch, qw, ms, dot_rel: float = 0.0, kernel: str | None = None):
    """Capture omniq.linear at each M in a CUDA graph (the choice made and the kernel compiled
    outside the capture), replay with new inputs twice, and compare every replay with
    scheme.matmul. `kernel` pins one kernel; `dot_rel` as in error_bound."""
    gpu = torch.device("cuda")
    k = qw.shape[1]
    p = omniq.prepare(qw, gpu, torch.bfloat16, kernel=kernel)
    static_x = {m: torch.zeros(m, k, device=gpu, dtype=torch.bfloat16) for m in ms}
    for xs in static_x.values():
        omniq.linear(xs, p)
    torch.cuda.synchronize()
    graphs, outs = {}, {}
    for m, xs in static_x.items():
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs[m] = omniq.linear(xs, p)
        graphs[m] = g
    for trial in range(2):
        for m, xs in static_x.items():
            x = make_tensor((m, k), "normal", 100 * trial + m).to(torch.bfloat16)
            xs.copy_(x.to(gpu))
            graphs[m].replay()
            torch.cuda.synchronize()
            ref = sch.matmul(x, qw)
            assert_within(outs[m].cpu(), ref, error_bound(x, qw, ref, None, dot_rel),
                          f"graph replay {sch.key} M={m} {kernel or ''}")
