"""Config sweep for the integer / W8A8 kernels on a CUDA GPU (feeds the TUNED tables in
kernels/triton_affine.py and kernels/triton_w8a8.py).

For each shape (N x K) and M it times, with CUDA-graph replay (median of replays, weights
rotated over enough copies that they do not sit in L2): the bf16 cuBLAS matmul, every candidate
config of the Triton kernels, and torch's built-ins (tinygemm, _scaled_mm, _int_mm). Each
candidate's output is checked against a bf16 reference first; a wrong one is reported, not
timed. Results go to JSON after every measurement, so a run cut short keeps what it measured.

    python benchmarks/probe_int.py --out results.json --budget 420 [--what int4,fp8,int8]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from omniq.dispatch.rotation import clone_prepared

SHAPES = [(8192, 8192), (12288, 3072), (3072, 12288)]


DEV = "cuda"


def bench(fns, reps: int = 15, inner: int = 4) -> float:
    """Median microseconds per call: one graph replays inner x len(fns) calls (rotating copies)."""
    if DEV == "cpu":  # --dry: exercise the script's logic under the interpreter, no timing
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) * 1e6 / len(fns)
    for f in fns:
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / (inner * len(fns)))
    times.sort()
    return times[len(times) // 2]


def copies_for(nbytes: int) -> int:
    if DEV == "cpu":
        return 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, math.ceil(3 * l2 / max(nbytes, 1)))


class Recorder:
    def __init__(self, path, budget):
        self.path, self.t0, self.budget = path, time.time(), budget
        self.rows = []
        self.meta = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)",
                     "torch": torch.__version__}
        try:
            import triton
            self.meta["triton"] = triton.__version__
        except ImportError:
            pass

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def add(self, **row):
        self.rows.append(row)
        with open(self.path, "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows}, f, indent=0)
        t = row.get("us")
        print(f"{row['method']:5} {row['n']:>5}x{row['k']:<5} M={row['m']:<5} {row['cand']:<58} "
              f"{'%9.2f us' % t if t else row.get('err', '')}", flush=True)


def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def run_candidates(rec, method, n, k, m, bf16_us, cands, ref, tol):
    """cands: list of (name, cfg_dict_or_None, [callables over copies])."""
    best = None
    for name, cfg, fns in cands:
        if rec.left() < 5:
            return best
        try:
            y = fns[0]()
            e = rel_err(y, ref)
            if not e <= tol:
                rec.add(method=method, n=n, k=k, m=m, cand=name, cfg=cfg, err=f"WRONG rel err {e:.3g}")
                continue
            us = bench(fns)
        except Exception as ex:  # a config that does not compile or launch is reported, not fatal
            rec.add(method=method, n=n, k=k, m=m, cand=name, cfg=cfg, err=f"{type(ex).__name__}: {str(ex)[:160]}")
            continue
        rec.add(method=method, n=n, k=k, m=m, cand=name, cfg=cfg, us=us, speedup=bf16_us / us, err_rel=e)
        if best is None or us < best[1]:
            best = (name, us)
    return best


def int4_candidates(m):
    out = []
    if m <= 4:
        for bn, w, st, waves in [(64, 4, 3, 4), (32, 4, 3, 4), (128, 4, 3, 4), (64, 8, 3, 4)]:
            out.append(("gemv", dict(BLOCK_N=bn, num_warps=w, num_stages=st, waves=waves)))
    if m <= 64:
        bm = max(16, m)
        for bn, w, st, asm, waves in [(64, 4, 3, 0, 2), (64, 4, 3, 1, 2), (128, 4, 3, 1, 2), (128, 8, 3, 1, 2),
                                      (64, 4, 4, 1, 4), (128, 4, 3, 0, 1)]:
            out.append(("splitk", dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=st, ASM=bool(asm),
                                       waves=waves, GROUP_N=1)))
    if 32 <= m <= 64:
        # the M = 64 profile (h200-2026-11-29d/ncu.txt): 128 x 64 tiles on 4 warps take 253
        # registers, one CTA per SM, 14 % of DRAM; smaller M tiles (the weight tile then read once
        # per M tile, the second time from L2), more warps or fewer stages trade that back
        for bn, bmx, w, st, waves in [(128, 32, 4, 3, 2), (64, 32, 4, 3, 2), (64, 64, 8, 3, 2),
                                      (128, 64, 4, 2, 2), (64, 64, 4, 2, 4), (128, 32, 4, 3, 1)]:
            out.append(("splitk", dict(BLOCK_N=bn, BLOCK_M=min(bmx, bm), num_warps=w, num_stages=st, ASM=True,
                                       waves=waves, GROUP_N=1)))
    if m >= 64:
        for bn, bm, w, st, asm in [(128, 128, 8, 3, 1), (128, 64, 4, 3, 1), (256, 128, 8, 3, 1), (128, 128, 8, 3, 0)]:
            out.append(("gemm", dict(BLOCK_N=bn, BLOCK_M=min(bm, max(16, m)), num_warps=w, num_stages=st,
                                     ASM=bool(asm), GROUP_N=8, SPLIT_K=1)))
    if m >= 128:
        for bn, blocks, w in [(64, 2, 4), (32, 4, 4)]:
            out.append(("dequant_mm", dict(BLOCK_N=bn, BLOCKS=blocks, num_warps=w)))
    return out


def w8_candidates(m):
    out = []
    if m <= 64:
        bm = max(16, m)
        for bn, bk, w, st, waves in [(64, 256, 4, 4, 2), (128, 128, 4, 4, 2), (64, 128, 4, 3, 4)]:
            out.append(("splitk", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=st,
                                       waves=waves, GROUP_N=1)))
    if m >= 32:
        for bn, bm, bk, w, st in [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 64, 128, 4, 4)]:
            if bm > max(64, 2 * m):
                continue
            out.append(("gemm", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=st,
                                     GROUP_N=8, SPLIT_K=1)))
    return out


def probe_int4(rec, shapes, ms, schemes=(("gptq", dict(bits=4, group_size=128, sym=True)),)):
    import omniq
    from omniq.kernels import triton_affine as A
    from omniq.backends import cuda as C
    dev = torch.device(DEV)
    for scheme_name, params in schemes:
        sch = omniq.get_scheme(scheme_name, **params)
        for n, k in shapes:
            w = torch.randn(n, k, device=dev) * 0.02
            qw = sch.quantize(w)
            p0 = A.prepare_affine(qw, dev)
            wb = sch.dequantize(qw).to(dev, torch.bfloat16)
            reps = copies_for(p0.qweight.numel() * 4)
            ps = [p0] + [clone_prepared(p0) for _ in range(reps - 1)]
            wbs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
            try:
                tps = [C.prepare_tinygemm(qw, dev)]
                tps += [C.prepare_tinygemm(qw, dev) for _ in range(reps - 1)]
            except Exception as ex:
                tps = None
                print("tinygemm prepare failed:", ex)
            for m in ms:
                if rec.left() < 10:
                    return
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = x @ wb.t()
                bf16_us = bench([lambda wb_=wb_: x @ wb_.t() for wb_ in wbs])
                rec.add(method="int4" if scheme_name == "gptq" else "awq4", n=n, k=k, m=m, cand="bf16", us=bf16_us,
                        speedup=1.0)
                cands = []
                for kind, cfg in int4_candidates(m):
                    if scheme_name == "awq" and kind == "gemv":
                        continue
                    if kind == "gemv":
                        fns = [lambda p=p, cfg=cfg: A.run_gemv(x, p, None, cfg) for p in ps]
                    elif kind == "dequant_mm":
                        fns = [lambda p=p, cfg=cfg: A.run_dequant_mm(x, p, None, cfg) for p in ps]
                    else:
                        fns = [lambda p=p, cfg=cfg, kind=kind: A.run_dot(x, p, None, kind, cfg) for p in ps]
                    cands.append((f"{kind} {json.dumps(cfg, separators=(',', ':'))}", {"kind": kind, **cfg}, fns))
                if tps is not None:
                    cands.append(("tinygemm", None, [lambda tp=tp: torch._weight_int4pack_mm(
                        x, tp.packed, tp.group_size, tp.scales_and_zeros) for tp in tps]))
                run_candidates(rec, "int4" if scheme_name == "gptq" else "awq4", n, k, m, bf16_us, cands, ref, 2e-2)
            del ps, wbs, tps
            torch.cuda.empty_cache()


def probe_w8(rec, which, shapes, ms):
    import omniq
    from omniq.kernels import triton_w8a8 as W
    dev = torch.device(DEV)
    sch = omniq.get_scheme("fp8" if which == "fp8" else "int8")
    for n, k in shapes:
        w = torch.randn(n, k, device=dev) * 0.02
        qw = sch.quantize(w)
        p0 = W.prepare_w8a8(qw, dev)
        wb = sch.dequantize(qw).to(dev, torch.bfloat16)
        reps = copies_for(n * k)
        ps = [p0] + [clone_prepared(p0) for _ in range(reps - 1)]
        wbs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
        for m in ms:
            if rec.left() < 10:
                return
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = x @ wb.t()
            bf16_us = bench([lambda wb_=wb_: x @ wb_.t() for wb_ in wbs])
            rec.add(method=which, n=n, k=k, m=m, cand="bf16", us=bf16_us, speedup=1.0)
            qus = bench([lambda: W.quantize_prepared_activation(x, p0)])
            rec.add(method=which, n=n, k=k, m=m, cand="act_quant_only", us=qus, speedup=bf16_us / qus)
            cands = []
            for kind, cfg in w8_candidates(m):
                fns = [lambda p=p, cfg=cfg, kind=kind: W.run_dot(x, p, None, kind, cfg) for p in ps]
                cands.append((f"{kind} {json.dumps(cfg, separators=(',', ':'))}", {"kind": kind, **cfg}, fns))
            if which == "fp8":
                def sm(p):
                    xq, xs, _ = W.quantize_prepared_activation(x, p)
                    return torch._scaled_mm(xq, p.weight.t(), scale_a=xs.reshape(-1, 1),
                                            scale_b=p.w_scale.reshape(1, -1), out_dtype=torch.bfloat16)
                cands.append(("scaled_mm", None, [lambda p=p: sm(p) for p in ps]))
            elif m > 16:
                def im(p):
                    xq, xs, azp = W.quantize_prepared_activation(x, p)
                    return W.int_epilogue(torch._int_mm(xq, p.weight.t()), p, xs, azp, None, x.dtype)
                cands.append(("int_mm", None, [lambda p=p: im(p) for p in ps]))
            run_candidates(rec, which, n, k, m, bf16_us, cands, ref, 5e-2)
        del ps, wbs
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_int.json")
    ap.add_argument("--budget", type=float, default=400)
    ap.add_argument("--what", default="int4,fp8,int8")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--ms", default="")
    ap.add_argument("--dry", action="store_true", help="CPU + Triton interpreter, tiny shapes, no timing")
    a = ap.parse_args()
    global DEV
    if a.dry:
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    shapes = SHAPES if not a.shapes else [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    rec = Recorder(a.out, a.budget)
    for what in a.what.split(","):
        if what in ("int4", "awq4"):
            ms = [int(v) for v in a.ms.split(",")] if a.ms else [1, 16, 64, 512, 2048]
            probe_int4(rec, shapes, ms, ((("gptq", dict(bits=4, group_size=128, sym=True)),) if what == "int4"
                                         else (("awq", dict(group_size=128)),)))
        elif what in ("fp8", "int8"):
            ms = [int(v) for v in a.ms.split(",")] if a.ms else [1, 16, 64, 512, 2048]
            probe_w8(rec, what, shapes, ms)
    print("done in %.0f s" % (time.time() - rec.t0))


if __name__ == "__main__":
    sys.exit(main())
