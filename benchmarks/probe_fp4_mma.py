"""Timing probe for cuda.fp4.mma_gemv on a CUDA GPU (CUDA-graph replay over rotating weight
copies, as benchmarks/probe_int.py): bf16 cuBLAS vs the new kernel (split targets x prefetch
depths) vs triton.fp4.splitk, MXFP4 and NVFP4 weight-only, M = 1, 4, 8, 16 (< 60 s).

    python benchmarks/probe_fp4_mma.py [--json out.json] [--schemes mxfp4,nvfp4]
"""
import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from probe_int import bench, copies_for  # noqa: E402

import omniq  # noqa: E402
from omniq.dispatch import get_kernel  # noqa: E402
from omniq.dispatch.rotation import clone_prepared  # noqa: E402
from omniq.kernels import cuda_fp4_mma as fp4  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--json")
ap.add_argument("--m", default="1,4,8,16")
ap.add_argument("--schemes", default="mxfp4,nvfp4")
ap.add_argument("--targets", default="528,792")
ap.add_argument("--pf", default="1,2")        # forced prefetch depths (default: by m tiles)
ap.add_argument("--old", help="another module with run(x, prepared, bias) on the same layout, timed too")
args = ap.parse_args()
dev = torch.device("cuda")
defaults = (fp4.TARGET_CTAS, fp4.PREFETCH)
rows = []
kern = get_kernel("cuda.fp4.mma_gemv")
splitk = get_kernel("triton.fp4.splitk")
for name in args.schemes.split(","):
    sch = omniq.get_scheme(name, activation=None)
    for n, k in [(8192, 8192), (12288, 3072), (3072, 12288)]:
        w = torch.randn(n, k, device=dev) * 0.02
        wb = w.to(torch.bfloat16)
        qw = sch.quantize(w)
        base = kern.layout.prepare(qw, dev)
        nb = sum(t.numel() * t.element_size() for t in (base.qweight, base.scales))
        c = min(8, copies_for(nb))
        preps = [base] + [clone_prepared(base) for _ in range(c - 1)]
        cb = min(8, copies_for(wb.numel() * 2))
        wbs = [wb] + [wb.clone() for _ in range(cb - 1)]
        wq = sch.dequantize(qw).to(dev, torch.bfloat16)
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, wq)
            t_b = bench([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in wbs])
            row = {"scheme": name, "n": n, "k": k, "m": m, "bf16_us": t_b}
            for tgt in [int(v) for v in args.targets.split(",")]:
                for pf in [int(v) for v in args.pf.split(",")]:
                    fp4.TARGET_CTAS, fp4.PREFETCH = tgt, pf
                    y = kern.run(x, base, None)
                    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    row[f"mma_{tgt}_{pf}_us"] = bench([lambda p_=p_: kern.run(x, p_, None) for p_ in preps])
                    row["mma_err"] = max(err, row.get("mma_err", 0.0))
            fp4.TARGET_CTAS, fp4.PREFETCH = defaults
            if args.old:
                old = importlib.import_module(args.old)
                row["old_us"] = bench([lambda p_=p_: old.run(x, p_, None) for p_ in preps])
            row["splitk_us"] = bench([lambda p_=p_: splitk.run(x, p_, None) for p_ in preps])
            rows.append(row)
            best = min(v for kk, v in row.items() if kk.startswith("mma_") and kk.endswith("_us"))
            cols = "  ".join(f"{kk[:-3]} {v:7.1f} ({t_b / v:4.2f}x)" for kk, v in row.items()
                             if kk.endswith("_us") and kk != "bf16_us")
            print(f"{name} {n}x{k} M={m:3d} bf16 {t_b:7.1f}  {cols}  err {row['mma_err']:.1e}  best {t_b / best:.2f}x",
                  flush=True)
        del preps, wbs, wq
        torch.cuda.empty_cache()
if args.json:
    json.dump(rows, open(args.json, "w"), indent=1)
