"""Timing probe for cuda.affine.mma_gemv on a CUDA GPU (CUDA-graph replay over rotating weight
copies, as benchmarks/probe_int.py): bf16 cuBLAS vs the new kernel (several split targets) vs
triton.affine.splitk vs tinygemm, 4-bit g128, M = 1..16.

    python benchmarks/probe_mma.py [--json out.json]
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
from omniq.kernels import cuda_affine_mma as mma  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--json")
ap.add_argument("--m", default="1,2,4,8,16")
ap.add_argument("--targets", default="528,792")
ap.add_argument("--row-tiles", default="1,2")
ap.add_argument("--min-blocks", default="0,6")
ap.add_argument("--old", help="another module with run(x, prepared, bias) on the same layout, timed too")
args = ap.parse_args()
dev = torch.device("cuda")
defaults = (mma.TARGET_CTAS, mma.ROW_TILES, mma.MIN_BLOCKS, mma.TUNED)
rows = []
sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=False)
for n, k in [(8192, 8192), (12288, 3072), (3072, 12288)]:
    w = torch.randn(n, k, device=dev) * 0.02
    wb = w.to(torch.bfloat16)
    qw = sch.quantize(w.cpu())
    kern = get_kernel("cuda.affine.mma_gemv")
    base = kern.layout.prepare(qw, dev)
    nb = sum(t.numel() * t.element_size() for t in (base.qweight, base.scales, base.zeros) if t is not None)
    c = min(8, copies_for(nb))
    preps = [base] + [clone_prepared(base) for _ in range(c - 1)]
    cb = min(8, copies_for(wb.numel() * 2))
    wbs = [wb] + [wb.clone() for _ in range(cb - 1)]
    tg = get_kernel("cuda.int4.tinygemm")
    tgp = [tg.layout.prepare(qw, dev) for _ in range(c)]
    splitk = get_kernel("triton.affine.splitk")
    for m in [int(v) for v in args.m.split(",")]:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x, wb)
        t_b = bench([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in wbs])
        row = {"n": n, "k": k, "m": m, "bf16_us": t_b}
        for rt in [int(v) for v in args.row_tiles.split(",")]:
            for minb in [int(v) for v in args.min_blocks.split(",")]:
                for tgt in [int(v) for v in args.targets.split(",")]:
                    mma.TARGET_CTAS, mma.ROW_TILES, mma.MIN_BLOCKS, mma.TUNED = tgt, rt, minb, {}
                    y = kern.run(x, base, None)
                    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    t = bench([lambda p_=p_: kern.run(x, p_, None) for p_ in preps])
                    row[f"mma_rt{rt}_b{minb}_{tgt}_us"] = t
                    row["mma_err"] = max(err, row.get("mma_err", 0.0))
        mma.TARGET_CTAS, mma.ROW_TILES, mma.MIN_BLOCKS, mma.TUNED = defaults
        # what run() does: the defaults with TUNED applied
        row["default_us"] = bench([lambda p_=p_: kern.run(x, p_, None) for p_ in preps])
        if args.old:
            old = importlib.import_module(args.old)
            row["old_us"] = bench([lambda p_=p_: old.run(x, p_, None) for p_ in preps])
        row["splitk_us"] = bench([lambda p_=p_: splitk.run(x, p_, None) for p_ in preps])
        row["tinygemm_us"] = bench([lambda p_=p_: tg.run(x, p_, None) for p_ in tgp])
        rows.append(row)
        best = min(v for kk, v in row.items() if kk.startswith("mma_") and kk.endswith("_us"))
        print(f"{n}x{k} M={m:3d} bf16 {t_b:7.1f}  " + "  ".join(
            f"{kk[:-3]} {v:7.1f} ({t_b / v:4.2f}x)" for kk, v in row.items() if kk.endswith("_us") and kk != "bf16_us")
            + f"  err {row['mma_err']:.1e}  best {t_b / best:.2f}x", flush=True)
    del preps, wbs, tgp
    torch.cuda.empty_cache()
if args.json:
    json.dump(rows, open(args.json, "w"), indent=1)
