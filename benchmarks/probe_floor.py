"""Fixed cost and streaming rate of decode-size kernels on a CUDA GPU: time at M = 1 over a sweep
of K (N fixed), fitted as t = a + bytes / bw (least squares). `a` is what a call costs beyond
moving its weight (launch, ramp-up, split-K reduction, tail); `bw` is the rate at which the
kernel streams once running. Times as in probe_int.py (CUDA-graph replay, rotating copies).

    python benchmarks/probe_floor.py [--json out.json] [--n 8192] [--ks 1024,2048,4096,8192,16384] [--subjects ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_int import bench, copies_for  # noqa: E402

import omniq  # noqa: E402
from omniq.dispatch import get_kernel  # noqa: E402
from omniq.dispatch.rotation import prepared_nbytes, rotating_copies  # noqa: E402

DEV = torch.device("cuda")
# label: (scheme, params, kernel or None for bf16 F.linear)
SUBJECTS = {
    "bf16 F.linear": (None, {}, None),
    "int4 cuda.affine.mma_gemv": ("gptq", dict(bits=4, group_size=128, sym=False), "cuda.affine.mma_gemv"),
    "int4 tinygemm": ("gptq", dict(bits=4, group_size=128, sym=False), "cuda.int4.tinygemm"),
    "int4 triton.affine.splitk": ("gptq", dict(bits=4, group_size=128, sym=False), "triton.affine.splitk"),
    "mxfp4 cuda.fp4.mma_gemv": ("mxfp4", dict(activation=None), "cuda.fp4.mma_gemv"),
    "fp8 cuda.w8a8.gemv": ("fp8", {}, "cuda.w8a8.gemv"),
    "mxfp8 cuda.mxfp8.gemv": ("mxfp8", {}, "cuda.mxfp8.gemv"),
    "q4_k triton.gguf.splitk": ("gguf", dict(type="q4_k"), "triton.gguf.splitk"),
}


def fit(points):
    """Least-squares (a, bw) of t = a + b / bw over (bytes, us) points; bw in GB/s."""
    n = len(points)
    if len({b for b, _ in points}) < 2:
        raise ValueError("probe_floor.fit: needs points of at least two different sizes (--ks)")
    sx = sum(b for b, _ in points); sy = sum(t for _, t in points)
    sxx = sum(b * b for b, _ in points); sxy = sum(b * t for b, t in points)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    a = (sy - slope * sx) / n
    return a, 1e-3 / slope  # bytes per us -> GB/s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--ks", default="1024,2048,4096,8192,16384")
    ap.add_argument("--subjects", default=",".join(SUBJECTS), help="labels, comma-separated")
    args = ap.parse_args()
    ks = [int(v) for v in args.ks.split(",")]
    out, quantized = {}, {}
    for label in args.subjects.split(","):
        sch_name, params, kname = SUBJECTS[label]
        pts = []
        for k in ks:
            w = torch.randn(args.n, k) * 0.02
            x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
            if kname is None:
                wb = w.to(DEV, torch.bfloat16)
                nb = wb.numel() * 2
                ws = [wb] + [wb.clone() for _ in range(min(8, copies_for(nb)) - 1)]
                t = bench([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in ws])
            else:
                kern = get_kernel(kname)
                key = (sch_name, tuple(sorted(params.items())), k)
                if key not in quantized:
                    quantized[key] = omniq.get_scheme(sch_name, **params).quantize(w, name="floor")
                qw = quantized[key]
                preps = rotating_copies(kern.layout.prepare(qw, DEV), DEV)
                nb = prepared_nbytes(preps[0])
                t = bench([lambda p_=p_: kern.run(x, p_, None) for p_ in preps])
            pts.append((nb, t))
            print(f"{label:28s} N={args.n} K={k:6d} {nb / 1e6:8.2f} MB {t:8.2f} us {nb / t / 1e3:7.0f} GB/s",
                  flush=True)
        a, bw = fit(pts)
        out[label] = {"points": pts, "fixed_us": a, "stream_GBps": bw}
        print(f"{label:28s} fit: fixed {a:.2f} us + bytes / {bw:.0f} GB/s", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
