"""How exact are the fp8 W8A8 kernels on a CUDA GPU? Each against an fp64 product of the same
quantized operands, with fp32 activations (so the output is fp32 and not rounded to bf16).

    python benchmarks/probe_fp8_accuracy.py --json out.json      # < 2 minutes on an H200

Per (shape, M, Triton kernel and accumulation) it prints
  quant   mismatches of the Triton activation quantizer against scheme.quantize_activation
  rel     max |y - exact| / max |exact|                     (the benchmark's 'err', fp32 output)
  r/mag   max |y - exact| / sum_k |q_x| |W|                 (error per unit of the dot's magnitude)
  ref32   the same 'rel' for scheme.matmul on the GPU (the benchmark's reference)
'whole K' rows let the MMA accumulate all of K; '+promote' rows add each K tile's fp8 products into
the fp32 accumulator once (PROMOTE); their times (CUDA-graph replay over rotating copies, M >= 16)
sit side by side. A 'bf16 default' line per case gives the benchmark's own 'err' (bf16 in and out,
the kernel omniq.linear picks, against scheme.matmul on the GPU).
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
# x of the case tests/test_gpu_int.py::test_w8a8_kernels_compiled[triton.w8a8.gemm] failed on
# (fp16, 26 x 3; the weight is _int_util.quantized(fp8, 33, 3, seed 0, x_sample=x)), as printed
TEST_CASE_X = [
    -1.1260e+00, -1.1523e+00, -2.5049e-01, -4.3384e-01, 8.4863e-01, 6.9189e-01, -3.1592e-01,
    -2.1152e+00, 3.2227e-01, -1.2637e+00, 3.5010e-01, 3.0811e-01, 1.1981e-01, 1.2373e+00,
    1.1172e+00, -2.4731e-01, -1.3525e+00, -1.6963e+00, 5.6689e-01, 7.9346e-01, 5.9863e-01,
    -1.5547e+00, -3.4131e-01, 1.8525e+00, 7.5000e-01, -5.8545e-01, -1.7334e-01, 1.8347e-01,
    1.3896e+00, 1.5859e+00, 9.4629e-01, -8.4375e-01, -6.1377e-01, 3.1586e-02, -4.9268e-01,
    2.4841e-01, 4.3970e-01, 1.1243e-01, 6.4062e-01, 4.4116e-01, -1.0229e-01, 7.9248e-01,
    -2.8955e-01, 5.2521e-02, 5.2295e-01, 2.3027e+00, -1.4688e+00, -1.5869e+00, -6.7285e-01,
    8.7305e-01, 1.0557e+00, 1.7786e-01, -2.3035e-01, -3.9185e-01, 5.4346e-01, -3.9526e-01,
    -4.4629e-01, 7.4414e-01, 1.5205e+00, 3.4102e+00, -1.5312e+00, -1.2344e+00, -1.0928e+00,
    -8.5205e-02, -9.3323e-02, 6.8701e-01, -8.3838e-01, 8.9169e-04, 8.4180e-01, -4.0015e-01,
    6.2109e-01, 6.3818e-01, -2.4597e-01, 2.3027e+00, -1.8818e+00, -4.9713e-02, -1.0449e+00,
    -9.5654e-01]

def small_k_case(sch, W):
    """The failing GPU test case: the codes against the scheme's, and the kernel against an fp64
    product of the same codes."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from _int_util import quantized
    x = torch.tensor(TEST_CASE_X).reshape(26, 3).to(torch.float16)
    qw = quantized(sch, 33, 3, 0, x_sample=x)
    p = W.prepare_w8a8(qw, DEV)
    xd = x.to(DEV)
    q, xs, _ = W.quantize_prepared_activation(xd, p)
    codes = q.double() * xs.double()[:, None]
    mismatch = int((codes.float().cpu() != sch.quantize_activation(x.float(), qw)).sum())
    wexact = p.weight.double() * p.w_scale.double()[:, None]
    exact, mag = codes @ wexact.t(), codes.abs() @ wexact.abs().t()
    for promote in (0, 32):
        cfg = dict(W.config_for("gemm", 26, 33, 3, True), PROMOTE=promote)
        y = W.run_dot(xd.float(), p, None, "gemm", cfg).double()
        r = ((y - exact).abs() / (mag + 1e-30)).max()
        print(f"test case N=33 K=3 M=26 fp32 out, PROMOTE={promote}: quantizer mismatches {mismatch}, "
              f"max |y - exact| / sum|q||W| = {float(r):.2e} (2^{float(torch.log2(r + 1e-300)):.1f})", flush=True)


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
    small_k_case(sch, W)
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        qw = sch.quantize((torch.randn(n, k, generator=g) * 0.02).to(DEV), name="probe.fp8")
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
            for kind in ("splitk", "gemm"):
                if m <= (64 if kind == "splitk" else 4096):
                    cfg = W.config_for(kind, m, n, k, True)
                    variants.append((f"triton.w8a8.{kind} whole K", kind, dict(cfg, PROMOTE=False)))
                    variants.append((f"triton.w8a8.{kind} +promote", kind, dict(cfg, PROMOTE=True)))
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
            for label, kind, cfg in variants:
                row = dict(base, kernel=label)
                try:
                    y = W.run_dot(x, p, None, kind, cfg).double()
                    fn = [lambda r=r, kind=kind, cfg=cfg: W.run_dot(x, r, None, kind, cfg) for r in reps]
                    err = (y - exact).abs()
                    row.update(rel=float(err.max() / exact.abs().max()), r_mag=float((err / (mag + 1e-30)).max()))
                    if not a.no_time and m >= 16:
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
