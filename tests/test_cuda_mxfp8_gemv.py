"""cuda.mxfp8.gemv on the CPU: the kernel's bit-level arithmetic transliterated to torch and held
against independent oracles (torch's float8_e4m3fn, math.ldexp, scheme.dequantize and
scheme.quantize_activation), plus its launch arithmetic, signature, variants and the reasons it
gives. GPU runs are in tests/test_gpu_mxfp8_gemv.py."""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omniq
from omniq.dispatch import Problem, get_kernel
from omniq.kernels import cuda_mxfp8_gemv as mx8
from omniq.kernels import triton_mx as tm

from _scheme_util import make_tensor

KERNEL = "cuda.mxfp8.gemv"
CPU = torch.device("cpu")


# ---- the kernel's bit formulas, in torch (int64 for unsigned 32-bit words) --------------------
def _bf16(bits: torch.Tensor) -> torch.Tensor:
    """16-bit patterns (int64) -> their bf16 values as fp32."""
    return (bits.to(torch.int64) << 16).to(torch.int32).view(torch.float32)


def _round_bf16(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest-even bf16 (the fma.rn.bf16x2 result for an exact fp32 product), as fp32."""
    return v.to(torch.bfloat16).float()


def decode4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """decode4 of the CUDA source without the factor: words -> (lo, hi) bf16x2 words."""
    m = 0xFFFFFFFF
    lo_b = ((w << 4) & m) & 0xF0F0F0F0
    hi_b = ((w >> 4) & 0x07070707) | (w & 0x80808080)

    def perm(a, b, sel):   # __byte_perm(a, b, sel)
        src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
        return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))
    return perm(lo_b, hi_b, 0x5140), perm(lo_b, hi_b, 0x7362)


def factor_bits(srel: int) -> int:
    return (srel - 6) << 7 if srel >= 7 else 1 << srel


def decoded_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Byte codes (any shape, K last, K % 4 == 0) -> the kernel's bf16 values (x 2^-120), fp32."""
    b = codes.to(torch.int64)
    w = b[..., 0::4] | (b[..., 1::4] << 8) | (b[..., 2::4] << 16) | (b[..., 3::4] << 24)
    lo, hi = decode4(w)
    out = torch.stack([_bf16(lo & 0xFFFF), _bf16(lo >> 16), _bf16(hi & 0xFFFF), _bf16(hi >> 16)], -1)
    return out.flatten(-2)


def test_decode_is_e4m3_times_2_pow_minus_120_for_every_code():
    codes = torch.arange(256, dtype=torch.int64).reshape(64, 4)
    got = decoded_bytes(codes).flatten()
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    fin = ~torch.isnan(want)
    assert torch.equal(got[fin], want[fin] * 2.0 ** -120)
    # sign of zero survives (code 0x80 is -0)
    assert torch.signbit(got[0x80]) and not torch.signbit(got[0])


def test_factor_is_2_pow_srel_minus_133():
    for srel in range(1, tm.SREL_TOP + 1):
        v = float(_bf16(torch.tensor([factor_bits(srel)]))[0])
        assert v == math.ldexp(1.0, srel - 133), srel


def test_emulated_formulas_are_the_kernels():
    """The transliterations above use the CUDA source's own constants."""
    src = " ".join(mx8.SOURCE.split())
    for line in ("(w << 4) & 0xF0F0F0F0u", "((w >> 4) & 0x07070707u) | (w & 0x80808080u)",
                 "__byte_perm(l, h, 0x5140)", "__byte_perm(l, h, 0x7362)",
                 "srel >= 7u ? (srel - 6u) << 7 : 1u << srel", "(v.x & 0x7F7F7F7Fu) + 0x01010101u",
                 "scales + (long)(t >> 1) * N + ra"):
        assert line in src, line


def test_nan_test_flags_exactly_the_nan_bytes():
    words = torch.randint(0, 2**32, (4096,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    words[:256] = torch.arange(256) * 0x01010101           # every byte value in every position
    flag = (((words & 0x7F7F7F7F) + 0x01010101) & 0x80808080)
    for i in range(4):
        b = (words >> (8 * i)) & 0xFF
        nan = b.to(torch.uint8).view(torch.float8_e4m3fn).float().isnan()
        assert torch.equal(((flag >> (8 * i)) & 0x80) != 0, nan)


def _weight(n, k, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    rows = torch.randint(-spread, spread + 1, (n, 1), generator=g).float()
    cols = torch.randint(-spread, spread + 1, (1, -(-k // 32)), generator=g).float().repeat_interleave(32, 1)[:, :k]
    return w * torch.exp2(rows + cols)


def kernel_weight(p) -> torch.Tensor:
    """W as the kernel multiplies it: decode x factor2 rounded to bf16 (fma.rn.bf16x2), then the
    epilogue's 2^rexp (fp32), indexing scales[k >> 5, n] as load_step does."""
    n, k = p.n, p.k
    d = decoded_bytes(p.weight.view(torch.uint8))
    srel = p.scales[torch.arange(k) >> 5].t().to(torch.int64)            # [N, K]
    fbits = torch.where(srel >= 7, (srel - 6) << 7, 1 << srel.clamp(max=6))
    w = _round_bf16(d * _bf16(fbits))
    rexp = p.rexp.to(torch.int64)
    rowf = torch.where(rexp == tm.REXP_NAN, float("nan"), torch.ldexp(torch.ones(n), rexp.float()))
    return w * rowf[:, None]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k16=st.integers(1, 24), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from((0, 8, 40, 60)), rule=st.sampled_from(("floor", "even", "rceil")))
def test_decoded_weight_is_the_dequantized_weight_bit_for_bit(n, k16, seed, spread, rule):
    """Groups within 2^124 of their row's largest: the kernel's weight equals scheme.dequantize."""
    k = 16 * k16
    sch = omniq.get_scheme("mxfp8", scale_rule=rule)
    qw = sch.quantize(_weight(n, k, seed, spread))
    p = tm.prepare_mxfp8(qw, CPU)
    assert torch.equal(kernel_weight(p), sch.dequantize(qw))


def test_nan_scale_row_is_flagged():
    sch = omniq.get_scheme("mxfp8")
    qw = sch.quantize(_weight(8, 64, 1, 2))
    s = qw.tensors["weight_scale"].clone()
    s[3, 1] = 0xFF
    qw = type(qw)(sch, qw.shape, {**qw.tensors, "weight_scale": s}, validate=False)
    w = kernel_weight(tm.prepare_mxfp8(qw, CPU))
    assert w[3].isnan().all() and not w[torch.arange(8) != 3].isnan().any()


# ---- host side: launch arithmetic, signature, variants, reasons -------------------------------
@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 40000), k16=st.integers(1, 1000), target=st.sampled_from((1, 528, 4096)),
       capacity=st.sampled_from((None, 1, 132, 528, 660)))
def test_launch_config_covers_every_row_and_step(m, n, k16, target, capacity):
    k = 16 * k16
    tiles, splits, bps, mt = mx8.launch_config(m, n, k, target, capacity)
    steps = -(-k // mx8.STEP_K)
    assert tiles * 64 >= n > (tiles - 1) * 64
    assert splits * bps >= steps > (splits - 1) * bps
    assert mt * 8 >= m and (mt == 1 or m > 8)
    if capacity and tiles <= capacity:   # one wave whenever the row tiles alone fit in one
        assert tiles * splits <= capacity


def test_launch_config_keeps_one_wave():
    """8192 rows (128 CTAs of 64) at a 528-CTA target: ceil gives 5 splits (640 CTAs), which is
    one wave at 5 resident CTAs per SM (660) and a 112-CTA second wave at 4 (528)."""
    from omniq.kernels import cuda_common
    assert cuda_common.launch_config(16, 8192, 512, 528, 64, capacity=660)[1] == 5
    assert cuda_common.launch_config(16, 8192, 512, 528, 64, capacity=528)[1] == 4
    assert cuda_common.launch_config(16, 8192, 512, 528, 64)[1] == 5


def test_signature_matches_kernel_parameters():
    head = re.search(r"mxfp8_gemv\((.*?)\)\s*\{", mx8.SOURCE, re.S).group(1)
    params = [p.strip() for p in head.split(",")]
    kinds = "".join("p" if "*" in p else ("f" if p.startswith("float") else "i") for p in params)
    assert kinds == mx8.SIGNATURE


def test_variants_and_defines():
    vs = mx8.all_variants()
    assert len({v.key for v in vs}) == len(vs)
    assert all("#define BF16 1\n" in v.source for v in vs)


def _why(m=1, dtype=torch.bfloat16, k=256, name="mxfp8", **params):
    return get_kernel(KERNEL).can_implement(Problem(omniq.get_scheme(name, **params), 64, k, m, dtype, CPU))


def test_reasons():
    k = get_kernel(KERNEL)
    assert "CUDA" in k.available(CPU)
    assert _why() is None and _why(m=16) is None
    assert _why(activation=None) is None
    assert "fp16" in _why(dtype=torch.float16) and "fp16" in _why(dtype=torch.float16, activation=None)
    assert "M=17" in _why(m=17)
    assert "must be bf16" in _why(dtype=torch.float32)
    assert "K % 16" in _why(k=40)
    assert "mxfp8" in k.serves(omniq.get_scheme("mxfp4"))
    assert k.priority > get_kernel("triton.mxfp8.splitk").priority


def test_dispatch_names_it_on_cpu():
    qw = omniq.get_scheme("mxfp8").quantize(torch.randn(64, 128))
    v = {r.kernel: r for r in omniq.explain(qw, m=4, device="cpu")}
    assert v[KERNEL].status == "unavailable" and "CUDA" in v[KERNEL].reason


def test_prepared_forms_it_refuses_say_why():
    sch = omniq.get_scheme("mxfp8")
    assert mx8.unsupported(tm.prepare_mxfp8(sch.quantize(_weight(16, 96, 0, 1)), CPU)) is None
    assert "K % 16" in mx8.unsupported(tm.prepare_mxfp8(sch.quantize(_weight(16, 40, 0, 1)), CPU))
    assert mx8.activation_reason(omniq.get_scheme("mxfp8", activation=None), torch.float16)
    with pytest.raises(Exception, match="M=17"):
        p = tm.prepare_mxfp8(sch.quantize(_weight(16, 96, 0, 1)), CPU)
        mx8.run(torch.zeros(17, 96, dtype=torch.bfloat16), p, None)


def test_a_one_row_weight_is_accepted():
    # N = 1: the [G, 1] scale tensor's row stride is free (torch reports e.g. (1, 2)); the kernel
    # indexes scales[g * N + r], which is right for it (found by the GPU property test)
    for k in (16, 48, 1024):
        p = tm.prepare_mxfp8(omniq.get_scheme("mxfp8").quantize(torch.randn(1, k)), CPU)
        assert mx8.unsupported(p) is None
