"""cuda.w8a8.gemv on a CPU: what it accepts and why not (can_implement reasons), the launch
configuration (every output row and every K step covered exactly once, 16-byte aligned, no
empty split), the activation quantizer's grid (every 16-byte vector of a row cast by exactly one
CTA), the compiled-variant defines (PDL / quantizer switches), the kernels' argument
lists, and that the registry / explain list it without a GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import omniq
from omniq.dispatch import Problem
from omniq.dispatch.registry import get_kernel
from omniq.kernels import cuda_w8a8_gemv as gemv
from omniq.kernels import nvrtc

KERNEL = "cuda.w8a8.gemv"
CUDA = torch.device("cuda")


def _problem(name="fp8", n=256, k=512, m=1, dtype=torch.bfloat16, **params):
    return Problem(omniq.get_scheme(name, **params), n, k, m, dtype, CUDA)


def test_registered_and_unavailable_on_cpu_with_a_reason():
    k = get_kernel(KERNEL)
    assert k.backend == "cuda" and set(k.schemes) == {"fp8", "int8"}
    assert k.priority > get_kernel("triton.w8a8.splitk").priority
    assert k.layout.name == "triton.w8a8.v1"   # shares the W8A8 weight copy
    why = k.available(torch.device("cpu"))
    assert why and "CUDA" in why


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_explain_lists_it_on_cpu(name):
    qw = omniq.get_scheme(name).quantize(torch.randn(32, 64), name="t.layer")
    verdicts = {v.kernel: v for v in omniq.explain(qw, m=4, device="cpu")}
    v = verdicts[KERNEL]
    assert v.status == "unavailable" and v.reason


@pytest.mark.parametrize("name,params", [("fp8", {}), ("fp8", {"weight_granularity": "tensor"}), ("int8", {})])
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accepts_its_scope(name, params, m, dtype):
    assert get_kernel(KERNEL).can_implement(_problem(name, 3000, 12288, m, dtype, **params)) is None
    assert get_kernel(KERNEL).can_implement(_problem(name, 1, 16, m, dtype, **params)) is None


@pytest.mark.parametrize("name,params,m,k,dtype,words", [
    ("fp8", {"activation": "static_tensor"}, 1, 512, torch.bfloat16, "triton.w8a8"),
    ("fp8", {"activation": "dynamic_tensor"}, 1, 512, torch.bfloat16, "per-token"),
    ("fp8", {"activation": None}, 1, 512, torch.bfloat16, "weight-only"),
    ("fp8", {"weight_granularity": "block", "activation": "block"}, 1, 512, torch.bfloat16, "per-token"),
    ("fp8", {"weight_granularity": "block"}, 1, 512, torch.bfloat16, "block"),
    ("int8", {"act_symmetric": False}, 1, 512, torch.bfloat16, "asymmetric"),
    ("int8", {"activation": "static_tensor"}, 1, 512, torch.bfloat16, "triton.w8a8"),
    ("int8", {"activation": None}, 1, 512, torch.bfloat16, "weight-only"),
    ("fp8", {}, 17, 512, torch.bfloat16, "M=17 > 16"),
    ("int8", {}, 40, 512, torch.bfloat16, "M=40 > 16"),
    ("fp8", {}, 1, 520, torch.bfloat16, "multiple of 16"),
    ("int8", {}, 4, 24, torch.float16, "multiple of 16"),
    ("fp8", {}, 1, 512, torch.float32, "bf16 or fp16"),
    ("int8", {}, 1, 1 << 17, torch.bfloat16, "overflow"),
])
def test_reasons(name, params, m, k, dtype, words):
    why = get_kernel(KERNEL).can_implement(_problem(name, 64, k, m, dtype, **params))
    assert why is not None and words in why, why


def test_forcing_it_on_cpu_fails_with_the_reason():
    qw = omniq.get_scheme("int8").quantize(torch.randn(32, 64), name="t.layer")
    with omniq.use_kernel(KERNEL), pytest.raises(omniq.KernelError, match="needs a CUDA device"):
        omniq.linear(torch.randn(2, 64), qw)


def _covered(m, n, k, sms, cfg):
    """Replay the kernel's index arithmetic: (row, step) -> how often some warp handles it."""
    lc = gemv.launch_config(m, n, k, sms, cfg)
    gx, split = lc["grid"]
    wn, wk, u = cfg["WN"], cfg["WK"], cfg["UNROLL"]
    steps = lc["steps"]
    rows = torch.zeros(n, dtype=torch.int64)
    seen = torch.zeros(steps, dtype=torch.int64)
    per = lc["steps_per_split"]
    for bx in range(gx):
        for w in range(wn):
            r0 = (bx * wn + w) * gemv.TILE_N
            rows[r0:min(r0 + gemv.TILE_N, n)] += 1
    for by in range(split):
        s_begin, s_end = by * per, min(by * per + per, steps)
        for w in range(wk):
            s = s_begin + w * u
            while s < s_end:
                for j in range(u):
                    if s + j < s_end:
                        seen[s + j] += 1
                s += wk * u
    return lc, rows, seen


@settings(max_examples=60)
@given(m=st.integers(1, 16), n=st.integers(1, 20000), k16=st.integers(1, 2048), sms=st.sampled_from((1, 8, 132)),
       wn=st.sampled_from((1, 2, 4)), wk=st.sampled_from((1, 2, 4, 8, 16)), unroll=st.sampled_from((1, 2, 4)),
       ctas=st.sampled_from((1, 4, 8, 16)))
def test_launch_config_covers_every_row_and_step_once(m, n, k16, sms, wn, wk, unroll, ctas):
    assume(wn * wk <= 32)
    k = 16 * k16
    cfg = dict(gemv.DEFAULT, WN=wn, WK=wk, UNROLL=unroll, ctas_per_sm=ctas)
    assume(gemv.smem_bytes(cfg, gemv.m_tiles(m)) <= gemv.SMEM_LIMIT)
    lc, rows, seen = _covered(m, n, k, sms, cfg)
    assert bool((rows == 1).all()), "an output row is computed by no CTA or by two"
    assert bool((seen == 1).all()), "a 64-byte K step is summed by no warp or by two"
    gx, split = lc["grid"]
    assert lc["block"] == (32 * wn * wk,) and lc["block"][0] <= 1024
    assert split >= 1 and (split - 1) * lc["steps_per_split"] < lc["steps"], "an empty split"
    assert lc["steps_per_split"] % (wk * unroll) == 0, "a split must be whole (WK x UNROLL)-step rounds"
    assert (lc["steps_per_split"] * gemv.STEP_K) % 16 == 0
    assert gx * lc["rows_per_cta"] >= n > (gx - 1) * lc["rows_per_cta"]
    assert lc["mt"] == (1 if m <= 8 else 2)
    assert split <= cfg.get("max_split", 64)
    assert gemv.smem_bytes(cfg, lc["mt"]) <= gemv.SMEM_LIMIT


def test_launch_config_fills_the_gpu_on_the_target_shapes():
    for n, k in [(8192, 8192), (12288, 3072), (3072, 12288)]:
        for m in (1, 16):
            cfg = gemv.config_for(m, n, k, fp8=True)
            lc = gemv.launch_config(m, n, k, 132, cfg)
            ctas = lc["grid"][0] * lc["grid"][1]
            assert ctas >= 132, (n, k, m, lc)


def test_launch_config_rejects_oversized_ctas():
    with pytest.raises(ValueError, match="warps"):
        gemv.launch_config(1, 64, 64, 132, dict(gemv.DEFAULT, WN=4, WK=16))


def test_smem_bytes_covers_the_reduction_buffer():
    # red[WK * OUTS] of acc_t (4 bytes), OUTS = 8 MT x 16 WN, as in the CUDA source
    assert "__shared__ acc_t red[WK * OUTS];" in gemv.CUDA_SOURCE
    for wn, wk in [(1, 4), (2, 4), (1, 16)]:
        cfg = dict(gemv.DEFAULT, WN=wn, WK=wk)
        assert gemv.smem_bytes(cfg, 2) >= wk * 16 * 16 * wn * 4


def test_m_tiles_rejects_out_of_range():
    with pytest.raises(ValueError):
        gemv.m_tiles(0)
    with pytest.raises(ValueError):
        gemv.m_tiles(17)


def test_defines_name_one_variant_per_configuration():
    cfg = dict(gemv.DEFAULT)
    d = gemv.defines_for(True, 2, torch.bfloat16, cfg)
    assert d["IS_FP8"] == 1 and d["MT"] == 2 and d["OUT_KIND"] == 1
    assert gemv.defines_for(True, 1, torch.float32, cfg)["OUT_KIND"] == 2
    assert gemv.defines_for(False, 1, torch.float16, cfg)["FP8_MODE"] == 0   # int8 ignores the fp8 mode
    keys = {tuple(sorted(gemv.defines_for(f, mt, dt, cfg).items()))
            for f in (True, False) for mt in (1, 2) for dt in (torch.float16, torch.bfloat16)}
    assert len(keys) == 8
    for name in d:   # every define is used by the source
        assert name in gemv.CUDA_SOURCE


def test_signature_matches_the_kernel_parameters():
    assert _params(gemv.CUDA_SOURCE, "w8a8_gemv") == gemv.SIGNATURE


def _quant_cover(m, k, sms, threads):
    """Replay w8a8_quant_act's index arithmetic: how often each (row, 8-element vector) is cast."""
    c_per_row, rows = gemv.quant_grid(m, k, sms, threads)
    v_count = k // 8
    seen = torch.zeros(rows, v_count, dtype=torch.int64)
    for row in range(rows):
        for c in range(c_per_row):
            for tid in range(threads):
                seen[row, tid + c * threads::c_per_row * threads] += 1
    return c_per_row, seen


@settings(max_examples=30)
@given(m=st.integers(1, 40), k8=st.integers(1, 4000), sms=st.sampled_from((1, 16, 132)),
       threads=st.sampled_from((32, 128, 256)))
def test_quantizer_grid_casts_every_vector_once(m, k8, sms, threads):
    k = 8 * k8
    c_per_row, seen = _quant_cover(m, k, sms, threads)
    assert seen.shape == (m, k8)
    assert bool((seen == 1).all()), "an activation vector is cast by no CTA or by two"
    assert 1 <= c_per_row <= max(1, sms // m), "about one CTA per SM at most"
    assert (c_per_row - 1) * threads < k8, "a CTA of the row with nothing to cast"


def test_quantizer_uses_several_ctas_for_long_rows():
    assert gemv.quant_grid(1, 12288, 132) == (6, 1)     # 1536 vectors, 256 threads: 6 rounds
    assert gemv.quant_grid(16, 12288, 132) == (6, 16)
    assert gemv.quant_grid(16, 3072, 132) == (2, 16)
    assert gemv.quant_grid(200, 4096, 132) == (1, 200)


def _params(source, name):
    import re
    params = re.search(name + r"\(([^)]*)\)", source).group(1).split(",")
    return "".join("p" if "*" in q else ("i" if q.split()[0] == "int" else "f") for q in params)


def test_quantizer_signature_matches_the_kernel_parameters():
    assert _params(gemv.QUANT_SOURCE, "w8a8_quant_act") == gemv.QUANT_SIGNATURE


def test_pdl_defaults_on_and_the_gemv_waits_after_its_first_weight_loads():
    assert gemv.DEFAULT["pdl"] and gemv.DEFAULT["quant"] in gemv.QUANTIZERS
    # the kernel waits on the quantizer after its first weight loads and before any activation load
    src = gemv.CUDA_SOURCE
    body = src[src.index("w8a8_gemv(const"):]
    first, wait, act = body.index("load_w<true>("), body.index("grid_dependency_wait()"), body.index("load_x(")
    assert first < wait < act
    assert "griddepcontrol.wait" in src and "griddepcontrol.launch_dependents" in gemv.QUANT_SOURCE


def test_all_variants_cover_pdl_on_off_and_the_quantizers():
    ks = gemv.all_variants()
    names = [k.name for k in ks]
    assert names.count("w8a8_quant_act") == 2      # int8 x bf16 / fp16
    gemvs = [k for k in ks if k.name == "w8a8_gemv"]
    assert len({k.key for k in gemvs}) == len(gemvs), "a variant listed twice"
    for k in gemvs:   # every dispatcher-reachable config compiles to one of these
        assert "#define MINB 1" in k.source


def test_unknown_quantizer_is_refused():
    p = types_prepared()
    with pytest.raises(omniq.KernelError, match="quant='nope'"):
        gemv.run_gemv(torch.zeros(1, 64, dtype=torch.bfloat16), p, None, cfg=dict(gemv.DEFAULT, quant="nope"))


def types_prepared():
    from omniq.kernels import triton_w8a8 as w8a8
    qw = omniq.get_scheme("fp8").quantize(torch.randn(32, 64), name="t.layer")
    return w8a8.prepare_w8a8(qw, torch.device("cpu"))


def test_quantize_cuda_checks_its_input():
    with pytest.raises(omniq.KernelError, match="int8 only"):
        gemv.quantize_cuda(torch.zeros(2, 16, dtype=torch.bfloat16), True)
    with pytest.raises(omniq.KernelError, match="K % 8"):
        gemv.quantize_cuda(torch.zeros(2, 12, dtype=torch.bfloat16), False)
    with pytest.raises(omniq.KernelError, match="bf16 / fp16"):
        gemv.quantize_cuda(torch.zeros(2, 16), False)


class _Recorder:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __call__(self, device, grid, block, args, shared_mem=0, pdl=False):
        self.log.append(dict(name=self.name, grid=tuple(grid), block=tuple(block), args=args, pdl=pdl))


@pytest.fixture
def recorded(monkeypatch):
    """run_gemv on the CPU with the NVRTC launches recorded instead of run."""
    from omniq.kernels import triton_w8a8 as w8a8
    log = []
    monkeypatch.setattr(gemv, "kernel_for", lambda defines, *a, **k: _Recorder(log, "gemv"))
    monkeypatch.setattr(gemv, "quant_kernel_for", lambda *a, **k: _Recorder(log, "quant"))

    def triton_quant(x, p, early_trigger=False):
        log.append(dict(name="triton_quant", early_trigger=early_trigger))
        return torch.zeros(x.shape, dtype=torch.int8), torch.ones(x.shape[0]), None
    monkeypatch.setattr(w8a8, "quantize_prepared_activation", triton_quant)
    # as on an sm_90 GPU: PDL launches are available
    monkeypatch.setattr(nvrtc, "pdl_reason", lambda device: None)
    qw = omniq.get_scheme("int8").quantize(torch.randn(48, 4096), name="t.layer")
    return log, w8a8.prepare_w8a8(qw, torch.device("cpu"))


@pytest.mark.parametrize("quant,pdl", [("cuda", True), ("cuda", False), ("triton", True), ("triton", False)])
def test_run_gemv_launches_quantizer_then_gemv(recorded, quant, pdl):
    log, p = recorded
    x = torch.randn(5, 4096).to(torch.bfloat16)
    gemv.run_gemv(x, p, None, cfg=dict(gemv.DEFAULT, quant=quant, pdl=pdl))
    assert [c["name"] for c in log] == [("quant" if quant == "cuda" else "triton_quant"), "gemv"]
    # both quantizers let a PDL GEMV start early: the Triton one only when asked to
    assert log[1]["pdl"] is pdl
    if quant == "triton":
        assert log[0]["early_trigger"] is pdl
    if quant == "cuda":
        q = log[0]
        assert q["grid"] == gemv.quant_grid(5, 4096, 4) and q["block"] == (gemv.QUANT_THREADS,)
        xa, qa, sa, k, ldx = q["args"]
        assert xa is x and qa.shape == (5, 4096) and qa.dtype == torch.int8 and sa.shape == (5,)
        assert (k, ldx) == (4096, 4096)
        assert log[1]["args"][1] is qa and log[1]["args"][3] is sa, "the GEMV reads this call's codes and scales"


@pytest.mark.parametrize("pdl_ok", [True, False])
def test_fp8_keeps_the_triton_quantizer_with_its_early_trigger(monkeypatch, pdl_ok):
    """fp8 always quantizes with Triton; with PDL available the quantizer triggers early and the
    GEMV launches with PDL, otherwise both are plain."""
    from omniq.kernels import triton_w8a8 as w8a8
    log = []
    monkeypatch.setattr(gemv, "kernel_for", lambda defines, *a, **k: _Recorder(log, "gemv"))
    monkeypatch.setattr(nvrtc, "pdl_reason", lambda device: None if pdl_ok else "compute capability 8.0 < 9.0")
    monkeypatch.setattr(w8a8, "quantize_prepared_activation", lambda x, p, early_trigger=False: (
        log.append(dict(name="triton_quant", early_trigger=early_trigger))
        or (torch.zeros(x.shape, dtype=torch.float8_e4m3fn), torch.ones(x.shape[0]), None)))
    p = w8a8.prepare_w8a8(omniq.get_scheme("fp8").quantize(torch.randn(48, 4096), name="t.layer"), torch.device("cpu"))
    gemv.run_gemv(torch.randn(3, 4096).to(torch.bfloat16), p, None, cfg=dict(gemv.DEFAULT, quant="cuda", pdl=True))
    assert [c["name"] for c in log] == ["triton_quant", "gemv"]
    assert log[0]["early_trigger"] is pdl_ok and log[1]["pdl"] is pdl_ok


def test_run_gemv_with_given_codes_never_uses_pdl(recorded):
    """The GEMV reads the weight before its griddepcontrol.wait; that is only safe right after this
    call's own quantizer, so precomputed codes mean a plain launch."""
    log, p = recorded
    x = torch.randn(2, 4096).to(torch.bfloat16)
    xq = (torch.zeros(2, 4096, dtype=torch.int8), torch.ones(2), None)
    gemv.run_gemv(x, p, None, cfg=dict(gemv.DEFAULT, pdl=True), xq=xq)
    assert [c["name"] for c in log] == ["gemv"] and log[0]["pdl"] is False
