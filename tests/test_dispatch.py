"""The dispatcher on its own: selection order, overrides, tuning tables, explain, the custom
op under torch.compile, and the one-copy memory rule over every registered layout."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import omniq
from omniq.dispatch import registry, select, tuning
from omniq.dispatch.kernel import Problem, m_bucket
from omniq.errors import KernelError, OmniqError
from omniq.schemes import registry as scheme_registry

from _toy import TOY_KERNELS, ToyScheme


@pytest.fixture
def toy(monkeypatch):
    registry.all_kernels()  # load the real backends first
    for k in TOY_KERNELS:
        registry.register_kernel(k)
    scheme_registry.register_scheme("toy", ToyScheme)
    monkeypatch.delenv("OMNIQ_KERNEL", raising=False)
    monkeypatch.delenv("OMNIQ_DISABLE_KERNELS", raising=False)
    select.set_tuning(False)
    yield ToyScheme()
    select.set_tuning(None)
    for k in TOY_KERNELS:
        registry._KERNELS.pop(k.name, None)
    scheme_registry._SCHEMES.pop("toy", None)


def _weight(scheme, n=24, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scheme.quantize(torch.randn(n, k, generator=g))


def _x(m, k=40, dtype=torch.float32):
    return torch.randn(m, k, dtype=dtype)


def test_backends_load_lazily_and_reference_is_registered():
    names = {k.name for k in omniq.all_kernels()}
    assert "reference" in names


def test_m_buckets_are_monotone_powers_of_two():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 16, 17, 8192, 100000)] == [1, 2, 4, 8, 16, 32, 8192, 16384]


def test_layout_vote_keeps_one_layout_that_covers_every_m(toy):
    qw = _weight(toy)
    # ToyLargeM (priority 20) wins large M, but its layout has no kernel for M <= 16, so the
    # layer keeps the checkpoint layout (valid at every M) rather than holding two copies
    p = omniq.prepare(qw, "cpu", torch.float32)
    assert p.layout == "checkpoint"
    assert p.kernel_for(1, torch.float32).name == "test.toy.fast"
    assert p.kernel_for(64, torch.float32).name == "test.toy.fast"
    # once a kernel on that layout covers small M too, the layout wins the vote
    registry.register_kernel(type("ToySmallT", (TOY_KERNELS[2],), {
        "name": "test.toy.small_t", "priority": 1, "can_implement": lambda self, pr: None}))
    try:
        p = omniq.prepare(qw, "cpu", torch.float32)
        assert p.layout == "test.toy.transposed"
        assert p.kernel_for(1, torch.float32).name == "test.toy.small_t"
        assert p.kernel_for(64, torch.float32).name == "test.toy.large_m"
        x = _x(64)
        torch.testing.assert_close(omniq.linear(x, p), toy.matmul(x, qw), rtol=1e-5, atol=1e-5)
    finally:
        registry._KERNELS.pop("test.toy.small_t")


def test_static_rank_orders_candidates_per_m(toy):
    """A kernel may rank itself per M (Kernel.static_rank): candidates() and the choice follow."""
    qw = _weight(toy)
    fast = registry._KERNELS["test.toy.fast"]
    slow = registry._KERNELS["test.toy.slow"]
    with omniq.disable_kernels("test.toy.large_m", "reference"):
        pr = Problem(toy, 24, 40, 4, torch.float32, torch.device("cpu"))
        assert [k.name for k in select.candidates(pr)][:2] == ["test.toy.fast", "test.toy.slow"]
        try:
            type(fast).static_rank = lambda self, pr: self.priority if pr.m <= 2 else slow.priority - 1
            assert [k.name for k in select.candidates(pr)][:2] == ["test.toy.slow", "test.toy.fast"]
            p = omniq.prepare(qw, "cpu", torch.float32)
            assert p.kernel_for(2, torch.float32).name == "test.toy.fast"
            assert p.kernel_for(4, torch.float32).name == "test.toy.slow"
        finally:
            del type(fast).static_rank


def test_checkpoint_layout_switches_kernels_by_priority(toy):
    qw = _weight(toy)
    with omniq.disable_kernels("test.toy.large_m"):
        p = omniq.prepare(qw, "cpu", torch.float32)
        assert p.layout == "checkpoint"
        assert p.kernel_for(1, torch.float32).name == "test.toy.fast"
        x = _x(3)
        torch.testing.assert_close(omniq.linear(x, p), toy.matmul(x, qw), rtol=1e-5, atol=1e-5)


def test_linear_matches_reference_for_2d_3d_and_bias(toy):
    qw = _weight(toy)
    bias = torch.randn(24)
    for shape in ((1, 40), (5, 40), (2, 3, 40), (2, 17, 40)):
        x = torch.randn(*shape)
        torch.testing.assert_close(omniq.linear(x, qw, bias), toy.matmul(x, qw, bias), rtol=1e-5, atol=1e-5)
    assert omniq.linear(torch.randn(0, 40), qw).shape == (0, 24)


def test_wrong_k_is_a_clear_error(toy):
    qw = _weight(toy)
    with pytest.raises(OmniqError, match="K=40"):
        omniq.linear(torch.randn(2, 39), qw)


def test_disable_and_force_overrides(toy, monkeypatch):
    qw = _weight(toy)
    with omniq.disable_kernels("test.toy.large_m"):
        p = omniq.prepare(qw, "cpu", torch.float32)
    assert p.layout == "checkpoint"
    assert p.kernel_for(1, torch.float32).name == "test.toy.fast"
    monkeypatch.setenv("OMNIQ_DISABLE_KERNELS", "test.toy.fast,test.toy.large_m")
    assert p.kernel_for(1, torch.float32).name == "test.toy.slow"
    monkeypatch.delenv("OMNIQ_DISABLE_KERNELS")
    with omniq.use_kernel("reference"):
        assert p.kernel_for(1, torch.float32).name == "reference"
    assert p.kernel_for(1, torch.float32).name == "test.toy.fast"  # the context restored the choice
    monkeypatch.setenv("OMNIQ_KERNEL", "test.toy.slow")
    assert p.kernel_for(1, torch.float32).name == "test.toy.slow"


def test_forced_kernel_that_cannot_run_raises_its_reason(toy):
    qw = _weight(toy)
    # a forced kernel that cannot run this N x K at any M fails at prepare (load) time
    registry.register_kernel(type("ToyN64", (TOY_KERNELS[0],), {
        "name": "test.toy.n64", "can_implement": lambda self, pr: None if pr.n % 64 == 0 else "needs N % 64 == 0"}))
    try:
        with omniq.use_kernel("test.toy.n64"), pytest.raises(KernelError, match="N=24 K=40.*needs N % 64 == 0"):
            omniq.prepare(qw, "cpu", torch.float32)
    finally:
        registry._KERNELS.pop("test.toy.n64")
    with omniq.use_kernel("test.toy.large_m"):
        p = omniq.prepare(qw, "cpu", torch.float32)  # the forced kernel's layout is taken
        assert p.layout == "test.toy.transposed"
        with pytest.raises(KernelError, match="needs M > 16, got M=1"):
            omniq.linear(_x(1), p)
        assert omniq.linear(_x(20), p).shape == (20, 24)
    # forcing a kernel whose layout the weight was not prepared with: the error says so
    with omniq.disable_kernels("test.toy.large_m"):
        p2 = omniq.prepare(qw, "cpu", torch.float32)
    with omniq.use_kernel("test.toy.large_m"):
        with pytest.raises(KernelError, match="layout"):
            omniq.linear(_x(20), p2)


def test_a_layer_can_pin_its_kernel_without_a_context(toy):
    qw = _weight(toy)
    p = omniq.prepare(qw, "cpu", torch.float32, kernel="test.toy.slow")
    assert p.kernel_for(1, torch.float32).name == "test.toy.slow"
    assert {v.kernel: v.status for v in omniq.explain(p, m=1, act_dtype=torch.float32)}["test.toy.slow"] == "chosen"
    assert omniq.prepare(qw, "cpu", torch.float32).kernel_for(1, torch.float32).name == "test.toy.fast"
    with pytest.raises(KernelError, match="needs M > 16, got M=1"):
        omniq.linear(_x(1), omniq.prepare(qw, "cpu", torch.float32, kernel="test.toy.large_m"))
    with pytest.raises(KernelError, match="registered kernels"):
        omniq.prepare(qw, "cpu", kernel="no.such.kernel")


def test_unknown_forced_kernel_lists_registered(toy):
    with pytest.raises(KernelError, match="registered kernels"):
        with omniq.use_kernel("no.such.kernel"):
            pass


def test_tuning_table_beats_static_priority(toy):
    qw = _weight(toy)
    problem = Problem(toy, 24, 40, 1, torch.float32, torch.device("cpu"))
    tuning.record(problem.device, {problem.key(): {"kernel": "test.toy.slow",
                                                   "times_us": {"test.toy.slow": 1.0, "test.toy.fast": 9.0}}})
    with omniq.disable_kernels("test.toy.large_m"):
        p = omniq.prepare(qw, "cpu", torch.float32)
        assert p.kernel_for(1, torch.float32).name == "test.toy.slow"
        assert p.kernel_for(2, torch.float32).name == "test.toy.fast"  # another bucket: not in the table


def test_timed_trial_picks_the_faster_kernel_and_records_it(toy):
    qw = _weight(toy)
    select.set_tuning(True)
    with omniq.disable_kernels("test.toy.large_m", "reference"):
        p = omniq.prepare(qw, "cpu", torch.float32)
        chosen = p.kernel_for(4, torch.float32).name
        assert chosen == "test.toy.fast", (chosen, tuning.table(torch.device("cpu")))
    entries = json.loads(tuning.user_table_path(torch.device("cpu")).read_text())["entries"]
    key = Problem(toy, 24, 40, 4, torch.float32, torch.device("cpu")).key()
    assert entries[key]["kernel"] == "test.toy.fast"
    assert entries[key]["times_us"]["test.toy.slow"] > entries[key]["times_us"]["test.toy.fast"]


def test_two_processes_write_the_cache_at_once(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from omniq.dispatch import tuning
        tag = sys.argv[1]
        for i in range(60):
            tuning.record(torch.device("cpu"), {f"{tag}-{i}": {"kernel": tag, "times_us": {tag: float(i)}}})
    """)
    env = dict(os.environ, OMNIQ_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script, tag], env=env, cwd=tmp_path) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    data = json.loads((tmp_path / "tuning-cpu.json").read_text())
    assert len(data["entries"]) == 120
    assert not list(tmp_path.glob("*.tmp"))


def test_explain_lists_every_kernel_with_a_verdict(toy):
    qw = _weight(toy)
    verdicts = omniq.explain(qw, m=1, device="cpu", act_dtype=torch.float32)
    by_name = {v.kernel: v for v in verdicts}
    assert set(by_name) == {k.name for k in omniq.all_kernels()}
    assert "needs M > 16" in by_name["test.toy.large_m"].reason
    assert by_name["test.toy.fast"].status == "chosen"
    assert by_name["test.toy.slow"].status == "valid"
    assert by_name["test.toy.large_m"].status == "rejected"  # M=1 fails before the disable is consulted
    with omniq.disable_kernels("test.toy.slow"):
        by_name = {v.kernel: v for v in omniq.explain(qw, m=1, device="cpu", act_dtype=torch.float32)}
    assert by_name["test.toy.slow"].status == "disabled"
    assert all(v.reason for v in verdicts if v.status in ("rejected", "unavailable"))


def test_torch_compile_fullgraph_traces_the_custom_op(toy):
    qw = _weight(toy)
    with omniq.disable_kernels("test.toy.large_m"):
        p = omniq.prepare(qw, "cpu", torch.float32)
    bias = torch.randn(24)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(omniq.linear(x, p, bias))

    x = torch.randn(2, 3, 40)
    compiled = torch.compile(M(), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), torch.relu(toy.matmul(x, qw, bias)))
    # the op has a fake implementation: shapes propagate without running a kernel
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = torch.ops.omniq.linear(torch.empty(7, 40), p.handle, None)
    assert out.shape == (7, 24)


def test_entry_point_plugins_register_kernels(monkeypatch):
    called = []

    class EP:
        name = "demo"

        def load(self):
            return lambda: called.append(True)

    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [EP()] if group == "omniq.kernels" else [])
    monkeypatch.setattr(registry, "_LOADED", False)
    registry.all_kernels()
    assert called == [True]


def test_nn_quantize_swaps_linears_and_keeps_ignored(toy):
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    x = torch.randn(3, 40)
    with omniq.disable_kernels("test.toy.large_m"):
        ref_first = model[0].weight.detach().clone()
        omniq.quantize_(model, "toy", ignore=["2"])
    assert isinstance(model[0], omniq.QuantLinear) and isinstance(model[2], torch.nn.Linear)
    qw = ToyScheme().quantize(ref_first)
    expect = model[2](torch.relu(ToyScheme().matmul(x, qw, model[0].bias)))
    torch.testing.assert_close(model(x), expect, rtol=1e-5, atol=1e-5)


def test_prepared_layout_drops_the_checkpoint_copy(toy):
    qw = _weight(toy)
    registry.register_kernel(type("ToySmallT", (TOY_KERNELS[2],), {
        "name": "test.toy.small_t", "priority": 1, "can_implement": lambda self, pr: None}))
    try:
        p = omniq.prepare(qw, "cpu", torch.float32)
    finally:
        registry._KERNELS.pop("test.toy.small_t")
    assert p.layout == "test.toy.transposed"
    assert p.qw.tensors == {}  # metadata only: the transposed copy is the layer's one weight
    assert p.nbytes <= 1.05 * toy.nominal_nbytes(24, 40)


def test_time_kernel_rotates_over_weight_copies():
    """A list of prepared copies is timed round-robin (every copy, every rep), the time per call."""
    seen = []

    class Counting:
        def run(self, x, prepared, bias):
            seen.append(id(prepared))
            return x

    copies = [object(), object(), object()]
    t = select.time_kernel(Counting(), torch.zeros(1, 4), copies, reps=4, warmup=1)
    assert t >= 0 and len(seen) == 3 * (1 + 4)
    assert [seen.count(id(c)) for c in copies] == [5, 5, 5]


def test_rotation_copies_and_prepared_bytes():
    from dataclasses import dataclass

    @dataclass
    class Prep:
        a: torch.Tensor
        b: torch.Tensor
        n: int = 3

    from omniq.dispatch import rotation
    assert rotation.prepared_nbytes(Prep(torch.zeros(4, 8), torch.zeros(2, dtype=torch.int8))) == 4 * 8 * 4 + 2
    assert rotation.prepared_nbytes(torch.zeros(5, dtype=torch.float16)) == 10
    assert rotation.rotation_copies(1 << 20, torch.device("cpu")) == 1   # no L2 to escape off CUDA


def test_rotating_copies_own_their_memory_when_prepare_adopts_the_weight(monkeypatch):
    """The W8A8 layout adopts a weight already on the device as it is, so preparing it again is no
    copy; the tuner's rotation must still read distinct memory (it once timed fp8 L2-hot)."""
    from omniq.dispatch import rotation
    from omniq.kernels import triton_w8a8
    qw = omniq.get_scheme("fp8").quantize(torch.randn(64, 128), name="t.layer")
    dev = torch.device("cpu")
    assert triton_w8a8.prepare_w8a8(qw, dev).weight.data_ptr() == triton_w8a8.prepare_w8a8(qw, dev).weight.data_ptr()
    monkeypatch.setattr(rotation, "rotation_copies", lambda nbytes, device, cap=8: 3)
    first = triton_w8a8.prepare_w8a8(qw, dev)
    copies = rotation.rotating_copies(first, dev)
    assert len(copies) == 3 and copies[0] is first
    assert len({c.weight.data_ptr() for c in copies}) == 3 and len({c.w_scale.data_ptr() for c in copies}) == 3
    assert all(torch.equal(c.weight.float(), first.weight.float()) and c.n == first.n for c in copies)


def test_tune_times_each_layout_over_distinct_copies(tmp_path, monkeypatch):
    """`omniq tune` hands the trial copies that own their memory (here 3, as on a GPU whose L2 the
    weight fits), also for the W8A8 layout, whose prepare adopts the weight as it is."""
    from omniq import cli
    from omniq.dispatch import rotation
    monkeypatch.setattr(rotation, "rotation_copies", lambda nbytes, device, cap=8: 3)
    seen = {}

    def fake_trial(problem, cands, prepared_for, save=True):
        seen.update(prepared_for)
        return {c.name: 1.0 for c in cands}
    monkeypatch.setattr(select, "trial", fake_trial)
    assert cli.main(["tune", "--device", "cpu", "--schemes", "fp8", "--shapes", "32x64", "--m", "1",
                     "--output", str(tmp_path / "t.json")]) == 0
    assert "triton.w8a8.v1" in seen or "cpu.fp8" in seen
    for name, copies in seen.items():
        assert isinstance(copies, list) and len(copies) == 3, name
        ptrs = [{t.data_ptr() for t in rotation.prepared_tensors(c) if t.numel()} for c in copies]
        assert not (ptrs[0] & ptrs[1]) and not (ptrs[0] & ptrs[2]) and not (ptrs[1] & ptrs[2]), name


def test_tune_cli_writes_a_table_on_cpu(tmp_path):
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "omniq", "tune", "--device", "cpu", "--schemes", "int8",
                        "--shapes", "32x64", "--m", "1,4", "--output", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    entries = json.loads(out.read_text())["entries"]
    assert len(entries) == 2 and all(e["kernel"] in e["times_us"] for e in entries.values())
