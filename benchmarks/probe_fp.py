"""Timing probe for the fp4 / mxfp8 / GGUF Triton kernels against bf16 cuBLAS (CUDA only).

    python3 benchmarks/probe_fp.py [--sweep] [--methods mxfp4,q4_k] [--ms 1,16,64,2048]
                                   [--shapes 8192x8192,12288x3072] [--json out.json]

Each point is the median over replays of a CUDA graph that calls the kernel on 4 weight
copies in turn (the 4-bit weights of an 8192^2 layer fit in the H200's 50 MB L2; rotating keeps
the timing honest) and divides by the calls; bf16 is torch.nn.functional.linear on 2 copies.
Weights are random valid bytes (quantizers are slow at this size and values do not matter).
Kernels are compiled first in a process pool (Triton's disk cache), then timed in this process.
--sweep also times configuration variants of the split-K and GEMM kernels at chosen points.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SHAPES = [(8192, 8192), (12288, 3072), (3072, 12288)]
MS = [1, 16, 32, 64, 512, 2048]
METHODS = ["mxfp4", "nvfp4", "mxfp8", "q4_k", "q8_0", "q6_k"]
COPIES = 4


def make_qw(method: str, n: int, k: int, seed: int):
    import omniq
    from omniq.schemes.base import QuantizedWeight
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    if method == "mxfp4":
        s = omniq.get_scheme("mxfp4", activation=None)
        t = {"weight": torch.randint(0, 256, (n, k // 2), generator=g, device=dev, dtype=torch.uint8),
             "weight_scale": torch.randint(118, 126, (n, k // 32), generator=g, device=dev, dtype=torch.uint8)}
    elif method == "nvfp4":
        s = omniq.get_scheme("nvfp4", activation=None)
        t = {"weight": torch.randint(0, 256, (n, k // 2), generator=g, device=dev, dtype=torch.uint8),
             "weight_scale": (torch.rand(n, k // 16, generator=g, device=dev) * 400 + 1).to(torch.float8_e4m3fn),
             "weight_scale_2": torch.tensor([1e-4], device=dev)}
    elif method in ("mxfp8", "mxfp8_a16"):
        s = omniq.get_scheme("mxfp8", activation="mxfp8" if method == "mxfp8" else None)
        t = {"weight": (torch.randn(n, k, generator=g, device=dev) * 50).clamp(-440, 440).to(torch.float8_e4m3fn),
             "weight_scale": torch.randint(118, 126, (n, -(-k // 32)), generator=g, device=dev, dtype=torch.uint8)}
    elif method == "dual":
        s = omniq.get_scheme("mxfp4_dualscale", activation=None)
        t = {"weight": torch.randint(0, 256, (n, k // 2), generator=g, device=dev, dtype=torch.uint8),
             "weight_scale": torch.randint(118, 126, (n, k // 32), generator=g, device=dev, dtype=torch.uint8),
             "weight_dual_scale": torch.rand(n, k // 512, 1, generator=g, device=dev) + 0.5,
             "mul_scale": torch.rand(k, generator=g, device=dev) + 0.5}
    else:
        from omniq.formats.gguf_blocks import BLOCK_FACTS
        f = BLOCK_FACTS[method]
        nb = k // f["block_elems"]
        raw = torch.randint(0, 256, (n, nb, f["block_bytes"]), generator=g, device=dev, dtype=torch.uint8)
        for name, (off, size) in f["fields"].items():
            if name in ("d", "dmin", "m"):
                raw[:, :, off + 1] &= 0x1B          # small finite f16 scales
        s = omniq.get_scheme("gguf", type=method)
        t = {"weight": raw.reshape(n, nb * f["block_bytes"])}
    return QuantizedWeight(s, (n, k), t)


def runner(method: str, qw, kind: str, cfg: dict | None, asm):
    """A callable x -> y for the kernel of `method`, over the prepared weight."""
    from omniq.kernels import triton_gguf as tg
    from omniq.kernels import triton_mx as tm
    if method in ("mxfp4", "nvfp4", "dual"):
        p = tm.prepare_fp4(qw, "cuda")
        if kind == "dequant_mm":
            return lambda x: tm.run_fp4_dequant_mm(x, p, None)
        return lambda x: tm.run_fp4(x, p, None, kind, cfg, asm)
    if method.startswith("mxfp8"):
        p = tm.prepare_mxfp8(qw, "cuda")
        if kind == "dequant_mm":
            return lambda x: tm.run_mxfp8_dequant_mm(x, p, None)
        return lambda x: tm.run_mxfp8(x, p, None, kind, cfg)
    if kind == "dequant_mm":
        return lambda x: tg.run_gguf_dequant_mm(x, qw, None)
    return lambda x: tg.run_gguf(x, qw, None, kind, cfg, asm)


def kind_for(m: int) -> str:
    """The kernel the dispatcher picks by static priority: split-K to 64, then the GEMM, then
    dequantize + cuBLAS from 128 (triton_mx.DEQUANT_MIN_M)."""
    return "splitk" if m <= 64 else ("gemm" if m < 128 else "dequant_mm")


def merged_cfg(method, kind, m, n, k, over):
    if over is None or kind == "dequant_mm":
        return None
    from omniq.kernels import triton_gguf as tg
    from omniq.kernels import triton_mx as tm
    if method in ("mxfp4", "nvfp4", "dual"):
        cfg = tm.config_for(kind, 0, m, n, k)
    elif method.startswith("mxfp8"):
        # only split-K keeps a W8A8 kernel of its own; the W8A8 gemm runs the W8A16 GEMM on exact bf16 x
        cfg = tm.config_for(("w8a8_" + kind) if method == "mxfp8" and kind == "splitk" else kind, 2, m, n, k)
    else:
        cfg = tg.config_for(kind, method, m, n, k)
    cfg.update(over)
    return cfg


def graph_time(fn, xs, reps=15) -> float:
    """Median microseconds per call of fn over graph replays (one graph calls fn on each x/weight)."""
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f, x in zip(fn, xs):
            f(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f, x in zip(fn, xs):
            f(x)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(xs))
    return statistics.median(times)


def task_list(args):
    tasks = []   # (method, n, k, m, kind, cfg_over, asm, label)
    for method in args.methods:
        for (n, k) in args.shapes:
            for m in args.ms:
                tasks.append((method, n, k, m, kind_for(m), None, None, "default"))
    if args.q8_wide:
        tasks += q8_wide_tasks()
    if args.sweep:
        tasks += sweep_tasks()
        for method in args.methods:          # the tiled GEMM at large M, for comparison
            for m in (512, 2048):
                tasks.append((method, 8192, 8192, m, "gemm", None, None, "gemm"))
    return tasks


def q8_wide_tasks():
    """q8_0 split-K with an iteration's blocks as one tile (WIDE) against one block at a time."""
    t = []
    cfgs = [("blockwise", {"WIDE": False}), ("wide", {"WIDE": True}),
            ("wide-bn64", {"WIDE": True, "BLOCK_N": 64}),
            ("wide-bn64-k128", {"WIDE": True, "BLOCK_N": 64, "K_PER_ITER": 128}),
            ("wide-k128", {"WIDE": True, "K_PER_ITER": 128}),
            ("wide-w8", {"WIDE": True, "num_warps": 8}),
            ("wide-bn64-w8-k512", {"WIDE": True, "BLOCK_N": 64, "num_warps": 8, "K_PER_ITER": 512})]
    for (n, k) in SHAPES:
        for m in (1, 16, 64):
            for label, o in cfgs:
                t.append(("q8_0", n, k, m, "splitk", o, None, label))
    return t


def sweep_tasks():
    t = []
    sk = [{}, {"BLOCK_N": 128, "UNITS": 2}, {"BLOCK_N": 32, "UNITS": 8, "num_warps": 2},
          {"UNITS": 8, "num_stages": 3}, {"waves": 4.0}, {"waves": 1.0}, {"num_warps": 2},
          {"BLOCK_N": 128, "UNITS": 4, "num_warps": 8, "num_stages": 3}, {"UNITS": 2, "num_stages": 6}]
    for (n, k) in [(8192, 8192), (3072, 12288)]:
        for m in (1, 16):
            for i, o in enumerate(sk):
                t.append(("mxfp4", n, k, m, "splitk", o, None, f"sk{i}"))
            t.append(("mxfp4", n, k, m, "splitk", {}, False, "sk-noasm"))
    gm = [{}, {"num_warps": 4}, {"BLOCK_M": 256}, {"BLOCK_N": 256}, {"UNITS": 1, "num_stages": 4},
          {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}, {"UNITS": 4, "num_stages": 2}]
    for m in (512, 2048):
        for i, o in enumerate(gm):
            t.append(("mxfp4", 8192, 8192, m, "gemm", o, None, f"gm{i}"))
        t.append(("mxfp4", 8192, 8192, m, "gemm", {}, False, "gm-noasm"))
    gk = [{}, {"K_PER_ITER": 512}, {"BLOCK_N": 32, "num_warps": 2}, {"BLOCK_N": 128},
          {"num_stages": 4}, {"waves": 4.0}, {"K_PER_ITER": 512, "num_warps": 2, "BLOCK_N": 32}]
    for meth in ("q4_k", "q8_0", "q6_k"):
        for i, o in enumerate(gk):
            t.append((meth, 8192, 8192, 1, "splitk", o, None, f"gk{i}"))
        if meth != "q6_k":
            t.append((meth, 8192, 8192, 1, "splitk", {}, False, "gk-noasm"))
    for meth in ("q4_k", "q8_0"):
        for i, o in enumerate([{}, {"num_stages": 3}, {"num_warps": 4}, {"BLOCK_M": 64, "num_warps": 4}]):
            t.append((meth, 8192, 8192, 2048, "gemm", o, None, f"gg{i}"))
    w8 = [{}, {"BLOCK_N": 128, "GPI": 2}, {"BLOCK_N": 32, "GPI": 8, "num_warps": 2}, {"GPI": 8, "num_stages": 3}]
    for i, o in enumerate(w8):
        t.append(("mxfp8", 8192, 8192, 1, "splitk", o, None, f"w8s{i}"))
    for i, o in enumerate([{}, {"GPI": 4}, {"num_warps": 4}, {"BLOCK_M": 256}, {"num_stages": 4}]):
        t.append(("mxfp8", 8192, 8192, 2048, "gemm", o, None, f"w8g{i}"))
    return t


def compile_worker(tasks):
    """Run each task once (compiling it into Triton's disk cache); report failures."""
    torch.cuda.set_device(0)
    out = []
    for (method, n, k, m, kind, over, asm, label) in tasks:
        try:
            qw = make_qw(method, n, k, 0)
            f = runner(method, qw, kind, merged_cfg(method, kind, m, n, k, over), asm)
            f(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            torch.cuda.synchronize()
            out.append(None)
        except Exception as e:  # noqa: BLE001 - report, keep compiling the rest
            out.append(f"{method} {n}x{k} M={m} {kind} {label}: {type(e).__name__}: {str(e)[:300]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--q8-wide", action="store_true", help="time q8_0 split-K with WIDE tiles against block by block")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.ms = [int(v) for v in args.ms.split(",")]
    tasks = task_list(args)

    t0 = time.time()
    if args.workers > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        chunks = [tasks[i::args.workers] for i in range(args.workers)]
        with ctx.Pool(args.workers) as pool:
            for errs in pool.map(compile_worker, chunks):
                for e in errs:
                    if e:
                        print("COMPILE/RUN FAILED:", e, flush=True)
    print(f"# compiled {len(tasks)} tasks in {time.time() - t0:.0f} s", flush=True)

    results = []
    bf16 = {}
    weights = {}
    for (method, n, k, m, kind, over, asm, label) in tasks:
        try:
            key = (method, n, k)
            if key not in weights:
                weights.clear()
                weights[key] = [make_qw(method, n, k, s) for s in range(COPIES)]
            fns = [runner(method, qw, kind, merged_cfg(method, kind, m, n, k, over), asm) for qw in weights[key]]
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in fns]
            us = graph_time(fns, xs)
            if (n, k, m) not in bf16:
                ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                lin = [lambda x, w=w: torch.nn.functional.linear(x, w) for w in ws]
                bf16[(n, k, m)] = graph_time(lin, xs[:2])
                del ws, lin
            base = bf16[(n, k, m)]
            r = {"method": method, "n": n, "k": k, "m": m, "kind": kind, "label": label, "cfg": over,
                 "asm": asm, "us": us, "bf16_us": base, "speedup": base / us}
            results.append(r)
            print(f"{method:6s} {n:5d}x{k:<5d} M={m:<5d} {kind:6s} {label:9s} {us:9.1f} us  bf16 {base:8.1f} us"
                  f"  {base / us:5.2f}x  {over or ''}{'' if asm is None else ' asm=' + str(asm)}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"FAILED {method} {n}x{k} M={m} {kind} {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "results": results}, f, indent=1)
    print(f"# total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
