"""Config sweep of the one-dot-per-K-tile MX GEMM (omniq.kernels.triton_mx._mx_gemm_kernel, what
kind="gemm" runs) on a CUDA GPU, for MXFP4 / NVFP4 weight-only and MXFP8 W8A16 / W8A8, with
bf16 cuBLAS (F.linear), dequantize-then-cuBLAS and, at M = 64, the split-K kernels side by side.

    python3 benchmarks/probe_mx_gemm.py --json $OUT/probe_mx_gemm.json
        [--methods mxfp4,nvfp4,mxfp8,mxfp8_a16] [--ms 64,512,2048] [--shapes 8192x8192,...]
        [--workers 12] [--budget 85]

Every configuration is compiled first in a process pool (Triton's disk cache; the split-K
factor is fixed in the configuration so the pool compiles the same specialization), then timed
here with CUDA-graph replay over rotating weight copies (benchmarks/probe_int.bench). One line
per (method, shape, M, candidate): microseconds, speedup over bf16 F.linear timed in the same
run, and the max error relative to max |scheme.matmul| (the reference, fp32). A candidate that
fails to compile or launch is printed, not fatal; a wrong one (error > 2e-2) is not timed.
The best gemm candidate of each point is printed at the end (the defaults to pick).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_int import bench, copies_for  # noqa: E402

SHAPES = [(8192, 8192), (12288, 3072), (3072, 12288)]
METHODS = ["mxfp4", "nvfp4", "mxfp8", "mxfp8_a16"]
TOL = 2e-2


def candidates(m: int) -> list[tuple[str, dict]]:
    """(label, gemm config) to sweep at M; at most 12 per point. ORDER: the decoded tile's K order."""
    if m <= 64:
        bm = max(16, min(64, m))
        grid = [(128, 256, 4, 3, 2.0, 1), (128, 128, 4, 4, 2.0, 1), (64, 256, 4, 3, 2.0, 1), (128, 256, 4, 3, 1.0, 1),
                (64, 128, 4, 4, 4.0, 1), (128, 128, 8, 4, 2.0, 1), (128, 256, 4, 3, 2.0, 0), (128, 256, 4, 3, 2.0, 2),
                (128, 512, 4, 2, 2.0, 1)]
        return [(f"bn{bn}-bm{bm}-bk{bk}-w{w}-s{st}-wv{wv:g}-o{o}",
                 dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=st, waves=wv, ORDER=o, GROUP_N=1))
                for bn, bk, w, st, wv, o in grid]
    grid = [(128, 128, 128, 8, 3, 1), (128, 128, 128, 8, 4, 1), (128, 128, 64, 8, 4, 1), (128, 256, 64, 8, 3, 1),
            (128, 256, 128, 8, 2, 1), (128, 64, 128, 4, 4, 1), (256, 128, 64, 8, 3, 1), (64, 128, 128, 4, 4, 1),
            (128, 128, 256, 8, 2, 1), (128, 128, 128, 8, 3, 0), (128, 128, 128, 8, 3, 2), (128, 128, 128, 4, 3, 1)]
    return [(f"bn{bn}-bm{bm}-bk{bk}-w{w}-s{st}-o{o}",
             dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=st, ORDER=o, GROUP_N=8, SPLIT_K=1))
            for bn, bm, bk, w, st, o in grid]


def fixed_split(cfg: dict, n: int, k: int, m: int, fp4_h: int) -> dict:
    """cfg with its split-K factor resolved for (n, k, m), as _launch_gemm would choose it."""
    from omniq.kernels._common import launch_grid, next_pow2
    if "waves" not in cfg:
        return cfg
    bk = max(2 * fp4_h, min(next_pow2(cfg["BLOCK_K"]), next_pow2(k)))
    _, _, _, split = launch_grid(cfg, n, m, -(-k // bk), torch.device("cuda"), splitk=True, cap=32)
    out = {kk: v for kk, v in cfg.items() if kk != "waves"}
    out["SPLIT_K"] = split
    return out


def make_qw(method: str, n: int, k: int, seed: int):
    from probe_fp import make_qw as mk
    return mk(method, n, k, seed)


def runner(method: str, p, kind: str, cfg: dict | None):
    from omniq.kernels import triton_mx as tm
    if method in ("mxfp4", "nvfp4"):
        if kind == "dequant_mm":
            return lambda x: tm.run_fp4_dequant_mm(x, p, None)
        return lambda x: tm.run_fp4(x, p, None, kind, cfg)
    if kind == "dequant_mm":
        return lambda x: tm.run_mxfp8_dequant_mm(x, p, None)
    return lambda x: tm.run_mxfp8(x, p, None, kind, cfg)


def prepare(method: str, qw):
    from omniq.kernels import triton_mx as tm
    return tm.prepare_fp4(qw, "cuda") if method in ("mxfp4", "nvfp4") else tm.prepare_mxfp8(qw, "cuda")


def h_of(method: str, k: int) -> int:
    return 16 if method == "nvfp4" or (method == "mxfp4" and k % 64) else 32


def task_list(args):
    """(method, n, k, m, kind, label, cfg) in timing order: per point the references first."""
    tasks = []
    for method in args.methods:
        for n, k in args.shapes:
            for m in args.ms:
                tasks.append((method, n, k, m, "dequant_mm", "dequant_mm", None))
                if m <= 64:
                    tasks.append((method, n, k, m, "splitk", "splitk-default", None))
                tasks.append((method, n, k, m, "gemm", "gemm-default", None))
                for label, cfg in candidates(m):
                    tasks.append((method, n, k, m, "gemm", label, fixed_split(cfg, n, k, m, h_of(method, k))))
    return tasks


def compile_worker(tasks):
    """Run each distinct kernel specialization once on a small problem of the same
    divisibility (Triton's disk cache then serves the timing process); report failures."""
    torch.cuda.set_device(0)
    out, seen = [], set()
    for (method, n, k, m, kind, label, cfg) in tasks:
        key = (method, kind, label, json.dumps(cfg, sort_keys=True), k % 64 == 0, m <= 64)
        if key in seen:
            continue
        seen.add(key)
        try:
            kk = 4096 + (k % 64)
            qw = make_qw(method, 256, kk, 0)
            runner(method, prepare(method, qw), kind, cfg)(torch.randn(m, kk, device="cuda", dtype=torch.bfloat16))
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report, keep compiling the rest
            out.append(f"{method} M={m} {label}: {type(e).__name__}: {str(e)[:200]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default="64,512,2048")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--budget", type=float, default=85.0, help="seconds; later points are skipped past it")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.ms = [int(v) for v in args.ms.split(",")]
    t0 = time.time()
    tasks = task_list(args)
    if args.workers > 1:
        import multiprocessing as mp
        chunks = [tasks[i::args.workers] for i in range(args.workers)]
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for errs in pool.map(compile_worker, chunks):
                for e in errs:
                    print("COMPILE/RUN FAILED:", e, flush=True)
    print(f"# compiled {len(tasks)} tasks in {time.time() - t0:.0f} s", flush=True)

    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": __import__("triton").__version__}
    rows, state = [], {}

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=0)

    for (method, n, k, m, kind, label, cfg) in tasks:
        if time.time() - t0 > args.budget:
            print(f"# budget reached: skipped the rest from {method} {n}x{k} M={m}", flush=True)
            break
        try:
            if state.get("wkey") != (method, n, k):
                state.clear()
                torch.cuda.empty_cache()
                qws = [make_qw(method, n, k, s) for s in range(2)]
                p0 = prepare(method, qws[0])
                nbytes = sum(t.numel() * t.element_size() for t in vars(p0).values() if isinstance(t, torch.Tensor))
                state.update(wkey=(method, n, k), qw=qws[0],
                             preps=[p0] + [prepare(method, qws[i % 2]) for i in range(1, min(8, copies_for(nbytes)))])
            if state.get("mkey") != m:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = state["qw"].scheme.matmul(x, state["qw"]).float()
                wb = state["qw"].scheme.dequantize(state["qw"]).to(torch.bfloat16)
                wbs = [wb] + [wb.clone() for _ in range(min(8, copies_for(wb.numel() * 2)) - 1)]
                bf16 = bench([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in wbs])
                del wbs, wb
                state.update(mkey=m, x=x, ref=ref, scale=ref.abs().max().clamp(min=1e-30), bf16=bf16)
                rows.append(dict(method=method, n=n, k=k, m=m, cand="bf16 F.linear", us=bf16, speedup=1.0))
                print(f"{method:9} {n:>5}x{k:<5} M={m:<5} {'bf16 F.linear':42} {bf16:9.1f} us", flush=True)
            x = state["x"]
            y = runner(method, state["preps"][0], kind, cfg)(x)
            err = float((y.float() - state["ref"]).abs().max() / state["scale"])
            if not err <= TOL:
                rows.append(dict(method=method, n=n, k=k, m=m, cand=label, kind=kind, cfg=cfg, err=err, wrong=True))
                print(f"{method:9} {n:>5}x{k:<5} M={m:<5} {label:42} WRONG max rel err {err:.3g}", flush=True)
                continue
            us = bench([lambda p_=p_: runner(method, p_, kind, cfg)(x) for p_ in state["preps"]])
            rows.append(dict(method=method, n=n, k=k, m=m, cand=label, kind=kind, cfg=cfg, us=us,
                             speedup=state["bf16"] / us, err=err))
            print(f"{method:9} {n:>5}x{k:<5} M={m:<5} {label:42} {us:9.1f} us {state['bf16'] / us:6.2f}x "
                  f"err {err:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing candidate must not end the sweep
            rows.append(dict(method=method, n=n, k=k, m=m, cand=label, kind=kind, cfg=cfg,
                             error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(f"{method:9} {n:>5}x{k:<5} M={m:<5} {label:42} FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
        dump()
    dump()
    print("# best gemm candidate per point (speedup over bf16; dequant_mm alongside)")
    points = sorted({(r["method"], r["n"], r["k"], r["m"]) for r in rows})
    for pt in points:
        mine = [r for r in rows if (r["method"], r["n"], r["k"], r["m"]) == pt and "us" in r]
        gemm = [r for r in mine if r.get("kind") == "gemm"]
        dq = [r for r in mine if r.get("kind") == "dequant_mm"]
        if gemm:
            b = min(gemm, key=lambda r: r["us"])
            print(f"{pt[0]:9} {pt[1]:>5}x{pt[2]:<5} M={pt[3]:<5} best {b['cand']:42} {b['us']:8.1f} us "
                  f"{b['speedup']:5.2f}x" + (f"  dequant_mm {dq[0]['us']:8.1f} us {dq[0]['speedup']:5.2f}x" if dq else ""))
    print(f"# total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
