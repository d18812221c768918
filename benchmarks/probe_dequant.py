"""The dequantize passes of the dequant_mm kernels on a CUDA GPU: time and achieved bandwidth
(packed weight + scales read, bf16 weight written), and the whole dequant_mm call at M = 512,
over rotating weight copies (as probe_int.py).

    python benchmarks/probe_dequant.py [--json out.json] [--old MODULE] [--family affine|mx]

affine: triton.affine.dequant_mm's `dequantize_rows` per config (int4 GPTQ g128); --old names
another module with dequantize_rows(p, n0, n1, dtype, cfg) on the same layout (an earlier
version of kernels/triton_affine.py), timed in the same run.
mx: triton.fp4 / triton.mxfp8 dequant_mm's `dequantize_fp4` / `dequantize_mxfp8` (mxfp4, nvfp4,
mxfp8); --old names an earlier version of kernels/triton_mx.py.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_int import bench  # noqa: E402

import omniq  # noqa: E402
from omniq.dispatch import get_kernel  # noqa: E402
from omniq.dispatch.rotation import prepared_nbytes, rotating_copies  # noqa: E402
from omniq.kernels import triton_affine as A  # noqa: E402

DEV = torch.device("cuda")
CONFIGS = [dict(BLOCK_N=64, BLOCKS=2, num_warps=4), dict(BLOCK_N=32, BLOCKS=4, num_warps=4),
           dict(BLOCK_N=64, BLOCKS=4, num_warps=8), dict(BLOCK_N=128, BLOCKS=2, num_warps=8),
           dict(BLOCK_N=16, BLOCKS=8, num_warps=4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--old")
    ap.add_argument("--family", default="affine", choices=("affine", "mx"))
    args = ap.parse_args()
    old = importlib.import_module(args.old) if args.old else None
    rows = []
    if args.family == "affine":
        kern = get_kernel("triton.affine.dequant_mm")
        sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=False)
        for n, k in [(8192, 8192), (12288, 3072), (3072, 12288)]:
            subjects = [(f"new {c['BLOCK_N']}/{c['BLOCKS']}/{c['num_warps']}",
                         lambda p, c=c, n=n: A.dequantize_rows(p, 0, n, torch.bfloat16, c)) for c in CONFIGS]
            if old is not None:
                subjects.insert(0, ("old default", lambda p, n=n: old.dequantize_rows(p, 0, n, torch.bfloat16)))
            rows.append(probe_shape(f"{n}x{k}", kern, sch.quantize(torch.randn(n, k) * 0.02),
                                    lambda p, n=n: A.dequantize_rows(p, 0, n, torch.bfloat16), subjects))
    else:
        from omniq.kernels import triton_mx as X
        for name, params, kname in [("mxfp4", dict(activation=None), "triton.fp4.dequant_mm"),
                                    ("nvfp4", dict(activation=None), "triton.fp4.dequant_mm"),
                                    ("mxfp8", {}, "triton.mxfp8.dequant_mm")]:
            fn = "dequantize_mxfp8" if name == "mxfp8" else "dequantize_fp4"
            subjects = ([("old", lambda p: getattr(old, fn)(p, torch.bfloat16))] if old is not None else []) + \
                [("new", lambda p: getattr(X, fn)(p, torch.bfloat16))]
            for n, k in [(8192, 8192), (12288, 3072)]:
                qw = omniq.get_scheme(name, **params).quantize(torch.randn(n, k) * 0.02)
                rows.append(dict(probe_shape(f"{name} {n}x{k}", get_kernel(kname), qw, subjects[-1][1], subjects),
                                 scheme=name))
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


def probe_shape(what, kern, qw, reference, subjects) -> dict:
    """Each subject (label, prepared -> bf16 W) timed over rotating copies, checked bit for bit
    against `reference`, then kern's whole call at M = 512 against bf16 F.linear."""
    n, k = qw.shape
    base = kern.layout.prepare(qw, DEV)
    nb = prepared_nbytes(base)
    preps = rotating_copies(base, DEV)
    moved = nb + n * k * 2
    ref = reference(base)
    row = {"n": n, "k": k}
    for label, f in subjects:
        same = torch.equal(f(base), ref)
        t = bench([lambda p_=p_: f(p_) for p_ in preps])
        row[label] = t
        print(f"{what} dequant {label:16s} {t:8.1f} us {moved / t / 1e3:6.0f} GB/s  same={same}", flush=True)
    x = torch.randn(512, k, device=DEV, dtype=torch.bfloat16)
    t_mm = bench([lambda p_=p_: kern.run(x, p_, None) for p_ in preps])
    t_b = bench([lambda: torch.nn.functional.linear(x, ref)])
    row.update(dequant_mm_512=t_mm, bf16_512=t_b)
    print(f"{what} M=512 {kern.name} {t_mm:.1f} us, bf16 {t_b:.1f} us ({t_b / t_mm:.2f}x)", flush=True)
    del preps
    torch.cuda.empty_cache()
    return row


if __name__ == "__main__":
    main()
