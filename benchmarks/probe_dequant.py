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
from probe_int import bench, copies_for  # noqa: E402

import omniq  # noqa: E402
from omniq.dispatch import get_kernel  # noqa: E402
from omniq.dispatch.select import prepared_nbytes  # noqa: E402
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
    if args.family == "mx":
        return mx(old, args.json)
    kern = get_kernel("triton.affine.dequant_mm")
    sch = omniq.get_scheme("gptq", bits=4, group_size=128, sym=False)
    rows = []
    for n, k in [(8192, 8192), (12288, 3072), (3072, 12288)]:
        qw = sch.quantize(torch.randn(n, k) * 0.02)
        base = kern.layout.prepare(qw, DEV)
        nb = prepared_nbytes(base)
        preps = [base] + [kern.layout.prepare(qw, DEV) for _ in range(min(8, copies_for(nb)) - 1)]
        moved = nb + n * k * 2
        x = torch.randn(512, k, device=DEV, dtype=torch.bfloat16)
        ref = A.dequantize_rows(base, 0, n, torch.bfloat16)
        row = {"n": n, "k": k}
        subjects = [(f"new {c['BLOCK_N']}/{c['BLOCKS']}/{c['num_warps']}", A, c) for c in CONFIGS]
        if old is not None:
            subjects.insert(0, ("old default", old, None))
        for label, mod, cfg in subjects:
            same = torch.equal(mod.dequantize_rows(base, 0, n, torch.bfloat16, cfg), ref)
            t = bench([lambda p_=p_: mod.dequantize_rows(p_, 0, n, torch.bfloat16, cfg) for p_ in preps])
            row[label] = t
            print(f"{n}x{k} dequant {label:16s} {t:8.1f} us {moved / t / 1e3:6.0f} GB/s  same={same}", flush=True)
        t_mm = bench([lambda p_=p_: kern.run(x, p_, None) for p_ in preps])
        wb = ref.clone()
        t_b = bench([lambda: torch.nn.functional.linear(x, wb)])
        row.update(dequant_mm_512=t_mm, bf16_512=t_b)
        print(f"{n}x{k} M=512 dequant_mm {t_mm:.1f} us, bf16 {t_b:.1f} us ({t_b / t_mm:.2f}x)", flush=True)
        rows.append(row)
        del preps
        torch.cuda.empty_cache()
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


def mx(old, json_path) -> None:
    from omniq.kernels import triton_mx as X
    rows = []
    for name, params, kname in [("mxfp4", dict(activation=None), "triton.fp4.dequant_mm"),
                                ("nvfp4", dict(activation=None), "triton.fp4.dequant_mm"),
                                ("mxfp8", {}, "triton.mxfp8.dequant_mm")]:
        kern = get_kernel(kname)
        for n, k in [(8192, 8192), (12288, 3072)]:
            qw = omniq.get_scheme(name, **params).quantize(torch.randn(n, k) * 0.02)
            base = kern.layout.prepare(qw, DEV)
            nb = prepared_nbytes(base)
            preps = [base] + [kern.layout.prepare(qw, DEV) for _ in range(min(8, copies_for(nb)) - 1)]
            moved = nb + n * k * 2
            fn = "dequantize_mxfp8" if name == "mxfp8" else "dequantize_fp4"
            ref = getattr(X, fn)(base, torch.bfloat16)
            row = {"scheme": name, "n": n, "k": k}
            for label, mod in ([("old", old)] if old is not None else []) + [("new", X)]:
                f = getattr(mod, fn)
                same = torch.equal(f(base, torch.bfloat16), ref)
                t = bench([lambda p_=p_: f(p_, torch.bfloat16) for p_ in preps])
                row[label] = t
                print(f"{name} {n}x{k} dequant {label:4s} {t:8.1f} us {moved / t / 1e3:6.0f} GB/s  same={same}",
                      flush=True)
            x = torch.randn(512, k, device=DEV, dtype=torch.bfloat16)
            t_mm = bench([lambda p_=p_: kern.run(x, p_, None) for p_ in preps])
            wb = ref.clone()
            t_b = bench([lambda: torch.nn.functional.linear(x, wb)])
            row.update(dequant_mm_512=t_mm, bf16_512=t_b)
            print(f"{name} {n}x{k} M=512 {kname} {t_mm:.1f} us, bf16 {t_b:.1f} us ({t_b / t_mm:.2f}x)", flush=True)
            rows.append(row)
            del preps
            torch.cuda.empty_cache()
    if json_path:
        json.dump(rows, open(json_path, "w"), indent=1)


if __name__ == "__main__":
    main()
