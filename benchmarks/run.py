#!/usr/bin/env python
"""omniq kernel microbenchmarks: every valid kernel of every scheme on a shape grid, timed against
the dense matmul of the same shape in the same run, with its error and the dispatcher's pick.

    python benchmarks/run.py                        # default grid (slow on a CPU: hours)
    python benchmarks/run.py --quick                # small preset: minutes on a CPU
    python benchmarks/run.py --schemes int8,gptq:bits=4:group_size=128 --shapes 3072x12288 --m 1,16
    python benchmarks/run.py --json out.json --md out.md --plot plots/ --graph --peers --chosen-only
    python benchmarks/run.py --device cuda --max-seconds 50 --json out.json   # stops starting work at 50 s
    python benchmarks/run.py --from-json out.json --md out.md --plot plots/   # re-render, measure nothing

Per (scheme, N x K, M) and per kernel valid there (`omniq.dispatch.candidates` over every
layout; only the one `omniq.linear` picks with --chosen-only): the median time, the speedup
over the dense baseline, the max error relative to the largest |output| of `scheme.matmul` (on
the first --err-rows rows), and which kernel `omniq.linear` would run. The baseline is
`F.linear` on a bf16 weight (cuBLAS on CUDA); on a CPU both bf16 and fp32 are timed and the
faster one is the baseline (the `base` column).

Timing. CPU: perf_counter around each call, caches flushed before it. GPU: CUDA events around
each call, L2 flushed before it; with --graph, the method of the reference numbers
(performance.md): one CUDA graph holds `inner` rounds of calls over C copies of the weight
(C = ceil(3 x L2 / bytes of one copy), at most 8; inner x C <= 64 calls, aiming at >= 500 us
of work per replay), and the time per call is a replay's time over inner x C, median over
replays. The copies keep every read weight out of L2 without a flush, and one replay carries
one graph launch for many calls instead of one per call. Copies: bf16 weights for the baseline,
clones of the prepared layout for omniq's kernels, separate builds for the peers; each group's
copies are freed after it. A call whose capture fails is timed eagerly (the row's `timing` says so).

--peers adds, in the same process and shapes, what users run instead of omniq: torch's
built-ins (int4 tinygemm, `_scaled_mm`, `_int_mm`, int8 weight-only), gemlite when it is
importable (CUDA), fbgemm's dynamic int8 linear (CPU) and a plain dequantize-then-matmul.
--overhead measures what omniq.linear costs above the kernel it calls, choice cached.

--md writes a markdown report: per method of the issue, omniq's chosen kernel against bf16 and
the best peer of the same method per (shape, M), and a summary of the lowest speedup in each M
bucket (1-16, 32-64, >= 512) against the issue's target. --from-json re-renders the tables,
--md and --plot from a --json file (results fetched from a GPU machine, say).

Rows are printed as they are measured and --json is rewritten after each (scheme, shape) group,
so a run cut short (--max-seconds S, or a `timeout` kill) keeps what it measured; the JSON's
meta says `complete` and, when cut, `cut_short`. gemlite peers run with their autotuning off
(one default config, or the shipped H100 cache on sm_90) unless --gemlite-autotune.

Results carry the device name, the date, the git commit and the timing method. Scheme specs are
`name[:param=value[:param=value]]` with the same parameters as omniq.get_scheme.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import omniq
from omniq.cli import TUNE_M, TUNE_SHAPES, _value, default_device
from omniq.dispatch import Problem, candidates
from omniq.dispatch.rotation import MAX_COPIES, clone_prepared, copies_for, prepared_nbytes, prepared_tensors
from omniq.dispatch.select import capture_graph

# Every registered family with its common parameters (DiT / LLM checkpoints as published).
DEFAULT_SCHEMES = (
    "fp8", "fp8:weight_granularity=block:activation=block", "int8", "int8:activation=None",
    "gptq:bits=4:group_size=128", "gptq:bits=4:group_size=128:desc_act=True", "awq:group_size=128",
    "gptq:bits=8:group_size=128", "mxfp8", "mxfp4", "mxfp4:activation=None", "mxfp4_dualscale",
    "nvfp4", "nvfp4:activation=None", "gguf:type=q4_k", "gguf:type=q6_k", "gguf:type=q8_0",
    "w8a8", "w8a8_dynamic", "w4a8_dynamic",
)
DEFAULT_SHAPES = TUNE_SHAPES            # (N, K): 3072x12288, 12288x3072, 8192x8192
DEFAULT_M = TUNE_M                      # 1 .. 8192
QUICK_SHAPES = ((2048, 4096), (4096, 2048))
QUICK_M = (1, 16, 256)
QUICK_SCHEMES = ("fp8", "int8", "int8:activation=None", "gptq:bits=4:group_size=128", "awq:group_size=128",
                 "mxfp4:activation=None", "nvfp4", "gguf:type=q4_k", "w8a8_dynamic")
OVERHEAD_TARGET_US = 5.0
OVERHEAD_SCHEMES = ("int8", "int8:activation=None", "gptq:bits=4:group_size=128")
ROOT = Path(__file__).resolve().parent.parent


# ---- small helpers ----------------------------------------------------------------------------
def parse_scheme(spec: str):
    """'gptq:bits=4:group_size=128' -> (label, scheme)."""
    name, *params = spec.split(":")
    kw = {}
    for p in params:
        if "=" not in p:
            raise SystemExit(f"run.py: bad scheme parameter {p!r} in {spec!r}; write name:param=value")
        key, val = p.split("=", 1)
        kw[key.replace("-", "_")] = _value(val)
    return spec, omniq.get_scheme(name, **kw)


def parse_shapes(text: str):
    out = []
    for s in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", s)
        if not m:
            raise SystemExit(f"run.py: bad shape {s!r}; write N x K as 3072x12288 (out x in features)")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def llc_bytes() -> int:
    """The last-level cache size of this CPU (sysfs), 32 MB when unknown."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def git_commit() -> str:
    """HEAD (with -dirty for uncommitted changes), or OMNIQ_COMMIT where the tree is not a git
    checkout (a `git archive` snapshot on a GPU machine), else "unknown"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return os.environ.get("OMNIQ_COMMIT") or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("OMNIQ_COMMIT") or "unknown"


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0
        line = f"[{bar}] {self.done}/{self.total} {el:6.0f}s eta {eta:5.0f}s  {what}"
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


# ---- timing -----------------------------------------------------------------------------------
class OutOfTime(Exception):
    """--max-seconds has passed: no new measurement is started."""


# Rotating-copies graph timing (GPU, --graph): one graph holds `inner` rounds over C copies of
# the weight, so that each call reads a weight that is not in L2 (as a layer's weight is cold in
# a forward pass) and one replay amortizes the graph launch over many calls.
# C = omniq.dispatch.rotation.copies_for: ceil(3 * L2 / bytes of one copy), 1 to MAX_COPIES.
GRAPH_TARGET_US = 500.0     # one replay should be at least this much GPU work ...
GRAPH_MAX_CALLS = 64        # ... but a capture holds at most this many calls (inner * C)


def choose_inner(round_us: float, copies: int, target_us: float = GRAPH_TARGET_US,
                 max_calls: int = GRAPH_MAX_CALLS) -> int:
    """Rounds over the copies per graph: enough for `target_us` of work, at most max_calls calls."""
    cap = max(1, max_calls // max(copies, 1))
    need = math.ceil(target_us / max(round_us, 1e-3))
    return max(1, min(cap, need))


class Timer:
    """Median time of a call: perf_counter on CPUs, CUDA events on GPUs, and with graph=True on a
    GPU the rotating-copies graph method (see `_graph_time`).

    A call is given as one callable or as a list of callables: the same op on different copies of
    its weight. Only the graph method uses the copies; the others time the first one, evicting
    the caches before each call. Warm-up calls come first (untimed: they compile and autotune);
    the warm call sizes the repetitions to `budget_s`; a warm call slower than `slow_s` is timed
    once (n = 1) rather than repeated. `max_seconds` (from construction) makes `check()` raise
    OutOfTime.
    """

    def __init__(self, device, budget_s: float, max_reps: int, graph: bool, slow_s: float, flush: bool = True,
                 max_seconds: float | None = None):
        self.device, self.budget_s, self.max_reps = device, budget_s, max_reps
        self.graph, self.slow_s = graph, slow_s
        self.deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self.rotating = bool(graph and device.type == "cuda")
        self.l2_bytes = 0
        if device.type == "cuda":
            self.l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
        # A layer's weight is read once per forward pass, cold: evict the caches before each timed
        # call, untimed. CPU: twice the last-level cache. GPU: twice the L2 (H200: 2 x 60 MB); the
        # old fixed 256 MB memset cost several times a small kernel per repetition for nothing.
        # Allocated on first use: the graph method needs none (its copies keep the weights cold)
        # unless a capture fails and a call falls back to eager timing.
        self.flush_enabled = flush
        self.flush_buf = None

    def copies(self, nbytes: int) -> int:
        """Copies of a weight of `nbytes` to rotate over: 1 unless timing graphs on a GPU."""
        return copies_for(nbytes, self.l2_bytes) if self.rotating else 1

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def check(self) -> None:
        if self.out_of_time():
            raise OutOfTime

    def flush(self) -> None:
        if not self.flush_enabled:
            return
        if self.flush_buf is None:
            if self.device.type == "cuda":
                nbytes = max(2 * self.l2_bytes, 32 << 20)
            else:
                nbytes = max(2 * llc_bytes(), 64 << 20)
            self.flush_buf = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device)
        self.flush_buf.fill_(1.0)

    def _once(self, fn) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - t0

    def _samples(self, run_batch, reps: int) -> list[float]:
        # Samples come in batches; once a batch leaves the median within 1% of the previous
        # batch's, more repetitions would not change the answer, so timing stops before the budget.
        batch = min(reps, 10)
        samples: list[float] = []
        prev = None
        while len(samples) < reps:
            samples += run_batch(min(batch, reps - len(samples)))
            med = statistics.median(samples)
            if prev is not None and abs(med - prev) <= 0.01 * prev:
                break
            prev = med
        return samples

    def __call__(self, fn) -> dict:
        fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        if not fns:
            raise ValueError("Timer: no callable to time")
        first = fns[0]
        dev = self.device
        # The first call compiles Triton kernels (and gemlite autotunes): seconds that used to size
        # the repetitions (down to 3) or, past --slow, became the reported time. Only the second,
        # warm call is used to decide.
        self._once(first)
        warm = self._once(first)
        if warm > self.slow_s:
            return {"us": warm * 1e6, "us_min": warm * 1e6, "n": 1, "how": "one call (slow)"}
        note = ""
        if self.rotating:
            res = self._graph_time(fns)
            if res is not None:
                return res
            note = " (graph capture failed)"
        reps = max(3, min(self.max_reps, int(self.budget_s / max(warm, 1e-7))))
        if dev.type == "cuda":
            how = "cuda events" + note

            def run_batch(n):
                # events recorded for the whole batch, one synchronize at its end (not one per rep)
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
                for s, e in ev:
                    self.flush()
                    s.record()
                    first()
                    e.record()
                ev[-1][1].synchronize()
                return [s.elapsed_time(e) * 1e3 for s, e in ev]
        else:
            how = "perf_counter" + note

            def run_batch(n):
                out = []
                for _ in range(n):
                    self.flush()
                    t0 = time.perf_counter()
                    first()
                    out.append((time.perf_counter() - t0) * 1e6)
                return out
        samples = self._samples(run_batch, reps)
        if self.flush_enabled:
            how += ", caches flushed"
        return {"us": statistics.median(samples), "us_min": min(samples), "n": len(samples), "how": how}

    def _graph_time(self, fns) -> dict | None:
        """The method of performance.md: one CUDA graph of `inner` rounds over the C copies, each
        replay between two events, time per call = replay time / (inner * C), median (and min)
        over replays. No flush: the rotation keeps each copy out of L2 by the time it is read
        again. None when a capture fails (the caller then times eagerly)."""
        dev = self.device
        c = len(fns)
        g1 = _capture(fns, dev, rounds=1)
        if g1 is None:
            return None
        # one round, replayed a few times, sizes `inner` (an eager call's wall time would count
        # its launch latency, which is what this method keeps out)
        round_us = min(_replay_us(g1, 3))
        inner = choose_inner(round_us, c)
        g = g1
        if inner > 1:
            g = g1 = None  # free the one-round graph before capturing the longer one
            g = _capture(fns, dev, rounds=inner)
            if g is None:  # memory for the bigger graph, say: keep one round per replay
                inner = 1
                g = _capture(fns, dev, rounds=1)
                if g is None:
                    return None
        calls = inner * c
        replay_s = round_us * inner * 1e-6
        reps = max(5, min(self.max_reps, int(self.budget_s / max(replay_s, 1e-7))))
        samples = self._samples(lambda n: [t / calls for t in _replay_us(g, n)], reps)
        del g
        how = f"cuda graph, {c} rotating cop{'y' if c == 1 else 'ies'}, inner {inner}"
        return {"us": statistics.median(samples), "us_min": min(samples), "n": len(samples), "how": how,
                "copies": c, "inner": inner}


def _replay_us(g, n: int) -> list[float]:
    """n replays of graph g, each between two events; microseconds per replay."""
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record()
        g.replay()
        e.record()
    ev[-1][1].synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in ev]


# one graph of `rounds` passes over fns, or None when capture fails: the dispatcher's own helper,
# so tuning trials and this benchmark capture the same way (a module name tests can replace)
_capture = capture_graph


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|: the error at the scale of the layer's outputs."""
    den = ref.float().abs().max().item()
    num = (y.float() - ref.float()).abs().max().item()
    if not math.isfinite(num):
        return float("inf")
    return num / den if den > 0 else num


# ---- the dense baseline -----------------------------------------------------------------------
def dense_baseline(w: torch.Tensor, xs: dict, timer: Timer, device) -> dict:
    """{M: {...}} with bf16 F.linear, and on CPUs fp32 too; `base` names the faster one there.
    With --graph on a GPU, F.linear rotates over C copies of the bf16 weight (freed on return)."""
    wb = w.to(torch.bfloat16)
    wbs = [wb] + [wb.clone() for _ in range(timer.copies(wb.numel() * wb.element_size()) - 1)]
    wf = w.float() if device.type == "cpu" else None
    out = {}
    for m, x in xs.items():
        xb = x.to(torch.bfloat16)
        t = timer([lambda w_=w_: F.linear(xb, w_) for w_ in wbs])
        row = {"bf16_us": t["us"], "bf16_us_min": t["us_min"], "timing": t["how"]}
        base = "bf16"
        if wf is not None:
            xf = x.float()
            t = timer(lambda: F.linear(xf, wf))
            row.update(fp32_us=t["us"], fp32_us_min=t["us_min"])
            if row["fp32_us"] < row["bf16_us"]:
                base = "fp32"
        row["base"] = base
        row["base_us"] = row[f"{base}_us"]
        out[m] = row
    del wbs, wb
    free_memory(device)
    return out


def free_memory(device) -> None:
    """Give freed copies back (bounded memory over the grid): graph pools and cached blocks."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()


# ---- omniq's kernels --------------------------------------------------------------------------
def bench_scheme(label, scheme, w, xs, base, args, timer, device, dtype, progress, emit):
    """Time every valid kernel of one scheme on one weight; each row goes to emit() when measured.
    Raises OutOfTime (from timer.check) before starting a measurement past --max-seconds."""
    n, k = w.shape
    timer.check()
    try:
        # quantized and prepared once per (scheme, shape), shared by every kernel and M
        qw = scheme.quantize(w)
        qw = scheme.calibrate(qw, xs[max(xs)][:64].float())
        p = omniq.prepare(qw, device, dtype)
    except Exception as e:
        for m in xs:
            emit({"scheme": label, "scheme_key": scheme.key, "n": n, "k": k, "m": m, "kernel": None,
                  "error": f"{type(e).__name__}: {e}"})
            progress.step(f"{label} {n}x{k} M={m}: {e}")
        return
    layouts = {p.layout: p.data}
    copies: dict[str, list] = {}  # layout name -> its rotating copies (--graph on a GPU)
    notes: dict[str, str] = {}
    broken: dict[str, str] = {}
    try:
        _bench_ms(label, scheme, qw, p, xs, base, args, timer, device, dtype, progress, emit, layouts, copies,
                  notes, broken)
    finally:
        layouts.clear()
        copies.clear()
        del p, qw
        free_memory(device)


def _rotating_copies(prep, timer, copies, notes, lname):
    """[prep, clone, ...] sized by timer.copies(bytes of prep); one list per layout, reused over M."""
    if lname not in copies:
        c = timer.copies(prepared_nbytes(prep)) if prepared_tensors(prep) else 1
        out = [prep]
        try:
            out += [clone_prepared(prep) for _ in range(c - 1)]
        except Exception as e:  # time the one copy (its weight may then sit in L2: say so)
            notes[lname] = f"; clone failed ({type(e).__name__}: {e}), 1 copy"[:160]
        copies[lname] = out
    return copies[lname]


def _bench_ms(label, scheme, qw, p, xs, base, args, timer, device, dtype, progress, emit, layouts, copies, notes,
              broken):
    n, k = qw.shape
    for m, x in xs.items():
        timer.check()
        r = min(m, args.err_rows)
        xr = x[:r].contiguous()
        ref = scheme.matmul(xr, qw)
        try:
            chosen = p.kernel_for(m, dtype).name
        except Exception as e:
            chosen = None
            emit({"scheme": label, "scheme_key": scheme.key, "n": n, "k": k, "m": m, "kernel": None,
                  "error": f"dispatch: {e}"})
        problem = Problem(scheme, n, k, m, dtype, device)
        kerns = candidates(problem)
        if args.chosen_only:
            kerns = [kern for kern in kerns if kern.name == chosen]
            if chosen is not None and not kerns:
                emit({"scheme": label, "scheme_key": scheme.key, "n": n, "k": k, "m": m, "kernel": chosen,
                      "chosen": True, "error": "--chosen-only: the chosen kernel is not among the candidates"})
        for kern in kerns:
            if args.kernels and not re.search(args.kernels, kern.name):
                continue
            timer.check()
            row = {"scheme": label, "scheme_key": scheme.key, "n": n, "k": k, "m": m, "kernel": kern.name,
                   "backend": kern.backend, "layout": kern.layout.name, "chosen": kern.name == chosen,
                   "base": base[m]["base"], "base_us": base[m]["base_us"]}
            lname = kern.layout.name
            if lname in broken:
                emit({**row, "error": broken[lname]})
                continue
            if lname not in layouts:
                try:
                    layouts[lname] = kern.layout.prepare(qw, device)
                except Exception as e:
                    broken[lname] = f"prepare: {type(e).__name__}: {e}"
                    emit({**row, "error": broken[lname]})
                    continue
            prep = layouts[lname]
            try:
                # GPU: the error comes from the first rows of a call at the timed M. A call on
                # x[:err_rows] alone is another M, hence another Triton specialization (BLOCK_M,
                # M == 1 / M % 16 keys) compiled only for this check (M = 2048 -> 64: seconds per
                # kernel). CPU kernels do not compile; there the short call stays the cheaper one.
                if device.type == "cuda":
                    y_err = kern.run(x, prep, None)[:r]
                else:
                    y_err = kern.run(xr, prep, None)
                row["err"] = max_rel_err(y_err, ref)
                del y_err
                preps = _rotating_copies(prep, timer, copies, notes, lname)
                t = timer([lambda q=q: kern.run(x, q, None) for q in preps])
                t["how"] += notes.get(lname, "")
            except Exception as e:
                emit({**row, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            row.update(us=t["us"], us_min=t["us_min"], reps=t["n"], timing=t["how"],
                       speedup=base[m]["base_us"] / t["us"])
            emit(row)
        progress.step(f"{label} {n}x{k} M={m}")


# ---- peers ------------------------------------------------------------------------------------
def _per_token_int8(x):
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(xf / s).clamp(-128, 127).to(torch.int8), s


def _per_token_fp8(x):
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448
    return (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def build_peers(w: torch.Tensor, device, gemlite_autotune: bool = False) -> dict:
    """name -> (method, callable(x) -> y) for one weight. Built independently of omniq's kernels.
    A peer that cannot be built here maps to (method, reason string)."""
    n, k = w.shape
    g = 128
    cuda = device.type == "cuda"
    peers = {}
    wf = w.float()

    def add(name, method, build):
        try:
            peers[name] = (method, build())
        except Exception as e:
            peers[name] = (method, f"{type(e).__name__}: {e}".splitlines()[0][:200])

    # int4 codes with group-128 scales and zeros (asymmetric, tinygemm's (q - 8) * s + z form)
    def int4_parts():
        wg = wf.reshape(n, k // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((wg - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        return q, s, lo  # W = q * s + lo

    def tinygemm():
        q, s, lo = int4_parts()
        sz = torch.stack([s.T, (lo + 8 * s).T], -1).to(torch.bfloat16).contiguous()
        if cuda:
            qu8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch._convert_weight_to_int4pack(qu8, 8)
            return lambda x: torch._weight_int4pack_mm(x.to(torch.bfloat16), packed, g, sz)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, g, sz)

    add("int4 tinygemm" + ("" if cuda else " (cpu)"), "int4 W4A16 g128", tinygemm)

    def int4_dequant_mm():
        q, s, lo = int4_parts()
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        sb, lb = s.to(torch.bfloat16), lo.to(torch.bfloat16)

        def run(x):
            codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(n, k // g, g).to(torch.bfloat16)
            wd = (codes * sb[..., None] + lb[..., None]).reshape(n, k)
            return F.linear(x.to(torch.bfloat16), wd)
        return run

    add("int4 dequant+mm", "int4 W4A16 g128", int4_dequant_mm)

    ws8 = wf.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    w8 = torch.round(wf / ws8).clamp(-128, 127).to(torch.int8)

    def int_mm():
        wt, sw = w8.t(), ws8.reshape(1, n)

        def run(x):
            xq, sx = _per_token_int8(x)
            m = xq.shape[0]
            if cuda and m <= 16:  # cuBLASLt int8 needs M > 16
                xq = torch.cat([xq, xq.new_zeros(17 - m, k)])
            return (torch._int_mm(xq, wt)[:m].float() * sx * sw).to(x.dtype)
        return run

    add("int8 _int_mm + act quant", "int8 W8A8 dynamic", int_mm)

    if not cuda:
        def int8pack():
            s = ws8.reshape(n).to(torch.bfloat16)
            return lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), w8, s)
        add("int8 w-only _weight_int8pack_mm", "int8 W8A16", int8pack)

        def fbgemm_dynamic():
            qweight = torch.quantize_per_channel(wf, ws8.reshape(n).double(), torch.zeros(n, dtype=torch.long),
                                                 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
            return lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed).to(x.dtype)
        add("int8 fbgemm linear_dynamic (per-tensor act)", "int8 W8A8 dynamic", fbgemm_dynamic)

    def scaled_mm():
        s = wf.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
        wq = (wf / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        sw = s.reshape(1, n).contiguous()

        def run(x):
            xq, sx = _per_token_fp8(x)
            return torch._scaled_mm(xq, wq.t(), sx, sw, out_dtype=torch.bfloat16)
        return run

    add("fp8 _scaled_mm + act quant", "fp8 W8A8 dynamic", scaled_mm)

    if cuda:
        _add_gemlite(add, w, device, int4_parts, g, gemlite_autotune)
    return peers


_GEMLITE_SET = False


def _gemlite_no_autotune(gemlite) -> None:
    """gemlite autotunes each kernel on its first call per M bucket unless its config cache holds
    that shape; it ships caches for some GPUs (h100.json, ...) and picks one by device-name
    substring, so an H200 gets none and every peer call started with many Triton compiles and
    trials (tens of seconds per M, inside the timed budget). Fall back to the H100 cache on
    sm_90 when none was loaded, and set autotune to "default" (one config per kernel type) for
    shapes no cache holds. Once per process: set_autotune reloads gemlite's kernel modules."""
    global _GEMLITE_SET
    if _GEMLITE_SET:
        return
    _GEMLITE_SET = True
    try:
        from gemlite import core
        cache = getattr(core, "GEMLITE_TRITON_CONFIG_CACHE", None)
        if not cache and torch.cuda.get_device_capability() == (9, 0):
            h100 = Path(core.__file__).parent / "configs" / "h100.json"
            if h100.exists():
                gemlite.load_config(str(h100), print_error=False)
        gemlite.set_autotune("default")
    except Exception as e:  # an older/newer gemlite without these knobs: it autotunes, say so
        print(f"run.py: could not turn gemlite's autotuning off ({type(e).__name__}: {e})", file=sys.stderr)


def _add_gemlite(add, w, device, int4_parts, g, autotune=False):
    try:
        import gemlite  # noqa: F401
        from gemlite import helper
    except Exception as e:
        why = f"gemlite not importable: {e}"   # `e` is unbound once the except block ends
        add("gemlite", "-", lambda: (_ for _ in ()).throw(RuntimeError(why)))
        return
    if not autotune:
        _gemlite_no_autotune(gemlite)
    wb = w.to(torch.bfloat16)
    n, k = w.shape

    def linear_layer():
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        lin.weight.data.copy_(wb)
        return lin

    def a16w4():
        q, s, lo = int4_parts()
        # gemlite's A16Wn: W = (W_q - zeros) * scales, per group along K
        zeros = (-lo / s).to(torch.bfloat16)
        return helper.A16Wn(device=str(device)).from_weights(q.to(torch.uint8), s.to(torch.bfloat16), zeros, 4, g)

    add("int4 gemlite", "int4 W4A16 g128", a16w4)
    add("int8 w-only gemlite", "int8 W8A16", lambda: helper.A16W8(device=str(device)).from_linear(linear_layer()))
    add("fp8 W8A8 gemlite", "fp8 W8A8 dynamic",
        lambda: helper.A8W8_fp8_dynamic(device=str(device)).from_linear(linear_layer()))
    add("int8 W8A8 gemlite", "int8 W8A8 dynamic",
        lambda: helper.A8W8_int8_dynamic(device=str(device)).from_linear(linear_layer()))

    def mxfp4():
        cls = getattr(helper, "A16W4_MXFP", None)
        if cls is None:
            raise RuntimeError("this gemlite has no helper.A16W4_MXFP")
        return cls(device=str(device)).from_linear(linear_layer())

    add("mxfp4 w-only gemlite", "mxfp4 W4A16", mxfp4)


def bench_peers(w, xs, base, timer, progress, emit, gemlite_autotune=False) -> None:
    """Time every peer on one weight; each row goes to emit() when measured (OutOfTime as above).
    With --graph on a GPU the peers are built C times (C sized by the smallest, 4-bit, weight) and
    each is timed rotating over its copies; every copy is freed on return."""
    try:
        _bench_peers(w, xs, base, timer, progress, emit, gemlite_autotune)
    finally:
        free_memory(w.device)  # the builds died with _bench_peers' frame


def _bench_peers(w, xs, base, timer, progress, emit, gemlite_autotune):
    n, k = w.shape
    timer.check()
    builds = [build_peers(w, w.device, gemlite_autotune)]
    for _ in range(timer.copies(n * k // 2) - 1):
        builds.append(build_peers(w, w.device, gemlite_autotune))
    for m, x in xs.items():
        xb = x.to(torch.bfloat16)
        for name, (method, fn) in builds[0].items():
            row = {"peer": name, "method": method, "n": n, "k": k, "m": m, "base": base[m]["base"],
                   "base_us": base[m]["base_us"]}
            if isinstance(fn, str):
                emit({**row, "error": fn})
                continue
            # a later build that failed (out of memory, say) leaves fewer copies, not an error
            fns = [b[name][1] for b in builds if name in b and callable(b[name][1])]
            timer.check()
            try:
                t = timer([lambda f=f: f(xb) for f in fns])
                emit({**row, "us": t["us"], "us_min": t["us_min"], "reps": t["n"], "timing": t["how"],
                      "speedup": base[m]["base_us"] / t["us"]})
            except Exception as e:
                emit({**row, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
        progress.step(f"peers {n}x{k} M={m}")


# ---- dispatch overhead ------------------------------------------------------------------------
def measure_overhead(specs, device, dtype, iters: int) -> list[dict]:
    """Per call: omniq.linear(x, prepared) minus kernel.run(x, prepared.data) on a small layer
    (so the kernel's own time, and its noise, stay small), the choice already cached. Blocks of
    20 calls of each alternate, so that both see the same machine state; medians over blocks."""
    out = []
    n = k = 256
    block = 20
    pc = time.perf_counter
    for spec in specs:
        label, scheme = parse_scheme(spec)
        qw = scheme.quantize(torch.randn(n, k, device=device) * 0.02)
        p = omniq.prepare(qw, device, dtype)
        for shape in ((1, k), (1, 1, k)):
            x = torch.randn(*shape, device=device, dtype=dtype)
            kern = p.kernel_for(1, dtype)
            data = p.data
            lead = x.shape[:-1]
            # the kernel as a caller without omniq would run it: flattened in, reshaped out
            direct = ((lambda: kern.run(x, data, None)) if x.dim() == 2 else
                      (lambda: kern.run(x.reshape(-1, k), data, None).reshape(*lead, n)))
            fns = {"kernel": direct, "linear": lambda: omniq.linear(x, p),
                   "linear_qw": lambda: omniq.linear(x, qw)}
            for f in fns.values():
                for _ in range(200):
                    f()
            sync(device)
            samples = {name: [] for name in fns}
            for _ in range(max(1, iters // block)):
                for name, f in fns.items():
                    t0 = pc()
                    for _ in range(block):
                        f()
                    samples[name].append((pc() - t0) / block)
            kd, kv, kq = (statistics.median(samples[v]) * 1e6 for v in ("kernel", "linear", "linear_qw"))
            out.append({"scheme": label, "kernel": kern.name, "x_shape": list(shape), "kernel_us": kd,
                        "linear_us": kv, "overhead_us": kv - kd, "linear_qw_us": kq, "overhead_qw_us": kq - kd,
                        "target_us": OVERHEAD_TARGET_US})
    return out


def dispatch_breakdown(spec, device, dtype, number: int = 20000) -> list[tuple[str, float]]:
    """Where omniq.linear's own time goes, piece by piece (min over repeats, us per call): the
    whole call around a kernel that does nothing, and each step of the hot path on its own."""
    import timeit
    from omniq.dispatch import overrides
    from omniq.dispatch.kernel import m_bucket
    from omniq.linear import _prepared
    _, scheme = parse_scheme(spec)
    k = 256
    qw = scheme.quantize(torch.randn(256, k, device=device) * 0.02)
    p = omniq.prepare(qw, device, dtype)
    x2 = torch.randn(1, k, device=device, dtype=dtype)
    x3 = x2.reshape(1, 1, k)
    y = torch.empty(1, 256, device=device, dtype=dtype)

    class _NoOp:  # stands in for the kernel so that only dispatch is timed
        name = "no-op"

        def run(self, x, prepared, bias):
            return y

    p.kernel_for(1, dtype)
    pq = _prepared(qw, x2.device, dtype)  # the copy omniq.linear(x, qw) finds in its weak cache
    pq.kernel_for(1, dtype)
    real = {id(q): dict(q._choices) for q in (p, pq)}
    for q in (p, pq):
        for key in q._choices:
            q._choices[key] = _NoOp()
    env = {"omniq": omniq, "p": p, "qw": qw, "x2": x2, "x3": x3, "y": y, "torch": torch, "dtype": dtype,
           "overrides": overrides, "m_bucket": m_bucket, "_prepared": _prepared, "dev": x2.device}
    steps = [("omniq.linear(x[1, K], prepared), no-op kernel", "omniq.linear(x2, p)"),
             ("omniq.linear(x[1, 1, K], prepared), no-op kernel", "omniq.linear(x3, p)"),
             ("omniq.linear(x[1, K], QuantizedWeight), no-op kernel", "omniq.linear(x2, qw)"),
             ("  PreparedLinear.kernel_for (choice cached)", "p.kernel_for(1, dtype)"),
             ("    overrides.generation()", "overrides.generation()"),
             ("    m_bucket(m)", "m_bucket(1)"),
             ("  torch.compiler.is_compiling()", "torch.compiler.is_compiling()"),
             ("  x.reshape(-1, K)  (3-D input only)", "x3.reshape(-1, 256)"),
             ("  y.reshape(*lead, N)  (3-D input only)", "y.reshape(1, 1, 256)"),
             ("  weak-dict lookup of a QuantizedWeight's prepared copy", "_prepared(qw, dev, dtype)")]
    out = []
    try:
        for label, stmt in steps:
            t = min(timeit.repeat(stmt, globals=env, number=number, repeat=5)) / number * 1e6
            out.append((label, t))
    finally:
        for q in (p, pq):
            q._choices.update(real[id(q)])
    return out


# ---- output -----------------------------------------------------------------------------------
def _fmt_us(v):
    if v is None:
        return "-"
    return f"{v:,.1f}" if v < 1e5 else f"{v:,.0f}"


def _fmt_x(v: float) -> str:
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"


KERNEL_HDR = (f"{'scheme':<42} {'N x K':>12} {'M':>5} {'base':>4} {'base us':>11}  {'kernel':<26} {'us':>11} "
              f"{'speedup':>8} {'err':>9}")
PEER_HDR = f"{'peer':<46} {'method':<20} {'N x K':>12} {'M':>5} {'us':>11} {'speedup':>8}"


def timing_desc(meta) -> str:
    """How the rows were timed, in words (older JSON files carry only cache_flush)."""
    if meta.get("timing"):
        return meta["timing"]
    return f"median, caches {'flushed' if meta.get('cache_flush') else 'warm'} before each call"


def meta_lines(meta) -> list[str]:
    return [f"# omniq benchmark  {meta['date']}  commit {meta['commit']}",
            f"# device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, act dtype {meta['dtype']}",
            f"# baseline: {meta['baseline']}; timing: {timing_desc(meta)}, {meta.get('threads', '?')} threads",
            f"# err: max |y - scheme.matmul| / max |scheme.matmul| over the first {meta['err_rows']} rows; "
            f"* = the kernel omniq.linear picks"]


def kernel_line(r) -> str:
    shape = f"{r['n']}x{r['k']}"
    if r.get("error"):
        return (f"{r['scheme']:<42} {shape:>12} {r['m']:>5} {'':>4} {'':>11}  {str(r.get('kernel')):<26} "
                f"error: {r['error'][:90]}")
    mark = "*" if r.get("chosen") else " "
    return (f"{r['scheme']:<42} {shape:>12} {r['m']:>5} {r['base']:>4} {_fmt_us(r['base_us']):>11} "
            f"{mark}{r['kernel']:<26} {_fmt_us(r['us']):>11} {_fmt_x(r['speedup']):>8} {r['err']:>9.2e}")


def peer_line(r) -> str:
    shape = f"{r['n']}x{r['k']}"
    if r.get("error"):
        return f"{r['peer']:<46} {r['method']:<20} {shape:>12} {r['m']:>5} unavailable: {r['error'][:80]}"
    return (f"{r['peer']:<46} {r['method']:<20} {shape:>12} {r['m']:>5} {_fmt_us(r['us']):>11} "
            f"{_fmt_x(r['speedup']):>8}")


def summary_lines(results) -> list[str]:
    """The dispatcher's pick, speedup per M (needs every row of a (scheme, shape): printed at the end)."""
    if not results:
        return []
    ms = sorted({r["m"] for r in results})
    out = ["", "# speedup of the kernel omniq.linear picks, per M (x = over the baseline of the same shape)"]
    hdr = f"{'scheme':<42} {'N x K':>12} " + " ".join(f"{'M=' + str(m):>8}" for m in ms)
    out += [hdr, "-" * len(hdr)]
    keys = []
    for r in results:
        key = (r["scheme"], r["n"], r["k"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        cells = []
        for m in ms:
            hit = [r for r in results if (r["scheme"], r["n"], r["k"]) == key and r["m"] == m and r.get("chosen")
                   and not r.get("error")]
            cells.append(f"{_fmt_x(hit[0]['speedup']):>8}" if hit else f"{'-':>8}")
        out.append(f"{key[0]:<42} {str(key[1]) + 'x' + str(key[2]):>12} " + " ".join(cells))
    return out


def overhead_lines(overhead) -> list[str]:
    if not overhead:
        return []
    out = ["", f"# dispatch overhead: omniq.linear minus the kernel it calls (choice cached), target <= "
               f"{OVERHEAD_TARGET_US:.0f} us"]
    hdr = (f"{'scheme':<30} {'kernel':<26} {'x':>10} {'kernel us':>10} {'linear us':>10} {'overhead':>9} "
           f"{'via qw':>9}")
    out += [hdr, "-" * len(hdr)]
    for r in overhead:
        out.append(f"{r['scheme']:<30} {r['kernel']:<26} {str(tuple(r['x_shape'])):>10} {r['kernel_us']:>10.2f} "
                   f"{r['linear_us']:>10.2f} {r['overhead_us']:>8.2f}us {r['overhead_qw_us']:>8.2f}us")
    return out


def print_tables(meta, results, peers, overhead, out=sys.stdout):
    """Every table at once (for a caller holding finished results; run.py itself streams them)."""
    lines = meta_lines(meta)
    if results:
        lines += ["", KERNEL_HDR, "-" * len(KERNEL_HDR)] + [kernel_line(r) for r in results]
        lines += summary_lines(results)
    if peers:
        lines += ["", "# peers: speedup over the same baseline, same process and shapes", PEER_HDR,
                  "-" * len(PEER_HDR)] + [peer_line(r) for r in peers]
    lines += overhead_lines(overhead)
    print("\n".join(lines), file=out)


class Report:
    """Results as they are measured: each row printed (and flushed) at once, the JSON rewritten
    after each group, so that a run killed by a timeout leaves everything measured before it."""

    def __init__(self, meta, json_path: str | None, out=sys.stdout):
        self.meta, self.json_path, self.out = meta, json_path, out
        self.results, self.peers, self.baselines = [], [], []
        self.overhead, self.breakdown = [], []
        self.table = None

    def say(self, *lines: str) -> None:
        if not lines:
            return
        print("\n".join(lines), file=self.out, flush=True)

    def start(self) -> None:
        self.say(*meta_lines(self.meta))

    def kernel_row(self, r) -> None:
        self.results.append(r)
        if self.table != "kernels":
            self.table = "kernels"
            self.say("", KERNEL_HDR, "-" * len(KERNEL_HDR))
        self.say(kernel_line(r))

    def peer_row(self, r) -> None:
        self.peers.append(r)
        if self.table != "peers":
            self.table = "peers"
            self.say("", "# peers: speedup over the same baseline, same process and shapes", PEER_HDR,
                     "-" * len(PEER_HDR))
        self.say(peer_line(r))

    def data(self) -> dict:
        """Everything measured, as --json writes it (and --md / --from-json read it)."""
        return {"meta": self.meta, "baselines": self.baselines, "results": self.results, "peers": self.peers,
                "overhead": self.overhead,
                "overhead_breakdown": [{"step": a, "us": b} for a, b in self.breakdown]}

    def save(self) -> None:
        """Rewrite the JSON file atomically (a reader or a kill never sees half a file)."""
        if not self.json_path:
            return
        data = self.data()
        path = Path(self.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)


# ---- the markdown report (--md) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """A method of the issue (#6) with its speedup targets over bf16 cuBLAS per M bucket."""
    title: str
    schemes: tuple[str, ...]          # scheme names (scheme.name)
    params: dict                      # parameters the scheme key must hold (as printed in it)
    targets: tuple[float, float, float]
    peer_methods: tuple[str, ...]     # build_peers' `method` strings of the same method


# (label, lowest M, highest M or None)
M_BUCKETS = (("1-16", 1, 16), ("32-64", 32, 64), (">=512", 512, None))
METHODS = (
    Method("int4 W4A16 g128", ("gptq", "awq"), {"bits": "4", "group_size": "128"}, (3.0, 2.0, 0.9),
           ("int4 W4A16 g128",)),
    Method("fp8 W8A8 dynamic per-token", ("fp8",), {"weight_granularity": "channel", "activation": "dynamic_token"},
           (1.8, 1.7, 1.65), ("fp8 W8A8 dynamic",)),
    Method("int8 W8A8 dynamic per-token", ("int8",), {"activation": "dynamic_token"}, (1.8, 1.7, 1.6),
           ("int8 W8A8 dynamic",)),
    Method("mxfp4 weight-only", ("mxfp4",), {"activation": "None"}, (2.8, 1.8, 0.9), ("mxfp4 W4A16",)),
    Method("nvfp4 weight-only", ("nvfp4",), {"activation": "None"}, (2.8, 1.8, 0.9), ()),
    Method("mxfp8 W8A8", ("mxfp8",), {"activation": "mxfp8"}, (1.6, 1.5, 1.5), ()),
    Method("GGUF q4_k", ("gguf",), {"type": "q4_k"}, (2.5, 1.5, 0.85), ()),
    Method("GGUF q8_0", ("gguf",), {"type": "q8_0"}, (1.6, 1.3, 0.85), ()),
)
METHOD_BY_NAME = {m.title: m for m in METHODS}
OTHER = "other schemes (no target in the issue)"


def parse_scheme_key(key: str | None):
    """'gptq(bits=4,group_size=128,...)' -> ('gptq', {'bits': '4', ...}); None when it is not one."""
    mt = re.fullmatch(r"\s*([\w.-]+)\s*(?:\((.*)\))?\s*", key or "")
    if not mt:
        return None
    params = {}
    for part in (mt.group(2) or "").split(","):
        if "=" in part:
            a, b = part.split("=", 1)
            params[a.strip()] = b.strip()
    return mt.group(1), params


def method_of(label: str, key: str | None = None) -> str:
    """The issue's method a scheme row belongs to (by its scheme key), or OTHER."""
    if not key:
        try:
            key = parse_scheme(label)[1].key
        except (Exception, SystemExit):  # a JSON from another commit: its label may not parse here
            key = label.split(":")[0]
    parsed = parse_scheme_key(key)
    if parsed is None:
        return OTHER
    name, params = parsed
    for m in METHODS:
        if name in m.schemes and all(params.get(a) == b for a, b in m.params.items()):
            return m.title
    return OTHER


def _in_bucket(m: int, lo: int, hi: int | None) -> bool:
    return m >= lo and (hi is None or m <= hi)


def _speed(v) -> str:
    return "-" if v is None else _fmt_x(v)


def _base_cell(row) -> str:
    """The baseline's time; its dtype in brackets where it is not bf16 (the faster fp32 on a CPU)."""
    if not row or row.get("base_us") is None:
        return "-"
    base = row.get("base", "bf16")
    return _fmt_us(row["base_us"]) + ("" if base == "bf16" else f" ({base})")


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return out


def render_md(data: dict) -> str:
    """The report of one run (the dict --json writes): per method, omniq's chosen kernel against bf16
    and the best peer of the same method per (shape, M); a summary against the issue's targets per
    M bucket; all peers side by side; the dispatch overhead when measured."""
    meta = data.get("meta", {})
    results = data.get("results", [])
    peers = data.get("peers", [])
    base_rows = {(b["n"], b["k"], b["m"]): b for b in data.get("baselines", [])}
    ok_peers = [q for q in peers if not q.get("error") and q.get("speedup")]

    labels: list[str] = []
    keys: dict[str, str | None] = {}
    for r in results:
        if r["scheme"] not in labels:
            labels.append(r["scheme"])
        keys[r["scheme"]] = keys.get(r["scheme"]) or r.get("scheme_key")
    by_method: dict[str, list[str]] = {}
    for lab in labels:
        by_method.setdefault(method_of(lab, keys.get(lab)), []).append(lab)

    def chosen_row(lab, n, k, m):
        hit = [r for r in results if r["scheme"] == lab and (r["n"], r["k"], r["m"]) == (n, k, m) and r.get("chosen")]
        good = [r for r in hit if not r.get("error")]
        return (good or hit or [None])[0]

    def fastest_row(lab, n, k, m):
        rows = [r for r in results if r["scheme"] == lab and (r["n"], r["k"], r["m"]) == (n, k, m)
                and not r.get("error") and r.get("us")]
        return min(rows, key=lambda r: r["us"]) if rows else None

    def peer_rows(method, n, k, m):
        pm = METHOD_BY_NAME.get(method)
        if pm is None:
            return []
        return [q for q in ok_peers if q.get("method") in pm.peer_methods and (q["n"], q["k"], q["m"]) == (n, k, m)]

    def cells(lab):
        seen = []
        for r in results:
            if r["scheme"] == lab and (r["n"], r["k"], r["m"]) not in seen:
                seen.append((r["n"], r["k"], r["m"]))
        return seen

    complete = "complete" if meta.get("complete") else f"cut short ({meta.get('cut_short', 'unfinished')})"
    out = ["# omniq: chosen kernels against bf16 and peers", "",
           f"- date {meta.get('date', '?')}, commit `{meta.get('commit', '?')}`, {complete}",
           f"- device: {meta.get('device_name', '?')} ({meta.get('device', '?')}), torch {meta.get('torch', '?')}, "
           f"activations {meta.get('dtype', '?')}",
           f"- baseline: {meta.get('baseline', '?')}",
           f"- timing: {timing_desc(meta)}",
           "- speedup = baseline time / time, same process and shapes; the omniq kernel is the one "
           "`omniq.linear` picks for that M", ""]

    # summary against the targets
    summary = []
    for method in METHODS:
        for lab in by_method.get(method.title, []):
            cs = cells(lab)
            for (bname, lo, hi), target in zip(M_BUCKETS, method.targets):
                mine = [c for c in cs if _in_bucket(c[2], lo, hi)]
                sp = []
                for c in mine:
                    r = chosen_row(lab, *c)
                    if r is not None and not r.get("error") and r.get("speedup"):
                        sp.append(r["speedup"])
                low = min(sp) if sp else None
                best = None
                for name in sorted({q["peer"] for c in mine for q in peer_rows(method.title, *c)}):
                    v = [q["speedup"] for c in mine for q in peer_rows(method.title, *c) if q["peer"] == name]
                    if v and (best is None or min(v) > best[1]):
                        best = (name, min(v))
                if low is None:
                    status = "not measured"
                elif low >= target:
                    status = "met" if len(sp) == len(mine) else f"met on {len(sp)}/{len(mine)} measured"
                else:
                    status = "**not met**"
                summary.append([method.title, f"`{lab}`", bname, _speed(low), f"{target:.2f}x", status,
                                f"{len(sp)}/{len(mine)}", "-" if best is None else f"{best[0]} {_fmt_x(best[1])}"])
    if summary:
        out += ["## Against the issue's targets", "",
                "Lowest speedup of the chosen kernel over the shapes and M of each bucket (M 1-16, 32-64, "
                ">= 512); the best peer is the peer of the same method whose lowest speedup there is highest.", ""]
        out += _md_table(["method", "scheme", "M", "omniq min", "target", "status", "cells", "best peer (min)"],
                         summary)
        out.append("")

    # per method: rows (N x K, M)
    order = [m.title for m in METHODS] + [OTHER]
    any_other = any(r.get("chosen") is False and not r.get("error") for r in results)
    for title in order:
        for lab in by_method.get(title, []):
            out += [f"## {title}: `{lab}`", ""]
            hdr = ["N x K", "M", "bf16 µs", "omniq kernel (chosen)", "µs", "speedup", "best peer", "peer speedup"]
            if any_other:
                hdr.append("fastest timed (if not chosen)")
            rows = []
            for n, k, m in cells(lab):
                r = chosen_row(lab, n, k, m)
                bcell = _base_cell(base_rows.get((n, k, m)) or r)
                if r is None:
                    kcell, us, sp = "(none chosen)", "-", "-"
                elif r.get("error"):
                    kcell, us, sp = f"{r.get('kernel') or '-'}: error: {r['error'][:80]}", "-", "-"
                else:
                    kcell, us, sp = f"`{r['kernel']}`", _fmt_us(r["us"]), _fmt_x(r["speedup"])
                ps = peer_rows(title, n, k, m)
                bp = max(ps, key=lambda q: q["speedup"]) if ps else None
                row = [f"{n} x {k}", m, bcell, kcell, us, sp, bp["peer"] if bp else "-",
                       _fmt_x(bp["speedup"]) if bp else "-"]
                if any_other:
                    f = fastest_row(lab, n, k, m)
                    row.append("-" if f is None or (r is not None and f["kernel"] == r.get("kernel"))
                               else f"`{f['kernel']}` {_fmt_x(f['speedup'])}")
                rows.append(row)
            out += _md_table(hdr, rows) + [""]

    # every peer side by side (the layout of performance.md)
    if peers:
        names = []
        for q in peers:
            if q["peer"] not in names:
                names.append(q["peer"])
        shapes_m = []
        for q in peers:
            if (q["n"], q["k"], q["m"]) not in shapes_m:
                shapes_m.append((q["n"], q["k"], q["m"]))
        rows = []
        for n, k, m in shapes_m:
            hit0 = [q for q in peers if (q["n"], q["k"], q["m"]) == (n, k, m)]
            row = [f"{n} x {k}", m, _base_cell(base_rows.get((n, k, m)) or hit0[0])]
            for name in names:
                hit = [q for q in peers if q["peer"] == name and (q["n"], q["k"], q["m"]) == (n, k, m)]
                row.append(_fmt_x(hit[0]["speedup"]) if hit and not hit[0].get("error") and hit[0].get("speedup")
                           else "n/a" if hit else "-")
            rows.append(row)
        methods = {q["peer"]: q.get("method", "") for q in peers}
        out += ["## Peers", "", "Speedup over the same baseline; n/a: the peer could not be built or run here "
                "(the JSON has the reason); -: not measured.", ""]
        out += _md_table(["N x K", "M", "bf16 µs"] + [f"{nm} ({methods[nm]})" for nm in names], rows) + [""]

    if data.get("overhead"):
        rows = [[o["scheme"], f"`{o['kernel']}`", str(tuple(o["x_shape"])), f"{o['kernel_us']:.2f}",
                 f"{o['linear_us']:.2f}", f"{o['overhead_us']:.2f}", f"{o['overhead_qw_us']:.2f}"]
                for o in data["overhead"]]
        out += ["## Dispatch overhead", "", f"omniq.linear minus the kernel it calls, µs per call (target <= "
                f"{OVERHEAD_TARGET_US:.0f} µs).", ""]
        out += _md_table(["scheme", "kernel", "x", "kernel µs", "linear µs", "overhead", "via qw"], rows) + [""]
    return "\n".join(out)


def write_md(data: dict, path: str) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_md(data))
    return f"--md: wrote {p}"


def write_plots(results, plot_dir: str, peers=()) -> str:
    """A PNG per (scheme, shape): speedup vs M of each timed kernel, omniq.linear's pick, and the
    peers of the same method (dotted)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"--plot: matplotlib is not installed (pip install matplotlib); no plots written to "
                f"{plot_dir}; the JSON (--json) holds the same numbers")
    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict = {}
    for r in results:
        if r.get("error") or r.get("kernel") is None:
            continue
        groups.setdefault((r["scheme"], r["n"], r["k"]), []).append(r)
    written = 0
    for (scheme, n, k), rows in groups.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for kern in sorted({r["kernel"] for r in rows}):
            pts = sorted((r["m"], r["speedup"]) for r in rows if r["kernel"] == kern)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=kern)
        chosen = sorted((r["m"], r["speedup"]) for r in rows if r.get("chosen"))
        if chosen:
            ax.plot([a for a, _ in chosen], [b for _, b in chosen], "k--", lw=2.5, alpha=0.5,
                    label="omniq.linear's pick")
        pm = METHOD_BY_NAME.get(method_of(scheme, rows[0].get("scheme_key")))
        for peer in sorted({q["peer"] for q in peers if pm and q.get("method") in pm.peer_methods}):
            pts = sorted((q["m"], q["speedup"]) for q in peers if q["peer"] == peer and (q["n"], q["k"]) == (n, k)
                         and not q.get("error") and q.get("speedup"))
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], ":", marker=".", label=f"peer: {peer}")
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        bases = sorted({r["base"] for r in rows})
        ax.set_ylabel(f"speedup over the {'/'.join(bases)} matmul")
        ax.set_title(f"{scheme}  N x K = {n} x {k}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{scheme}_{n}x{k}") + ".png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written += 1
    written += _summary_plot(plt, groups, out)
    return f"--plot: wrote {written} PNG(s) to {out}"


def _summary_plot(plt, groups: dict, out: Path) -> int:
    """summary.png: omniq.linear's pick for every scheme, one panel per shape (the README's plot)."""
    shapes = sorted({(n, k) for _, n, k in groups})
    if not shapes:
        return 0
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.4), sharey=True, squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        for (scheme, gn, gk), rows in sorted(groups.items()):
            pts = sorted((r["m"], r["speedup"]) for r in rows if r.get("chosen") and (gn, gk) == (n, k))
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=scheme)
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"N x K = {n} x {k}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup over the bf16 matmul (omniq's pick)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)
    return 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", help="comma-separated scheme specs (name[:param=value...]); default: every family")
    ap.add_argument("--shapes", help="comma-separated N x K (out x in), e.g. 3072x12288,8192x8192")
    ap.add_argument("--m", help="comma-separated M values, e.g. 1,16,512")
    ap.add_argument("--quick", action="store_true", help=f"small preset: shapes {QUICK_SHAPES}, M {QUICK_M}, "
                                                          f"{len(QUICK_SCHEMES)} schemes")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best present)")
    ap.add_argument("--dtype", default="bfloat16", help="activation dtype (bfloat16, float16, float32)")
    ap.add_argument("--kernels", default=None, help="regex: time only kernels whose name matches")
    ap.add_argument("--graph", action="store_true",
                    help="CUDA: time graph replays of many calls rotating over copies of the weight "
                         "(the method of performance.md; no cache flush)")
    ap.add_argument("--chosen-only", action="store_true",
                    help="time only the kernel omniq.linear picks for each M (plus the baseline and peers)")
    ap.add_argument("--peers", action="store_true", help="also time torch built-ins, gemlite, dequant+mm")
    ap.add_argument("--no-kernels", action="store_true", help="skip omniq's kernels (with --peers/--overhead)")
    ap.add_argument("--overhead", action="store_true", help="measure omniq.linear's cost above its kernel")
    ap.add_argument("--overhead-iters", type=int, default=5000)
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--plot", help="write PNG plots of speedup vs M to this directory")
    ap.add_argument("--md", help="write a markdown report (per method: chosen kernel vs bf16 and the best "
                                 "peer; the issue's targets per M bucket) to this file")
    ap.add_argument("--from-json", metavar="PATH",
                    help="measure nothing: print the tables of a --json file and render --md / --plot from it")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement "
                                                               "(default 0.5 on CPUs, 0.2 on GPUs)")
    ap.add_argument("--reps", type=int, default=100,
                    help="at most this many timed calls (graph replays with --graph) per measurement")
    ap.add_argument("--slow", type=float, default=3.0, help="a call slower than this (s) is timed once")
    ap.add_argument("--no-flush", action="store_true", help="do not evict caches between timed calls "
                                                             "(weights then stay cache-resident: optimistic; "
                                                             "--graph on CUDA never flushes: its copies keep "
                                                             "weights cold)")
    ap.add_argument("--err-rows", type=int, default=64, help="rows of x the error is measured on")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no new measurement after this many seconds; print and write what was measured")
    ap.add_argument("--gemlite-autotune", action="store_true",
                    help="let gemlite autotune on first call (--peers; slow: off by default)")
    args = ap.parse_args(argv)
    if args.from_json:
        return render_saved(args)

    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"run.py: unknown dtype {args.dtype!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.graph and device.type != "cuda":
        print("run.py: --graph applies to CUDA only; timing with perf_counter", file=sys.stderr)
    specs = args.schemes.split(",") if args.schemes else list(QUICK_SCHEMES if args.quick else DEFAULT_SCHEMES)
    schemes = [parse_scheme(s.strip()) for s in specs if s.strip()]
    shapes = parse_shapes(args.shapes) if args.shapes else list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    ms = [int(v) for v in args.m.split(",")] if args.m else list(QUICK_M if args.quick else DEFAULT_M)
    if device.type == "cpu" and not (args.quick or args.shapes or args.m or args.no_kernels):
        print("run.py: the default grid on a CPU takes hours; --quick runs a small preset", file=sys.stderr)
    budget = args.budget if args.budget is not None else (0.5 if device.type == "cpu" else 0.2)
    timer = Timer(device, budget, args.reps, args.graph, args.slow, flush=not args.no_flush,
                  max_seconds=args.max_seconds)
    rotating = bool(args.graph and device.type == "cuda")
    if rotating:
        timing = (f"CUDA graph replay: a graph holds `inner` rounds of calls over C copies of the weight "
                  f"(C = ceil(3 x L2 / bytes of one copy), 1..{MAX_COPIES}; inner * C <= {GRAPH_MAX_CALLS}, "
                  f"aiming at >= {GRAPH_TARGET_US:.0f} us per replay), time per call = replay / (inner * C), "
                  f"median over replays, no cache flush (eager CUDA events with a flush where a capture fails)")
    else:
        clock = "CUDA events around each call" if device.type == "cuda" else "perf_counter around each call"
        timing = f"{clock}, median, caches {'warm' if args.no_flush else 'flushed'} before each call"
    base_desc = ("bf16 F.linear (cuBLAS)" if device.type == "cuda" else
                 "the faster of bf16 and fp32 F.linear per (shape, M); column 'base' says which")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "commit": git_commit(), "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "omniq": omniq.__version__, "python": platform.python_version(),
            "dtype": args.dtype, "baseline": base_desc, "err_rows": args.err_rows, "budget_s": budget,
            "graph": bool(args.graph and device.type == "cuda"), "argv": sys.argv[1:] if argv is None else argv,
            "threads": torch.get_num_threads(), "cache_flush": not args.no_flush and not rotating,
            "timing": timing, "chosen_only": bool(args.chosen_only),
            "max_seconds": args.max_seconds, "complete": False}

    steps = 0 if args.no_kernels else len(schemes) * len(shapes) * len(ms)
    steps += len(shapes) * len(ms) if args.peers else 0
    progress = Progress(steps, enabled=not args.no_progress)
    report = Report(meta, args.json)
    report.start()
    # a `timeout` (SIGTERM) ends the grid like --max-seconds: the summary and the JSON still come out
    try:
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # main() called from a thread other than the main one
        pass
    cut = None
    try:
        for n, k in shapes:
            timer.check()
            g = torch.Generator(device="cpu").manual_seed(args.seed + n * 7 + k)
            w = (torch.randn(n, k, generator=g) * 0.02).to(device)
            xs = {m: torch.randn(m, k, generator=g).to(device=device, dtype=dtype) for m in ms}
            base = dense_baseline(w, xs, timer, device)
            report.baselines += [{"n": n, "k": k, "m": m, **row} for m, row in base.items()]
            report.save()
            if not args.no_kernels:
                for label, scheme in schemes:
                    try:
                        bench_scheme(label, scheme, w, xs, base, args, timer, device, dtype, progress,
                                     report.kernel_row)
                    finally:
                        report.save()  # after each (scheme, shape) group, cut short or not
            if args.peers:
                try:
                    bench_peers(w, xs, base, timer, progress, report.peer_row, args.gemlite_autotune)
                finally:
                    report.save()
            del w, xs
    except OutOfTime:
        cut = f"--max-seconds {args.max_seconds:g} passed"
    except KeyboardInterrupt:
        cut = "interrupted"
    progress.close()
    if cut:
        # stdout has every row measured so far; this line says the grid is incomplete
        report.say("", f"# grid cut short ({cut}): {len(report.results)} kernel rows, {len(report.peers)} peer "
                       f"rows measured; later (scheme, shape, M) were not started")
        report.meta["cut_short"] = cut
    report.say(*summary_lines(report.results))

    if args.overhead and not cut:
        ospecs = [s for s in specs if s in OVERHEAD_SCHEMES] or list(OVERHEAD_SCHEMES)
        report.overhead = measure_overhead(ospecs, device, dtype, args.overhead_iters)
        report.breakdown = dispatch_breakdown(ospecs[0], device, dtype, number=max(1000, 4 * args.overhead_iters))
        report.say(*overhead_lines(report.overhead))
    if report.breakdown:
        report.say("", "# where omniq.linear's own time goes (us per call, min over repeats; a no-op kernel "
                       "stands in)", *(f"{label:<60} {t:8.2f}" for label, t in report.breakdown))
    report.meta["complete"] = not cut
    report.save()
    if args.json:
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.md:
        print(write_md(report.data(), args.md), file=sys.stderr)
    if args.plot:
        print(write_plots(report.results, args.plot, report.peers), file=sys.stderr)
    return 0


def render_saved(args) -> int:
    """--from-json: the tables, --md and --plot of results measured earlier (on a GPU machine, say)."""
    try:
        data = json.loads(Path(args.from_json).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"run.py: cannot read --from-json {args.from_json}: {e}")
    if not isinstance(data, dict) or "meta" not in data:
        raise SystemExit(f"run.py: {args.from_json} is not a run.py --json file (no 'meta')")
    print_tables(data["meta"], data.get("results", []), data.get("peers", []), data.get("overhead", []))
    if args.md:
        print(write_md(data, args.md), file=sys.stderr)
    if args.plot:
        print(write_plots(data.get("results", []), args.plot, data.get("peers", [])), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
