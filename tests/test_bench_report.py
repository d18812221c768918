"""benchmarks/run.py's plain-Python parts: the rotating copies of --graph (made by
omniq.dispatch.rotation: clone_prepared, the copy count; and the rounds per graph), the graph timing arithmetic (with a stand-in for CUDA graphs),
the scheme -> issue method map, the markdown report and --from-json, and --chosen-only."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omniq
from omniq.dispatch import rotation

ROOT = Path(__file__).resolve().parent.parent


def _load_run():
    spec = importlib.util.spec_from_file_location("omniq_bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


run = _load_run()


# ---- clone_prepared ---------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Prep:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    extra: tuple = ()
    n: int = 0
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class _Frozen:
    t: torch.Tensor
    tag: str = "x"


Pair = namedtuple("Pair", "a b")


class _Plain:
    def __init__(self, d):
        self.d = d
        self.scheme = omniq.get_scheme("int8")


def _all_tensors(obj, acc=None):
    """An oracle walk independent of rotation.prepared_tensors: the tensors of the test objects above."""
    acc = [] if acc is None else acc
    if isinstance(obj, torch.Tensor):
        if not any(t is obj for t in acc):
            acc.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _all_tensors(v, acc)
    elif isinstance(obj, dict):
        for v in obj.values():
            _all_tensors(v, acc)
    elif isinstance(obj, (_Prep, _Frozen, _Plain, omniq.QuantizedWeight)):
        for v in vars(obj).values():
            _all_tensors(v, acc)
    return acc


def _assert_independent_copy(orig, clone):
    a, b = _all_tensors(orig), _all_tensors(clone)
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert y is not x and y.data_ptr() != x.data_ptr()
        assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
        assert torch.equal(x, y)
    # writing the copy leaves the original as it was
    before = [x.clone() for x in a]
    for y in b:
        y.zero_()
    assert all(torch.equal(x, z) for x, z in zip(a, before))


@given(n=st.integers(1, 9), k=st.integers(1, 9), has_zeros=st.booleans(), dtype=st.sampled_from(
    [torch.int32, torch.uint8, torch.float32, torch.bfloat16, torch.float8_e4m3fn]))
def test_clone_prepared_copies_every_tensor_and_shares_the_rest(n, k, has_zeros, dtype):
    g = torch.Generator().manual_seed(n * 31 + k)
    qweight = (torch.randn(n, k, generator=g) * 5).to(dtype)
    scales = torch.rand(k, n, generator=g).t()  # non-contiguous: strides must survive
    shared = torch.arange(n)
    p = _Prep(qweight, scales, torch.ones(n) if has_zeros else None,
              extra=(shared, [shared, {"w": _Frozen(torch.randn(3, generator=g))}], Pair(1, torch.zeros(2)), "s"),
              n=n, name="layer")
    c = rotation.clone_prepared(p)
    assert type(c) is _Prep and c is not p
    _assert_independent_copy(p, c)
    assert c.n == n and c.name == "layer" and c.extra[3] == "s"
    assert (c.zeros is None) == (not has_zeros)
    # one tensor held twice stays one tensor (aliasing kept), types of containers kept
    assert c.extra[0] is c.extra[1][0]
    assert isinstance(c.extra[2], Pair) and c.extra[2].a == 1
    assert isinstance(c.extra[1][1]["w"], _Frozen) and c.extra[1][1]["w"].tag == "x"
    nbytes = sum(t.numel() * t.element_size() for t in _all_tensors(p))
    assert rotation.prepared_nbytes(p) == nbytes
    assert rotation.prepared_nbytes(c) == nbytes


def test_clone_prepared_of_plain_objects_tensors_and_quantized_weights():
    t = torch.randn(4, 4)
    ct = rotation.clone_prepared(t)
    assert ct is not t and torch.equal(ct, t) and ct.data_ptr() != t.data_ptr()
    d = {"a": torch.randn(3), "b": (torch.randn(2), 5)}
    _assert_independent_copy(d, rotation.clone_prepared(d))
    plain = _Plain({"w": torch.randn(5)})
    cp = rotation.clone_prepared(plain)
    _assert_independent_copy(plain, cp)
    assert cp.scheme is plain.scheme  # a scheme holds no tensor: shared, not copied
    qw = omniq.get_scheme("gptq", bits=4, group_size=64).quantize(torch.randn(32, 128) * 0.02)
    cq = rotation.clone_prepared(qw)
    assert isinstance(cq, omniq.QuantizedWeight) and cq.scheme is qw.scheme and cq.shape == qw.shape
    _assert_independent_copy(qw, cq)
    # nothing to copy: the object itself comes back
    nothing = _Plain({"k": 3})
    assert rotation.clone_prepared(nothing) is nothing
    assert rotation.prepared_tensors(nothing) == [] and rotation.prepared_nbytes(nothing) == 0


@pytest.mark.parametrize("spec", ["int8", "gptq:bits=4:group_size=64", "fp8"])
def test_a_kernel_on_a_cloned_layout_gives_the_same_output(spec):
    """The real prepared layouts of this machine's kernels: a clone computes what the original does."""
    from omniq.dispatch import Problem, candidates
    _, scheme = run.parse_scheme(spec)
    torch.manual_seed(0)
    n, k, m = 64, 256, 3
    qw = scheme.quantize(torch.randn(n, k) * 0.02)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    dev = torch.device("cpu")
    tried = 0
    for kern in candidates(Problem(scheme, n, k, m, torch.bfloat16, dev)):
        prep = kern.layout.prepare(qw, dev)
        if not rotation.prepared_tensors(prep):
            continue  # opaque packed data (fbgemm): nothing clone_prepared could copy
        clone = rotation.clone_prepared(prep)
        ptrs = {t.data_ptr() for t in rotation.prepared_tensors(prep)}
        assert not ptrs & {t.data_ptr() for t in rotation.prepared_tensors(clone)}, kern.name
        assert torch.equal(kern.run(x, prep, None), kern.run(x, clone, None)), kern.name
        tried += 1
    assert tried


# ---- copies and rounds ------------------------------------------------------------------------
@given(nbytes=st.integers(1, 1 << 31), l2=st.integers(1 << 20, 1 << 28))
def test_copies_for_overflows_l2_three_times_or_hits_the_cap(nbytes, l2):
    c = rotation.copies_for(nbytes, l2)
    assert 1 <= c <= rotation.MAX_COPIES
    if c < rotation.MAX_COPIES:
        assert c * nbytes >= 3 * l2 or c == 1
    if c > 1:
        assert (c - 1) * nbytes < 3 * l2  # no more copies than needed
    # the H200's numbers: a bf16 8192 x 8192 weight (128 MiB) against a 60 MiB L2 -> 2 copies
    assert rotation.copies_for(8192 * 8192 * 2, 60 << 20) == 2


@given(round_us=st.floats(0.5, 50_000), copies=st.integers(1, 8))
def test_choose_inner_reaches_the_target_within_the_call_cap(round_us, copies):
    inner = run.choose_inner(round_us, copies)
    assert inner >= 1
    assert inner * copies <= max(run.GRAPH_MAX_CALLS, copies)
    if (inner + 1) * copies <= run.GRAPH_MAX_CALLS:  # not capped: the target is met, and not overshot
        assert inner * round_us >= run.GRAPH_TARGET_US or math.isclose(inner * round_us, run.GRAPH_TARGET_US)
        assert inner == 1 or (inner - 1) * round_us < run.GRAPH_TARGET_US


# ---- graph timing with a stand-in for CUDA graphs ---------------------------------------------
class _FakeGraph:
    def __init__(self, fns, rounds, per_call_us):
        self.fns, self.rounds, self.per_call_us = fns, rounds, per_call_us

    def replay(self):
        for _ in range(self.rounds):
            for f in self.fns:
                f()


def test_graph_timing_divides_a_replay_by_its_calls(monkeypatch):
    """Each replay (per the stand-in clock: 10 us of launch + 7 us per call) is divided by
    inner x C; inner comes from the one-round replay; every copy is called in the graph."""
    captured = []
    launch_us, call_us = 10.0, 7.0

    def fake_capture(fns, device, rounds=1):
        captured.append(rounds)
        return _FakeGraph(fns, rounds, call_us)

    def fake_replay(g, n):
        for _ in range(n):
            g.replay()
        return [launch_us + call_us * g.rounds * len(g.fns)] * n

    monkeypatch.setattr(run, "_capture", fake_capture)
    monkeypatch.setattr(run, "_replay_us", fake_replay)
    timer = run.Timer(torch.device("cpu"), budget_s=0.01, max_reps=20, graph=True, slow_s=10.0, flush=False)
    timer.rotating = True  # as on a GPU with --graph
    calls = [0, 0, 0]
    fns = [lambda i=i: calls.__setitem__(i, calls[i] + 1) for i in range(3)]
    t = timer(fns)
    inner = run.choose_inner(launch_us + 3 * call_us, 3)
    assert captured == [1, inner]
    assert t["inner"] == inner and t["copies"] == 3
    assert t["how"] == f"cuda graph, 3 rotating copies, inner {inner}"
    assert t["us"] == pytest.approx((launch_us + call_us * inner * 3) / (inner * 3))
    assert t["us"] < call_us + launch_us / 3  # the launch is shared by the calls of a replay
    assert min(calls) > 0 and t["n"] >= 5


def test_failed_capture_falls_back_to_eager_timing(monkeypatch):
    monkeypatch.setattr(run, "_capture", lambda fns, device, rounds=1: None)
    timer = run.Timer(torch.device("cpu"), budget_s=0.01, max_reps=5, graph=True, slow_s=10.0, flush=False)
    timer.rotating = True
    t = timer([lambda: None, lambda: None])
    assert "graph capture failed" in t["how"] and "copies" not in t and t["us"] >= 0


def test_copies_only_when_timing_graphs_on_a_gpu():
    timer = run.Timer(torch.device("cpu"), budget_s=0.01, max_reps=5, graph=True, slow_s=10.0)
    assert timer.copies(1) == 1  # a CPU never rotates (its path is unchanged)
    timer.rotating, timer.l2_bytes = True, 60 << 20
    assert timer.copies(32 << 20) == rotation.copies_for(32 << 20, 60 << 20) == 6


# ---- scheme -> method of the issue ------------------------------------------------------------
@pytest.mark.parametrize("spec,title", [
    ("gptq:bits=4:group_size=128", "int4 W4A16 g128"), ("awq:group_size=128", "int4 W4A16 g128"),
    ("fp8", "fp8 W8A8 dynamic per-token"), ("int8", "int8 W8A8 dynamic per-token"),
    ("mxfp4:activation=None", "mxfp4 weight-only"), ("nvfp4:activation=None", "nvfp4 weight-only"),
    ("mxfp8", "mxfp8 W8A8"), ("gguf:type=q4_k", "GGUF q4_k"), ("gguf:type=q8_0", "GGUF q8_0"),
    ("gptq:bits=8:group_size=128", run.OTHER), ("int8:activation=None", run.OTHER), ("mxfp4", run.OTHER),
    ("fp8:weight_granularity=block:activation=block", run.OTHER), ("gguf:type=q6_k", run.OTHER),
])
def test_method_of_maps_the_issue_schemes(spec, title):
    _, scheme = run.parse_scheme(spec)
    assert run.method_of(spec, scheme.key) == title
    assert run.method_of(spec) == title  # from the label alone (a JSON without scheme_key)


def test_every_peer_method_named_in_the_map_is_one_build_peers_makes():
    """The CPU peers' method strings: those of the issue's methods must appear in METHODS."""
    peers = run.build_peers(torch.randn(64, 256) * 0.02, torch.device("cpu"))
    made = {method for method, _ in peers.values()}
    named = {pm for m in run.METHODS for pm in m.peer_methods}
    for want in ("int4 W4A16 g128", "fp8 W8A8 dynamic", "int8 W8A8 dynamic"):
        assert want in made and want in named


# ---- the markdown report ----------------------------------------------------------------------
def _row(scheme, key, n, k, m, kernel, us, base_us, chosen=True, error=None):
    r = {"scheme": scheme, "scheme_key": key, "n": n, "k": k, "m": m, "kernel": kernel, "chosen": chosen,
         "base": "bf16", "base_us": base_us}
    if error:
        r["error"] = error
    else:
        r.update(us=us, speedup=base_us / us, err=0.0, timing="cuda graph, 2 rotating copies, inner 7")
    return r


def _synthetic():
    key = "gptq(bits=4,group_size=128,sym=True,desc_act=False,checkpoint_format=gptq)"
    base = {1: 34.0, 16: 34.0, 32: 35.0, 512: 101.0}
    shapes = ((8192, 8192), (3072, 12288))
    # omniq speedups per (shape index, M): min over bucket 1-16 is 2.5 (not met: 3.0), over 32-64
    # is 2.1 (met: 2.0), over >=512 is 0.8 on one shape and an error on the other (not met: 0.9)
    sp = {(0, 1): 3.4, (0, 16): 2.5, (0, 32): 2.1, (0, 512): 0.8,
          (1, 1): 3.1, (1, 16): 2.9, (1, 32): 2.2, (1, 512): None}
    results, baselines, peers = [], [], []
    for i, (n, k) in enumerate(shapes):
        for m, b in base.items():
            baselines.append({"n": n, "k": k, "m": m, "bf16_us": b, "base": "bf16", "base_us": b})
            s = sp[(i, m)]
            if s is None:
                results.append(_row("gptq:bits=4:group_size=128", key, n, k, m, "triton.int4.gemm", None, b,
                                    error="RuntimeError: boom"))
            else:
                results.append(_row("gptq:bits=4:group_size=128", key, n, k, m, "triton.int4.gemv", b / s, b))
                # a slower candidate that was not chosen
                results.append(_row("gptq:bits=4:group_size=128", key, n, k, m, "reference", b * 10, b,
                                    chosen=False))
            for name, method, speed in (("int4 tinygemm", "int4 W4A16 g128", 1.7 if m == 1 else 0.2),
                                        ("int4 gemlite", "int4 W4A16 g128", 1.4 if m == 1 else 0.4),
                                        ("fp8 W8A8 gemlite", "fp8 W8A8 dynamic", 9.0)):
                peers.append({"peer": name, "method": method, "n": n, "k": k, "m": m, "base": "bf16",
                              "base_us": b, "us": b / speed, "speedup": speed})
            peers.append({"peer": "mxfp4 w-only gemlite", "method": "mxfp4 W4A16", "n": n, "k": k, "m": m,
                          "base": "bf16", "base_us": b, "error": "RuntimeError: no gemlite"})
    meta = {"date": "2026-11-28 00:00:00 UTC", "commit": "abc", "device": "cuda", "device_name": "NVIDIA H200",
            "torch": "2.x", "dtype": "bfloat16", "baseline": "bf16 F.linear (cuBLAS)", "err_rows": 64,
            "threads": 1, "cache_flush": False, "timing": "CUDA graph replay (test)", "complete": True}
    return {"meta": meta, "baselines": baselines, "results": results, "peers": peers, "overhead": []}


def _md_rows(md: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| " + first_cell)]


def test_render_md_summary_holds_min_speedup_target_and_best_peer():
    md = run.render_md(_synthetic())
    rows = {r[2]: r for r in _md_rows(md, "int4 W4A16 g128")}
    assert set(rows) == {"1-16", "32-64", ">=512"}
    # method, scheme, bucket, omniq min, target, status, cells, best peer (min)
    assert rows["1-16"][3:7] == ["2.50x", "3.00x", "**not met**", "4/4"]
    # each peer's lowest in the bucket (M = 16): gemlite's 0.4 beats tinygemm's 0.2 despite M = 1
    assert rows["1-16"][7] == "int4 gemlite 0.40x"
    assert rows["32-64"][3:7] == ["2.10x", "2.00x", "met", "2/2"]
    assert rows["32-64"][7] == "int4 gemlite 0.40x"
    assert rows[">=512"][3:7] == ["0.80x", "0.90x", "**not met**", "1/2"]
    assert "fp8 W8A8 gemlite" not in "".join(r[7] for r in rows.values())  # another method's peer


def test_render_md_method_table_rows():
    md = run.render_md(_synthetic())
    assert "## int4 W4A16 g128: `gptq:bits=4:group_size=128`" in md
    rows = _md_rows(md, "8192 x 8192")
    by_m = {r[1]: r for r in rows if len(r) == 9}  # the method table (the peers table is wider)
    # N x K, M, bf16 us, kernel, us, speedup, best peer, peer speedup, fastest other
    assert by_m["1"][2:8] == ["34.0", "`triton.int4.gemv`", "10.0", "3.40x", "int4 tinygemm", "1.70x"]
    assert by_m["16"][6:8] == ["int4 gemlite", "0.40x"]
    assert by_m["512"][3] == "`triton.int4.gemv`"
    assert by_m["1"][8] == "-"  # the chosen kernel was the fastest timed
    err = {r[1]: r for r in _md_rows(md, "3072 x 12288") if len(r) == 9}["512"]
    assert "error: RuntimeError: boom" in err[3] and err[5] == "-"
    # all peers side by side, with n/a for the one that could not be built
    peer_hdr = [line for line in md.splitlines() if line.startswith("| N x K | M | bf16 µs | int4 tinygemm")]
    assert peer_hdr and "mxfp4 w-only gemlite (mxfp4 W4A16)" in peer_hdr[0]
    wide = [r for r in rows if len(r) == 7]
    assert wide[0][-1] == "n/a" and wide[0][3] == "1.70x"
    assert "CUDA graph replay (test)" in md and "NVIDIA H200" in md


def test_from_json_renders_md_without_measuring(tmp_path):
    src = tmp_path / "gpu.json"
    src.write_text(json.dumps(_synthetic()))
    md = tmp_path / "out" / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--from-json", str(src),
                           "--md", str(md)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text() == run.render_md(_synthetic())
    assert "# omniq benchmark" in proc.stdout and "triton.int4.gemv" in proc.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--from-json", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "not a run.py --json file" in proc.stderr


def test_plots_draw_the_peers_of_the_same_method(tmp_path, monkeypatch):
    """write_plots with a stand-in matplotlib (none is installed here): one figure per (scheme,
    shape), a line per timed kernel, the pick, and a dotted line per peer of the same method only."""
    import types as _types
    lines = []

    class Ax:
        def plot(self, xs, ys, *a, label=None, **kw):
            lines.append((label, list(xs), list(ys)))

        def __getattr__(self, name):
            return lambda *a, **k: None

    class Fig:
        def tight_layout(self):
            pass

        def savefig(self, path, **kw):
            Path(path).write_bytes(b"png")

    def subplots(nrows=1, ncols=1, squeeze=True, **kw):
        return Fig(), (Ax() if squeeze else [[Ax() for _ in range(ncols)] for _ in range(nrows)])

    plt = _types.SimpleNamespace(subplots=subplots, close=lambda fig: None)
    mpl = _types.ModuleType("matplotlib")
    mpl.use = lambda *a: None
    mpl.pyplot = plt
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    data = _synthetic()
    msg = run.write_plots(data["results"], str(tmp_path), data["peers"])
    # one per (scheme, shape), plus summary.png: every scheme's pick, a panel per shape
    assert "wrote 3 PNG" in msg and len(list(tmp_path.glob("*.png"))) == 3
    assert (tmp_path / "summary.png").exists()
    labels = {lab for lab, _, _ in lines}
    assert {"peer: int4 tinygemm", "peer: int4 gemlite", "triton.int4.gemv", "omniq.linear's pick"} <= labels
    assert "peer: fp8 W8A8 gemlite" not in labels and "peer: mxfp4 w-only gemlite" not in labels
    tiny = [(xs, ys) for lab, xs, ys in lines if lab == "peer: int4 tinygemm"][0]
    assert tiny == ([1, 16, 32, 512], [1.7, 0.2, 0.2, 0.2])


# ---- --chosen-only end to end -----------------------------------------------------------------
def test_chosen_only_times_one_kernel_per_m_and_writes_md(tmp_path):
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    schemes = "int8,gptq:bits=4:group_size=128"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--schemes", schemes, "--shapes", "64x256",
           "--m", "1,32,512", "--budget", "0.005", "--reps", "3", "--no-flush", "--chosen-only", "--peers",
           "--json", str(out), "--md", str(md), "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["chosen_only"] is True and "perf_counter" in data["meta"]["timing"]
    for label in schemes.split(","):
        _, scheme = run.parse_scheme(label)
        qw = scheme.quantize(torch.randn(64, 256) * 0.02)
        p = omniq.prepare(qw, torch.device("cpu"), torch.bfloat16)
        for m in (1, 32, 512):
            rows = [r for r in data["results"] if r["scheme"] == label and r["m"] == m]
            assert len(rows) == 1 and rows[0]["chosen"] and not rows[0].get("error"), rows
            assert rows[0]["kernel"] == p.kernel_for(m, torch.bfloat16).name
    text = md.read_text()
    assert "## Against the issue's targets" in text and "## Peers" in text
    assert "## int8 W8A8 dynamic per-token: `int8`" in text


def test_git_commit_falls_back_to_omniq_commit_outside_a_checkout(tmp_path, monkeypatch):
    """A `git archive` snapshot on a GPU machine has no .git: the commit comes from OMNIQ_COMMIT."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv("OMNIQ_COMMIT", "0123abc")
    assert run.git_commit() == "0123abc"
    monkeypatch.delenv("OMNIQ_COMMIT")
    assert run.git_commit() == "unknown"
    monkeypatch.setattr(run, "ROOT", ROOT)  # the real checkout: its own HEAD, whatever OMNIQ_COMMIT says
    monkeypatch.setenv("OMNIQ_COMMIT", "0123abc")
    assert run.git_commit().split("-")[0] == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
