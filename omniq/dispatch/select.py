"""Choosing a kernel: filter by validity, then order by measurement, else static priority.

Order of evidence: the tuning table for the device (shipped + user cache), else a short timed
trial when tuning is enabled (OMNIQ_TUNE=1 or omniq.set_tuning(True)), else static priority,
`Kernel.static_rank(problem)` (`priority` unless a kernel ranks itself per M or scheme).
Nothing is timed while a CUDA graph is being captured.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from omniq.dispatch import overrides, tuning
from omniq.dispatch.kernel import Kernel, Problem
from omniq.dispatch.registry import all_kernels, get_kernel
from omniq.errors import KernelError, where

_tuning_enabled = [None]


def set_tuning(enabled: bool | None) -> None:
    """Allow (True) or forbid (False) timed trials on first use; None defers to OMNIQ_TUNE."""
    _tuning_enabled[0] = enabled


def tuning_enabled() -> bool:
    if _tuning_enabled[0] is not None:
        return _tuning_enabled[0]
    return os.environ.get("OMNIQ_TUNE", "0") not in ("", "0", "false", "False")


@dataclass
class Verdict:
    """What the dispatcher thinks of one kernel for one problem."""

    kernel: str
    backend: str
    status: str                # chosen | valid | rejected | unavailable | disabled
    reason: str | None = None
    time_us: float | None = None

    def line(self) -> str:
        t = f" {self.time_us:9.1f} us" if self.time_us is not None else ""
        r = f"  ({self.reason})" if self.reason else ""
        return f"{self.status:<11} {self.kernel:<34} {self.backend:<9}{t}{r}"


def rejection(kernel: Kernel, problem: Problem) -> tuple[str, str] | None:
    """(status, reason) when `kernel` cannot run `problem`, else None."""
    why = kernel.serves(problem.scheme)
    if why:
        return "rejected", why
    why = kernel.available(problem.device)
    if why:
        return "unavailable", why
    why = kernel.can_implement(problem)
    if why:
        return "rejected", why
    return None


def _layout_ok(kernel: Kernel, layout) -> bool:
    """`layout` is None (any), one layout name, or a set of allowed names."""
    if layout is None:
        return True
    if isinstance(layout, str):
        return kernel.layout.name == layout
    return kernel.layout.name in layout


def candidates(problem: Problem, layout=None) -> list[Kernel]:
    """Valid, enabled kernels for `problem` (restricted to `layout`: a name or a set of names),
    by static priority."""
    disabled = overrides.disabled_kernels()
    out = [k for k in all_kernels()
           if k.name not in disabled and _layout_ok(k, layout) and rejection(k, problem) is None]
    return sorted(out, key=lambda k: -k.static_rank(problem))


def forced(problem: Problem, layout: str | None, layer: str | None = None,
           pinned: str | None = None) -> Kernel | None:
    """The forced kernel (the layer's `pinned` one, else OMNIQ_KERNEL / use_kernel), checked
    against the problem: an error with the reason if it can't run."""
    name = pinned or overrides.forced_kernel()
    if not name:
        return None
    k = get_kernel(name)
    bad = rejection(k, problem)
    if bad:
        raise KernelError(f"{where(layer)}forced kernel {name!r} cannot run {problem.scheme.name} "
                          f"N={problem.n} K={problem.k} M={problem.m} on {problem.device}: {bad[1]}")
    if not _layout_ok(k, layout):
        raise KernelError(f"{where(layer)}forced kernel {name!r} needs layout {k.layout.name!r} but the weight "
                          f"was prepared as {layout!r}; force the kernel before omniq.prepare()/loading")
    return k


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def measured_times(problem: Problem, kernels: list[Kernel]) -> dict[str, float] | None:
    """Times (us) from the tuning table for this problem, if the table knows it."""
    entry = tuning.lookup(problem.device, problem.key())
    if entry:
        return entry.get("times_us") or ({entry["kernel"]: 0.0} if "kernel" in entry else None)
    return None


def choose(problem: Problem, layout: str | None = None, prepared_for: dict | None = None,
           layer: str | None = None, pinned: str | None = None) -> Kernel:
    """The kernel to run `problem` with. `prepared_for` maps layout name -> prepared weight
    (needed only for a timed trial); `pinned` names a kernel this layer must use."""
    k = forced(problem, layout, layer, pinned)
    if k is not None:
        return k
    cands = candidates(problem, layout)
    if not cands:
        raise KernelError(f"{where(layer)}no kernel can run {problem.scheme.key} N={problem.n} K={problem.k} "
                          f"M={problem.m} {problem.act_dtype} on {problem.device}; "
                          f"see omniq.explain() for each kernel's reason")
    if len(cands) == 1:
        return cands[0]
    times = measured_times(problem, cands)
    if times:
        known = [c for c in cands if c.name in times]
        if known:
            return min(known, key=lambda c: times[c.name])
    if tuning_enabled() and prepared_for is not None and not _capturing(problem.device):
        times = trial(problem, cands, prepared_for)
        if times:
            return min(cands, key=lambda c: times.get(c.name, float("inf")))
    return cands[0]


def time_kernel(kernel: Kernel, x: torch.Tensor, prepared, reps: int = 10, warmup: int = 2) -> float:
    """Median time of kernel.run in microseconds. `prepared` is one prepared weight or a list of
    copies the calls rotate over (so that a weight smaller than L2 is timed as it streams from
    memory, as in a model, not L2-hot). CUDA: GPU time per call from replays of a CUDA graph of
    several calls (host launch cost excluded: it differs between Python launchers, not between
    kernels under graphs), eager CUDA events if the kernel cannot be captured."""
    preps = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    fns = [lambda p=p: kernel.run(x, p, None) for p in preps]
    for _ in range(warmup):
        for f in fns:
            f()
    samples = []
    if x.device.type == "cuda":
        rounds = max(1, 8 // len(fns))
        graph = capture_graph(fns, x.device, rounds=rounds)
        calls = rounds * len(fns) if graph is not None else len(fns)
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            if graph is not None:
                graph.replay()
            else:
                for f in fns:
                    f()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) * 1e3 / calls)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for f in fns:
                f()
            samples.append((time.perf_counter() - t0) * 1e6 / len(fns))
    samples.sort()
    return samples[len(samples) // 2]


def capture_graph(fns, device: torch.device, rounds: int = 1):
    """A CUDA graph of `rounds` passes over the callables `fns` (each warmed up once on a side
    stream first, as capture requires; a first call may set up per-object state), replayed once,
    or None when one of them cannot be captured (it syncs or allocates host memory)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(rounds):
                for f in fns:
                    f()
        g.replay()
        torch.cuda.synchronize(device)
        return g
    except Exception:  # noqa: BLE001 - timed eagerly instead
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a failed capture can leave the stream unusable for a moment
            pass
        return None


def trial(problem: Problem, cands: list[Kernel], prepared_for: dict, save: bool = True) -> dict[str, float]:
    """Time each candidate on a random activation of the problem's M bucket; record the result.
    prepared_for maps a layout name to its prepared weight, or to a list of copies to rotate over
    (time_kernel)."""
    x = torch.randn(problem.bucket, problem.k, device=problem.device, dtype=problem.act_dtype)
    times = {}
    for c in cands:
        prep = prepared_for.get(c.layout.name)
        if prep is None:
            continue
        try:
            times[c.name] = time_kernel(c, x, prep)
        except Exception:  # a kernel that fails its trial is not chosen
            continue
    if times and save:
        best = min(times, key=times.get)
        tuning.record(problem.device, {problem.key(): {"kernel": best, "times_us": times}})
    return times


def explain_problem(problem: Problem, layout: str | None = None, prepared_for: dict | None = None,
                    measure: bool = False, pinned: str | None = None) -> list[Verdict]:
    """Every registered kernel with its verdict for `problem`."""
    disabled = overrides.disabled_kernels()
    verdicts = []
    for k in sorted(all_kernels(), key=lambda k: (k.backend, -k.priority, k.name)):
        bad = rejection(k, problem)
        if bad:
            verdicts.append(Verdict(k.name, k.backend, bad[0], bad[1]))
        elif k.name in disabled:
            verdicts.append(Verdict(k.name, k.backend, "disabled", "in OMNIQ_DISABLE_KERNELS / disable_kernels()"))
        elif layout is not None and k.layout.name != layout:
            verdicts.append(Verdict(k.name, k.backend, "rejected",
                                    f"needs layout {k.layout.name!r}, the weight is prepared as {layout!r}"))
        else:
            verdicts.append(Verdict(k.name, k.backend, "valid"))
    valid = [v for v in verdicts if v.status == "valid"]
    times = measured_times(problem, []) or {}
    if measure and prepared_for is not None and valid:
        times = trial(problem, [get_kernel(v.kernel) for v in valid], prepared_for, save=False)
    for v in valid:
        v.time_us = times.get(v.kernel)
    try:
        chosen = choose(problem, layout, None, pinned=pinned).name
    except KernelError:
        chosen = None
        if pinned or overrides.forced_kernel():
            raise
    if measure and times and not (pinned or overrides.forced_kernel()):
        chosen = min((v for v in valid if v.time_us is not None), key=lambda v: v.time_us).kernel
    for v in verdicts:
        if v.kernel == chosen:
            v.status = "chosen"
    return verdicts
