"""The GPU profiling helpers' plain-Python parts, on the CPU: probe_floor's least-squares fit, and
that every profile_ncu / probe_floor case names a registered kernel and a valid scheme (a typo
would otherwise only show on the GPU machine, in its limited time)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import omniq
from omniq.dispatch import get_kernel

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"omniq_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_floor_fit_recovers_a_line():
    fit = _load("probe_floor").fit
    # t = 3 us + bytes / (2000 GB/s) = 3 + bytes / 2e6 us, with some bytes sizes
    pts = [(b, 3.0 + b / 2e6) for b in (4e6, 8e6, 16e6, 32e6, 64e6)]
    a, bw = fit(pts)
    assert a == pytest.approx(3.0, abs=1e-9) and bw == pytest.approx(2000.0, rel=1e-9)


def test_floor_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two different sizes"):
        _load("probe_floor").fit([(8e6, 5.0), (8e6, 5.1)])


@pytest.mark.parametrize("module,table", [("profile_ncu", "CASES"), ("probe_floor", "SUBJECTS")])
def test_cases_name_real_kernels_and_schemes(module, table):
    cases = getattr(_load(module), table)
    assert cases
    for label, case in cases.items():
        scheme, params, kernel = (case[0], case[1], case[-1])
        if kernel is None:          # the bf16 baseline
            continue
        k = get_kernel(kernel)
        sch = omniq.get_scheme(scheme, **params)
        assert k.serves(sch) is None, (label, k.serves(sch))
