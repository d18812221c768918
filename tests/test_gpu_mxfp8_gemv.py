"""cuda.mxfp8.gemv (CUDA C++ via NVRTC) compiled on a GPU against scheme.matmul: W8A8 (the Triton
quantizer first) and W8A16, M = 1..16, bf16 activations (fp16 is refused, and served by another
kernel), every scale rule, awkward N and K (K % 32 == 16 included), rows whose scales span many
octaves, NaN scales, NaN weight codes, split-K and single-split launches, every prefetch depth,
bias, CUDA-graph capture, and the decoded weight itself (identity activations) bit for bit."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.errors import KernelError
from omniq.kernels import cuda_mxfp8_gemv as mx8
from omniq.kernels import triton_mx as tm

from _int_util import assert_within, check_graph_replay, error_bound
from _scheme_util import make_tensor

GPU = torch.device("cuda")
KERNEL = "cuda.mxfp8.gemv"


def _weight(n, k, seed, spread):
    """Rows (and 32-column blocks) at scales 2^-spread .. 2^spread."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    rows = torch.randint(-spread, spread + 1, (n, 1), generator=g).float()
    cols = torch.randint(-spread, spread + 1, (1, -(-k // 32)), generator=g).float().repeat_interleave(32, 1)[:, :k]
    return w * torch.exp2(rows + cols) * 0.05


class _knobs:
    """Set module knobs of the kernel for one call (restored after)."""

    def __init__(self, **kw):
        self.kw = kw

    def __enter__(self):
        self.old = {k: getattr(mx8, k) for k in self.kw}
        for k, v in self.kw.items():
            setattr(mx8, k, v)

    def __exit__(self, *a):
        for k, v in self.old.items():
            setattr(mx8, k, v)


def _run(qw, x, bias, **knobs):
    with _knobs(**knobs), omniq.use_kernel(KERNEL):
        p = omniq.prepare(qw, GPU)
        return omniq.linear(x, p, bias)


def _check(qw, x, bias, what, **knobs):
    """The kernel against scheme.matmul (computed where the weight lives): NaN in the same places,
    elsewhere one output rounding and fp32 accumulation (weights and activations are exact), plus
    an fp16 subnormal ulp for tiny outputs."""
    y = _run(qw, x, bias, **knobs)
    dev = next(iter(qw.tensors.values())).device
    xc, bc, yc = x.to(dev), None if bias is None else bias.to(dev), y.to(dev)
    ref = qw.scheme.matmul(xc, qw, bc)
    assert torch.equal(torch.isnan(yc), torch.isnan(ref)), f"{what}: NaN placement differs"
    fin = ~torch.isnan(ref)
    bound = error_bound(xc, qw, ref, bc) + (2.0 ** -24 if x.dtype == torch.float16 else 0.0)
    assert_within(yc[fin], ref[fin], bound[fin], what)
    return y


@pytest.mark.gpu
@settings(max_examples=40)
@given(data=st.data())
def test_mxfp8_gemv_against_reference(data):
    act = data.draw(st.sampled_from(("mxfp8", None)))
    rule = data.draw(st.sampled_from(tuple(tm.RULES)))
    sch = omniq.get_scheme("mxfp8", activation=act, scale_rule=rule)
    dtype = torch.bfloat16
    n = data.draw(st.integers(1, 300))
    k = 16 * data.draw(st.integers(1, 80))
    spread = data.draw(st.sampled_from((0, 3, 20)))
    qw = sch.quantize(_weight(n, k, data.draw(st.integers(0, 2**31 - 1)), spread))
    m = data.draw(st.integers(1, 16))
    x = make_tensor((m, k), data.draw(st.sampled_from(("normal", "heavy", "sparse", "zero_rows"))),
                    data.draw(st.integers(0, 2**31 - 1)), 2.0).to(dtype)
    bias = None if data.draw(st.booleans()) else make_tensor((n,), "normal", 1).to(dtype)
    knobs = dict(TARGET_CTAS=data.draw(st.sampled_from((mx8.TARGET_CTAS, 1, 4096))),
                 PREFETCH=data.draw(st.sampled_from((None, 1, 2, 3, 4))),
                 NANCHK=data.draw(st.booleans()))
    _check(qw, x.to(GPU), None if bias is None else bias.to(GPU),
           f"act={act} {rule} N={n} K={k} M={m} {dtype} spread={spread} {knobs}", **knobs)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [48, 96, 1024])
def test_mxfp8_gemv_decodes_every_weight_exactly(k):
    """W8A16 with identity activations: y is the decoded weight, through every K position and
    both rows of a fragment; bit-exact (e4m3 x 2^(s - 127) rounded once to bf16)."""
    n = 72
    sch = omniq.get_scheme("mxfp8", activation=None)
    qw = sch.quantize(_weight(n, k, 5, 30))
    want = sch.dequantize(qw).T.to(torch.bfloat16)
    eye = torch.eye(k, device=GPU, dtype=torch.bfloat16)
    with omniq.use_kernel(KERNEL):
        p = omniq.prepare(qw, GPU)
        got = torch.cat([omniq.linear(eye[k0:k0 + 16], p) for k0 in range(0, k, 16)]).cpu()
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["scale", "code"])
def test_mxfp8_gemv_nan_rows(where):
    sch = omniq.get_scheme("mxfp8")
    n, k = 40, 256
    qw = sch.quantize(_weight(n, k, 2, 2))
    t = {kk: v.clone() for kk, v in qw.tensors.items()}
    if where == "scale":
        t["weight_scale"].view(torch.uint8)[3, 2] = 0xFF
    else:
        t["weight"].view(torch.uint8)[17, 100] = 0x7F
        t["weight"].view(torch.uint8)[30, 255] = 0xFF
    qw = type(qw)(sch, qw.shape, t, name=qw.name, validate=False)
    x = make_tensor((3, k), "normal", 4).to(torch.bfloat16).to(GPU)
    for target in (mx8.TARGET_CTAS, 1):
        _check(qw, x, None, f"NaN {where}", TARGET_CTAS=target)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["mxfp8", None])
def test_mxfp8_gemv_refuses_fp16(act):
    sch = omniq.get_scheme("mxfp8", activation=act)
    qw = sch.quantize(_weight(64, 128, 1, 1))
    p = tm.prepare_mxfp8(qw, GPU)
    with pytest.raises(KernelError, match="fp16"):
        mx8.run(torch.zeros(2, 128, device=GPU, dtype=torch.float16), p, None)
    # the dispatcher passes it to another kernel, which computes it
    x = make_tensor((2, 128), "normal", 3).to(torch.float16)
    y = omniq.linear(x.to(GPU), omniq.prepare(qw, GPU)).cpu()
    ref = sch.matmul(x, qw)
    assert (y.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


@functools.lru_cache(maxsize=None)
def _big_weight(n, k, act):
    return omniq.get_scheme("mxfp8", activation=act).quantize(_weight(n, k, 7, 2).to(GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["mxfp8", None])
@pytest.mark.parametrize("n,k", [(3072, 12288), (12288, 3072), (8192, 8192)])
@pytest.mark.parametrize("m", [1, 7, 16])
def test_mxfp8_gemv_benchmark_shapes(act, n, k, m):
    assert not torch.backends.cuda.matmul.allow_tf32
    qw = _big_weight(n, k, act)
    x = make_tensor((m, k), "normal", 8).to(GPU, torch.bfloat16)
    _check(qw, x, None, f"{act} {n}x{k} M={m}")


@pytest.mark.gpu
def test_mxfp8_gemv_graph_replay():
    sch = omniq.get_scheme("mxfp8")
    qw = sch.quantize(_weight(1024, 2048, 3, 2))
    check_graph_replay(sch, qw, (1, 4, 16), kernel=KERNEL)
