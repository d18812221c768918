"""benchmarks/run.py end to end on a tiny grid: it runs, prints its tables (kernels, the
dispatcher's pick per M, peers, dispatch overhead) and writes JSON that parses and holds every
(scheme, M) with a time, a speedup and an error for the kernels it timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ("int8", "gptq:bits=4:group_size=64", "mxfp4:activation=None")


def test_run_py_prints_tables_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--schemes", ",".join(SCHEMES),
           "--shapes", "64x256", "--m", "1,3", "--budget", "0.01", "--reps", "3", "--no-flush",
           "--kernels", r"^(cpu\.|reference$)", "--peers", "--overhead", "--overhead-iters", "200",
           "--json", str(out), "--plot", str(tmp_path / "plots"), "--md", str(tmp_path / "bench.md"),
           "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for heading in ("# omniq benchmark", "speedup of the kernel omniq.linear picks", "# peers", "# dispatch overhead"):
        assert heading in text, (heading, text[-2000:])
    data = json.loads(out.read_text())
    meta = data["meta"]
    for key in ("date", "commit", "device_name", "torch", "baseline"):
        assert meta[key], key
    timed = [r for r in data["results"] if not r.get("error")]
    for label in SCHEMES:
        for m in (1, 3):
            rows = [r for r in timed if r["scheme"] == label and r["m"] == m]
            assert rows, (label, m)
            assert sum(r["chosen"] for r in rows) == 1, rows  # one row is the dispatcher's pick
            for r in rows:
                assert r["us"] > 0 and r["speedup"] > 0 and 0 <= r["err"] < 0.05, r
                assert r["kernel"] in text
    assert {r["m"] for r in data["baselines"]} == {1, 3}
    assert any(not p.get("error") for p in data["peers"])
    assert all(o["kernel_us"] > 0 for o in data["overhead"])
    # the markdown report: the targets, a table per scheme (int8 has one, gptq g64 is
    # not the g128), the peers and the overhead
    md = (tmp_path / "bench.md").read_text()
    for heading in ("## Against the issue's targets", "## int8 W8A8 dynamic per-token: `int8`",
                    "## mxfp4 weight-only: `mxfp4:activation=None`", "`gptq:bits=4:group_size=64`", "## Peers",
                    "## Dispatch overhead"):
        assert heading in md, (heading, md[:2000])
    assert meta["timing"] and all(r["timing"] for r in timed)
    # no matplotlib here: the run says so instead of failing; with it, PNGs appear
    plots = list((tmp_path / "plots").glob("*.png"))
    assert plots or "matplotlib is not installed" in proc.stderr


def test_max_seconds_cuts_the_grid_short_and_still_writes_json(tmp_path):
    """--max-seconds 0: the deadline has passed before the first measurement, so the grid stops at
    once, says so on stdout, and the JSON parses, is marked incomplete and holds fewer rows than the
    grid has; rows are printed as measured (checked with a deadline that lets a few through)."""
    out = tmp_path / "cut.json"
    base = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--schemes", "int8,gptq:bits=4:group_size=64",
            "--shapes", "64x256,128x256", "--m", "1,3", "--budget", "0.005", "--reps", "3", "--no-flush",
            "--kernels", r"^(cpu\.|reference$)", "--no-progress", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    whole = json.loads(out.read_text())
    assert whole["meta"]["complete"] is True and "cut_short" not in whole["meta"]
    assert "grid cut short" not in full.stdout
    n_full = len(whole["results"])
    assert {(r["n"], r["scheme"]) for r in whole["results"]} == {(n, s) for n in (64, 128)
                                                                  for s in ("int8", "gptq:bits=4:group_size=64")}

    out.unlink()
    proc = subprocess.run(base + ["--max-seconds", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# grid cut short (--max-seconds 0 passed)" in proc.stdout, proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is False and data["meta"]["cut_short"]
    assert len(data["results"]) < n_full
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic rewrite leaves no temporary behind
    # rows already printed and saved are the ones measured: every saved timed row is on stdout
    for r in data["results"]:
        if not r.get("error"):
            assert r["kernel"] in proc.stdout


def test_sigterm_mid_grid_keeps_what_was_measured(tmp_path):
    """A `timeout` kill (SIGTERM) once the first JSON is on disk: the run ends cleanly, says the grid
    was cut short, and the JSON it leaves parses and holds the baselines measured before the kill."""
    import signal
    import time
    out = tmp_path / "killed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--schemes", "int8,gptq:bits=4:group_size=64",
           "--shapes", "64x256,128x256", "--m", "1,2,3,4,5,6,7,8", "--budget", "0.2", "--reps", "100",
           "--no-flush", "--kernels", r"^(cpu\.|reference$)", "--no-progress", "--threads", "1",
           "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    t0 = time.time()
    while not out.exists() and proc.poll() is None and time.time() - t0 < 100:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=100)
    assert proc.returncode == 0, stderr[-3000:]
    assert "# grid cut short (interrupted)" in stdout, stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is False and data["meta"]["cut_short"] == "interrupted"
    assert {r["m"] for r in data["baselines"] if r["n"] == 64} == set(range(1, 9))
    assert len(data["results"]) < 2 * 2 * 8 * 3  # far from the whole grid
