"""How a problem the tuning table has not measured is served: leave-one-out over a table.

The dispatcher uses static priority (Kernel.static_rank) for a problem without a table entry
(and no timed trial).
This tool checks that rule against the measurements. For each measured entry E, it hides E and
picks E's kernel in two ways:
- by static priority, which is what the dispatcher does;
- by the ranking of the nearest remaining entry of the same scheme, an alternative. The
  distance is the sum of the |log2| ratios of N, K and the M bucket. `--within shape` takes
  only neighbours of the same N and K; `--within m` only those of the same M bucket.

Both picks are priced with E's own measured times: regret = the pick's time / E's fastest time.
The candidates are E's measured kernels of the layout that a layer of that scheme keeps (the
layout of most entries' fastest kernel). This matches run time, where a layer switches kernels
only within its one layout.

    python tools/tuning_loo.py [table.json] [--within any|shape|m] [-v]

On the shipped H200 table (2026-11-29), static priority had a mean regret of 1.037 and picked
the fastest kernel in 89 of 111 entries. Borrowing the nearest entry's ranking did worse, at
1.055-1.059 and 84-85 entries, with every `--within`. So the dispatcher does not borrow.

Two kernels then ranked themselves per problem, both read off the table's M = 16 cells:
- cuda.affine.mma_gemv yields to triton.affine.splitk above M = 8;
- triton.fp4.gemm leads weight-only MXFP4 at 8 < M <= 64.
With those, static priority's mean regret is 1.019, with the fastest kernel in 95 entries.
That figure is in-sample.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import types

import omniq  # noqa: F401 - registers the kernels
from omniq.dispatch import get_kernel, tuning


def split_key(key: str) -> tuple[str, int, int, int, str]:
    """(scheme key, n, k, m bucket, dtype) of a tuning-table key (Problem.key())."""
    scheme, n, k, m, dtype = key.rsplit("|", 4)
    return scheme, int(n[2:]), int(k[2:]), int(m[2:]), dtype


def _problem_view(scheme_key: str, m: int):
    """What static_rank reads of a Problem (M, the scheme's name and parameters), rebuilt from
    a table key's scheme part, e.g. "mxfp4(activation=None,scale_rule=floor)"."""
    name, _, params = scheme_key.partition("(")
    fields = dict(p.split("=", 1) for p in params.rstrip(")").split(",") if "=" in p)
    scheme = types.SimpleNamespace(name=name, **{k: (None if v == "None" else v) for k, v in fields.items()})
    return types.SimpleNamespace(m=m, scheme=scheme)


def layout_of(name: str) -> str | None:
    try:
        return get_kernel(name).layout.name
    except Exception:  # a kernel this install does not register
        return None


def nearest(key: str, keys: list[str], within: str) -> str | None:
    """The closest other key of the same scheme (ties: smaller M, then key order)."""
    _, n, k, m, _ = split_key(key)
    best = None
    for other in keys:
        if other == key:
            continue
        _, n2, k2, m2, _ = split_key(other)
        if within == "shape" and (n2, k2) != (n, k) or within == "m" and m2 != m:
            continue
        rank = (abs(math.log2(n2 / n)) + abs(math.log2(k2 / k)) + abs(math.log2(m2 / m)), m2, other)
        best = rank if best is None or rank < best else best
    return None if best is None else best[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("table", nargs="?", default=str(tuning.SHIPPED_DIR / "nvidia-h200.json"))
    ap.add_argument("--within", choices=("any", "shape", "m"), default="any")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per entry")
    args = ap.parse_args()
    entries = json.load(open(args.table))["entries"]
    by_scheme = collections.defaultdict(list)
    for key in entries:
        by_scheme[split_key(key)[0]].append(key)
    regrets = {"static priority": [], f"nearest entry ({args.within})": []}
    for keys in by_scheme.values():
        layout = collections.Counter(layout_of(entries[k]["kernel"]) for k in keys).most_common(1)[0][0]
        for key in sorted(keys):
            times = {k: t for k, t in entries[key]["times_us"].items() if k != "reference" and layout_of(k) == layout}
            if len(times) < 2:
                continue
            best = min(times.values())
            scheme, _, _, m, _ = split_key(key)
            pr = _problem_view(scheme, m)
            static = max(times, key=lambda k: (get_kernel(k).static_rank(pr), k))
            near = nearest(key, keys, args.within)
            ranking = entries[near]["times_us"] if near else {}
            known = [k for k in times if k in ranking]
            pick = min(known, key=ranking.get) if known else static
            for how, k in zip(regrets, (static, pick)):
                regrets[how].append(times[k] / best)
            if args.verbose:
                print(f"{key.rsplit('|', 4)[0][:32]:32s} {'|'.join(key.rsplit('|', 4)[1:4]):24s} "
                      f"static {static:26s} {times[static] / best:5.2f}  nearest {pick:26s} {times[pick] / best:5.2f}")
    for how, rs in regrets.items():
        print(f"{how:22s}: {len(rs)} entries, mean regret {statistics.mean(rs):.3f}, worst {max(rs):.2f}, "
              f"the fastest kernel in {sum(r == 1.0 for r in rs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
