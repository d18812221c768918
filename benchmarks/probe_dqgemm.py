"""Config sweep for triton.affine.dqgemm (W decoded in registers, one wide dot per K tile) on a
CUDA GPU, side by side with bf16 cuBLAS, triton.affine.splitk / .gemm / .dequant_mm (their
current configs), 4-bit GPTQ g128, CUDA-graph replay over rotating weight copies.

    python benchmarks/probe_dqgemm.py --json out.json [--budget 150] [--m 16,64,512,2048]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import probe_int  # noqa: E402
from probe_int import SHAPES, Recorder, bench, copies_for, run_candidates  # noqa: E402

import omniq  # noqa: E402
from omniq.dispatch import get_kernel  # noqa: E402
from omniq.kernels import triton_affine as affine  # noqa: E402


def configs(m: int) -> list[dict]:
    base = dict(affine.DEFAULTS["dqgemm"])
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        return [dict(base, BLOCK_N=bn, BLOCK_M=bm, UNITS=1, num_warps=4, num_stages=3, SPLIT_K=None, waves=2.0,
                     GROUP_N=1, DECODE=dec, SWAP=swap) for bn in (64, 128) for dec in (0, 1) for swap in (True, False)]
    return [dict(base, BLOCK_N=bn, BLOCK_M=bm, num_warps=8, UNITS=1, num_stages=3, SPLIT_K=1, DECODE=dec, SWAP=swap)
            for bn, bm in ((128, 256), (256, 128), (128, 128)) for dec in (0, 1) for swap in (True, False)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="probe_dqgemm.json")
    ap.add_argument("--budget", type=float, default=150)
    ap.add_argument("--m", default="16,64,512,2048")
    ap.add_argument("--dry", action="store_true", help="CPU interpreter run of the logic, tiny shapes")
    args = ap.parse_args()
    shapes = SHAPES
    if args.dry:
        probe_int.DEV = "cpu"
        shapes = [(256, 512)]
    dev = torch.device(probe_int.DEV)
    rec = Recorder(args.json, args.budget)
    sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=False)
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        qw = sch.quantize(w)
        wb = sch.dequantize(qw).to(dev, torch.bfloat16)
        base = affine.prepare_affine(qw, dev)
        nb = base.qweight.numel() * 4 + base.scales.numel() * base.scales.element_size()
        preps = [base] + [affine.prepare_affine(qw, dev) for _ in range(min(8, copies_for(nb)) - 1)]
        wbs = [wb] + [wb.clone() for _ in range(min(8, copies_for(wb.numel() * 2)) - 1)]
        for m in [int(v) for v in args.m.split(",")]:
            if rec.left() < 10:
                break
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, wb)
            t_b = bench([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in wbs])
            rec.add(method="int4", n=n, k=k, m=m, cand="bf16 F.linear", us=t_b, speedup=1.0)
            cands = []
            for name in ("triton.affine.splitk", "triton.affine.gemm", "triton.affine.dequant_mm"):
                kern = get_kernel(name)
                if m > (kern.max_m or 1 << 30) or (name.endswith("dequant_mm") and m < affine.DEQUANT_MM_MIN_M):
                    continue
                cands.append((name, None, [lambda p_=p_, kern=kern: kern.run(x, p_, None) for p_ in preps]))
            for cfg in configs(m):
                cands.append(("dqgemm " + " ".join(f"{a}={cfg[a]}" for a in ("BLOCK_N", "BLOCK_M", "UNITS",
                                                                           "num_warps", "num_stages", "SPLIT_K",
                                                                           "DECODE", "SWAP")
                                                    ) + (f" waves={cfg['waves']}" if not cfg["SPLIT_K"] else ""),
                              cfg, [lambda p_=p_, cfg=cfg: affine.run_dqgemm(x, p_, None, cfg) for p_ in preps]))
            best = run_candidates(rec, "int4", n, k, m, t_b, cands, ref, 2e-2)
            if best:
                print(f"BEST {n}x{k} M={m}: {best[0]} {best[1]:.1f} us = {t_b / best[1]:.2f}x bf16 ({t_b:.1f} us)",
                      flush=True)


if __name__ == "__main__":
    main()
