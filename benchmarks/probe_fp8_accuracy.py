"""How exact are the fp8 W8A8 kernels on a CUDA GPU? Each against an fp64 product of the same
quantized operands, with fp32 activations (so the output is fp32 and not rounded to bf16).

    python benchmarks/probe_fp8_accuracy.py --json out.json      # < 2 minutes on an H200

Per (shape, M, kernel) it prints
  quant   mismatches of the Triton activation quantizer against scheme.quantize_activation
  rel     max |y - exact| / max |exact|                     (the benchmark's 'err', fp32 output)
  r/mag   max |y - exact| / sum_k |q_x| |W|                 (error per unit of the dot's magnitude)
  ref32   the same 'rel' for scheme.matmul on the GPU (the benchmark's reference)
Triton GEMM rows with '+promote' add the fp8 partial products into the fp32 accumulator once per
K tile (PROMOTE = BLOCK_K) instead of letting the MMA accumulate all of K; their times (CUDA-graph
replay over rotating copies) sit beside the default's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_int import bench, copies_for  # noqa: E402

DEV = torch.device("cuda")
SHAPES = [(8192, 8192), (3072, 12288), (12288, 3072)]
MS = (1, 16, 64, 512)
KERNELS = (("cuda.w8a8.gemv", 16), ("triton.w8a8.splitk", 64), ("triton.w8a8.gemm", 4096),
           ("cuda.fp8.scaled_mm", 4096))


def main():
    import omniq
    from omniq.dispatch.rotation import clone_prepared
    from omniq.kernels import triton_w8a8 as W
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--no-time", action="store_true")
    a = ap.parse_args()
    rows = []
    sch = omniq.get_scheme("fp8")
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        qw = sch.quantize(torch.randn(n, k, generator=g) * 0.02, name="probe.fp8")
        p = W.prepare_w8a8(qw, DEV)
        wexact = p.weight.double() * p.w_scale.double()[:, None]
        reps = [p] + [clone_prepared(p) for _ in range(copies_for(n * k) - 1)]
        for m in MS:
            x = torch.randn(m, k, generator=g).to(DEV)
            q, xs, _ = W.quantize_prepared_activation(x, p)
            codes = q.double() * xs.double()[:, None]
            mismatch = int((codes.float() != sch.quantize_activation(x, qw)).sum())
            exact = codes @ wexact.t()
            mag = codes.abs() @ wexact.abs().t()
            ref32 = sch.matmul(x, qw).double()
            base = dict(n=n, k=k, m=m, quant_mismatch=mismatch,
                        ref32_rel=float((ref32 - exact).abs().max() / exact.abs().max()))
            variants = []
            for name, max_m in KERNELS:
                if m <= max_m:
                    variants.append((name, name, None))
            for kind in ("splitk", "gemm"):
                if m <= (64 if kind == "splitk" else 4096):
                    cfg = W.config_for(kind, m, n, k, True)
                    variants.append((f"triton.w8a8.{kind} cfg", None, (kind, dict(cfg))))
                    variants.append((f"triton.w8a8.{kind} +promote", None, (kind, dict(cfg, PROMOTE=cfg["BLOCK_K"]))))
            # the benchmark's own measure: bf16 in and out, against scheme.matmul on the GPU
            xb = x.to(torch.bfloat16)
            lin = omniq.prepare(qw, DEV, torch.bfloat16)
            yb, rb = omniq.linear(xb, lin).double(), sch.matmul(xb, qw).double()
            qb, xsb, _ = W.quantize_prepared_activation(xb, p)
            exb = (qb.double() * xsb.double()[:, None]) @ wexact.t()
            print(f"{n:>5}x{k:<5} M={m:<4} bf16 default: "
                  f"rel vs scheme.matmul {float((yb - rb).abs().max() / rb.abs().max()):.2e}, vs exact "
                  f"{float((yb - exb).abs().max() / exb.abs().max()):.2e}; scheme.matmul vs exact "
                  f"{float((rb - exb).abs().max() / exb.abs().max()):.2e}", flush=True)
            for label, kname, direct in variants:
                row = dict(base, kernel=label)
                try:
                    if direct is None:
                        with omniq.use_kernel(kname):
                            lin = omniq.prepare(qw, DEV, torch.float32)
                        y = omniq.linear(x, lin).double()
                        fn = None
                    else:
                        kind, cfg = direct
                        y = W.run_dot(x, p, None, kind, cfg).double()
                        fn = [lambda r=r: W.run_dot(x, r, None, kind, cfg) for r in reps]
                    err = (y - exact).abs()
                    row.update(rel=float(err.max() / exact.abs().max()), r_mag=float((err / (mag + 1e-30)).max()))
                    if fn is not None and not a.no_time and m >= 16:
                        row["us"] = bench(fn)
                except Exception as e:  # noqa: BLE001 - a probe reports and goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                us = f"{row['us']:8.2f} us" if "us" in row else " " * 11
                print(f"{n:>5}x{k:<5} M={m:<4} {label:<28} quant {mismatch:>3}  "
                      + (f"rel {row['rel']:.2e}  r/mag {row['r_mag']:.2e}  ref32 {base['ref32_rel']:.2e} {us}"
                         if "rel" in row else row.get("error", "")), flush=True)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
