"""Timing probe for cuda.mxfp8.gemv on a CUDA GPU (CUDA-graph replay over rotating weight copies,
as benchmarks/probe_int.py): bf16 cuBLAS vs triton.mxfp8.splitk vs the new kernel with the Triton
quantizer first ("p1"; the in-kernel quantizer "p2" measured slower and was removed), over steps in
flight (pf) and split targets (t); one NaN-test-off column ("nonan"), one with 3 CTAs per SM
("mb3": more registers, a 396-CTA split target). M = 1, 2, 4, 8, 16 on the
three benchmark shapes, W8A8 (and W8A16 with --schemes mxfp8,w8a16). Under 90 s.

    python3 benchmarks/probe_mxfp8_gemv.py --json $OUT/probe_mxfp8_gemv.json
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from probe_int import bench, copies_for  # noqa: E402

import omniq  # noqa: E402
from omniq.dispatch import get_kernel  # noqa: E402
from omniq.dispatch.rotation import rotating_copies  # noqa: E402
from omniq.kernels import cuda_mxfp8_gemv as mx8  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--json")
ap.add_argument("--m", default="1,2,4,8,16")
ap.add_argument("--schemes", default="mxfp8")          # mxfp8 (W8A8), w8a16 (activation=None)
ap.add_argument("--pf", default="1,2,3,4")
ap.add_argument("--targets", default="792,1056")       # besides the default TARGET_CTAS
ap.add_argument("--budget", type=float, default=85.0)  # seconds; later rows are dropped past it
args = ap.parse_args()
t0 = time.time()
dev = torch.device("cuda")
rows = []
kern = get_kernel("cuda.mxfp8.gemv")
splitk = get_kernel("triton.mxfp8.splitk")
DEFAULTS = dict(TARGET_CTAS=mx8.TARGET_CTAS, PREFETCH=None, NANCHK=True, MIN_BLOCKS=mx8.MIN_BLOCKS)


def configs(w8a8: bool):
    """(column name, knob settings)."""
    ph = "p1" if w8a8 else "w16"
    out = [(ph, {})]
    out += [(f"{ph}_pf{pf}", dict(PREFETCH=int(pf))) for pf in args.pf.split(",")]
    out += [(f"{ph}_t{t}", dict(TARGET_CTAS=int(t))) for t in args.targets.split(",")]
    out.append((f"{ph}_nonan", dict(NANCHK=False)))
    # registers up to 168 (3 CTAs per SM) and a split target sized for 3
    out.append((f"{ph}_mb3", dict(MIN_BLOCKS=3, TARGET_CTAS=3 * 132)))
    return out


def timed(fn_for, preps):
    return bench([lambda p_=p_: fn_for(p_) for p_ in preps])


for name in args.schemes.split(","):
    w8a8 = name == "mxfp8"
    sch = omniq.get_scheme("mxfp8", activation="mxfp8" if w8a8 else None)
    for n, k in [(8192, 8192), (12288, 3072), (3072, 12288)]:
        if time.time() - t0 > args.budget:
            print(f"budget spent: {name} {n}x{k} and later skipped", flush=True)
            break
        w = torch.randn(n, k, device=dev) * 0.02
        wb = w.to(torch.bfloat16)
        qw = sch.quantize(w)
        base = kern.layout.prepare(qw, dev)
        preps = rotating_copies(base, dev)
        wbs = [wb] + [wb.clone() for _ in range(min(8, copies_for(wb.numel() * 2)) - 1)]
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = sch.matmul(x, qw).float()
            scale = ref.abs().max().item() or 1.0
            t_b = bench([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in wbs])
            row = {"scheme": name, "n": n, "k": k, "m": m, "bf16_us": t_b}
            try:
                row["splitk_us"] = timed(lambda p_: splitk.run(x, p_, None), preps)
            except Exception as e:  # noqa: BLE001 - report and go on
                row["splitk_error"] = f"{type(e).__name__}: {e}"[:200]
            for col, knobs in configs(w8a8):
                for kk, v in {**DEFAULTS, **knobs}.items():
                    setattr(mx8, kk, v)
                try:
                    y = kern.run(x, base, None)
                    row[f"{col}_err"] = ((y.float() - ref).abs().max() / scale).item()
                    row[f"{col}_us"] = timed(lambda p_: kern.run(x, p_, None), preps)
                except Exception as e:  # noqa: BLE001 - a compile / launch failure of one config
                    row[f"{col}_error"] = f"{type(e).__name__}: {e}"[:300]
                    print(f"  {name} {n}x{k} M={m} {col}: {row[f'{col}_error']}", flush=True)
            for kk, v in DEFAULTS.items():
                setattr(mx8, kk, v)
            rows.append(row)
            timings = {kk[:-3]: v for kk, v in row.items() if kk.endswith("_us") and kk != "bf16_us"}
            mine = {kk: v for kk, v in timings.items() if kk != "splitk"}
            best = min(mine, key=mine.get) if mine else None
            cols = "  ".join(f"{kk} {v:6.1f} ({t_b / v:4.2f}x)" for kk, v in timings.items())
            errs = max((v for kk, v in row.items() if kk.endswith("_err")), default=float("nan"))
            print(f"{name} {n}x{k} M={m:2d} bf16 {t_b:6.1f}  {cols}  maxerr {errs:.1e}"
                  + (f"  best {best} {t_b / mine[best]:.2f}x" if best else ""), flush=True)
        del preps, wbs
        torch.cuda.empty_cache()
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
print(f"done in {time.time() - t0:.0f} s")
