"""Config sweep for the repacked GGUF kernels (q4_k / q8_0, kernels/triton_gguf.py) on a CUDA GPU.

Per (type, N x K, M) it times with CUDA-graph replay over rotating weight copies
(probe_int.bench / copies_for): bf16 F.linear, triton.gguf.dequant_mm, and a small grid of
configs of the one-dot-per-K-tile kernel (split-K grid for M <= 64, GEMM grid above), printing
one line per config (µs, speedup over bf16, max |y - ref| / max |ref| against F.linear with the
weight dequantized by scheme.dequantize, i.e. gguf_blocks, not the Triton decoder), then the
best config per cell beside dequant_mm and bf16. A config that fails to compile or launch is
printed and skipped. The weights are random valid blocks (modest fp16 d / dmin), not a
quantizer's output: the kernels' speed does not depend on the values.

Order: M = 512, 2048 first (the GEMM), then 64, 16, 1; a time budget (default 85 s) stops the
sweep early and says so, so rerun with --m for the rest.

    PYTHONPATH=$PWD python3 benchmarks/probe_gguf_gemm.py --json $OUT/probe_gguf_gemm.json
    [--types q4_k,q8_0] [--m 512,2048,64,16,1] [--shapes 8192x8192,...] [--budget 85] [--dry]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import probe_int  # noqa: E402

SHAPES = [(8192, 8192), (12288, 3072), (3072, 12288)]
# (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages); BLOCK_M is clamped to next_pow2(M) >= 16
SPLITK_GRID = [(128, 64, 128, 4, 4), (128, 64, 128, 4, 3), (64, 64, 256, 4, 3), (64, 64, 128, 4, 5),
               (256, 64, 64, 8, 4), (128, 64, 256, 4, 2)]
GEMM_GRID = [(128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
             (256, 128, 64, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 3), (128, 256, 128, 8, 2)]


def random_gguf(gtype: str, n: int, k: int, device) -> "object":
    """A QuantizedWeight of random valid blocks: any code / scale bytes, fp16 fields in [1e-3, 2e-3]."""
    import omniq
    from omniq.formats.gguf_blocks import BLOCK_FACTS
    from omniq.schemes.base import QuantizedWeight
    f = BLOCK_FACTS[gtype]
    nb, bpb = k // f["block_elems"], f["block_bytes"]
    raw = torch.randint(0, 256, (n, nb, bpb), dtype=torch.uint8, device=device)
    for name, (off, _) in f["fields"].items():
        if name in ("d", "dmin", "m"):
            h = (torch.rand(n, nb, device=device) * 1e-3 + 1e-3).half()
            raw[:, :, off:off + 2] = h.view(torch.uint8).reshape(n, nb, 2)
    return QuantizedWeight(omniq.get_scheme("gguf", type=gtype), (n, k), {"weight": raw.reshape(n, nb * bpb)})


def resources() -> tuple[str, dict]:
    """Registers / spills / shared memory of the last repacked-kernel launch, when known."""
    from omniq.kernels import triton_gguf as tg
    h = tg.LAST_COMPILED.get("mm")
    try:
        r = {"regs": int(h.n_regs), "spills": int(h.n_spills), "smem": int(h.metadata.shared)}
    except Exception:   # interpreter, or another Triton version's handle
        return "", {}
    return f"  regs {r['regs']} spills {r['spills']} smem {r['smem'] // 1024} KiB", r


def max_rel(y, ref) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="probe_gguf_gemm.json")
    ap.add_argument("--types", default="q4_k,q8_0")
    ap.add_argument("--m", default="512,2048,64,16,1")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--budget", type=float, default=85.0)
    ap.add_argument("--dry", action="store_true", help="CPU + Triton interpreter, tiny shapes, no timing")
    a = ap.parse_args()
    if a.dry:
        os.environ["TRITON_INTERPRET"] = "1"
        probe_int.DEV = "cpu"
    from omniq.kernels import triton_gguf as tg
    dev = torch.device("cpu" if a.dry else "cuda")
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes else SHAPES
    if a.dry and not a.shapes:
        shapes = [(48, 512)]
    ms = [int(v) for v in a.m.split(",")]
    types = a.types.split(",")
    t0 = time.time()
    rows, best = [], {}
    meta = {"device": "cpu (dry run)" if a.dry else torch.cuda.get_device_name(0), "torch": torch.__version__}

    def save():
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "best": list(best.values())}, fh, indent=0)

    weights = {}   # (type, n, k) -> (prepared copies, bf16 copies of the dequantized weight)
    stopped = None
    for m in ms:
        for t in types:
            for n, k in shapes:
                if time.time() - t0 > a.budget:
                    stopped = stopped or f"budget {a.budget:.0f} s spent before {t} {n}x{k} M={m}"
                    continue
                if (t, n, k) not in weights:
                    qw = random_gguf(t, n, k, dev)
                    wb = qw.scheme.dequantize(qw).to(torch.bfloat16)    # gguf_blocks, the oracle
                    base = tg.prepare_gguf(qw, dev)
                    c = min(8, probe_int.copies_for(qw.nbytes))
                    cb = min(8, probe_int.copies_for(wb.numel() * 2))
                    weights[(t, n, k)] = ([base] + [tg.prepare_gguf(qw, dev) for _ in range(c - 1)],
                                          [wb] + [wb.clone() for _ in range(cb - 1)])
                preps, wbs = weights[(t, n, k)]
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = torch.nn.functional.linear(x, wbs[0])
                bf16 = probe_int.bench([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in wbs])
                cell = {"type": t, "n": n, "k": k, "m": m, "bf16_us": bf16}

                def timed(label, fns, cfg=None):
                    try:
                        tg.LAST_COMPILED.clear()
                        err = max_rel(fns[0](), ref)
                        res = resources()
                        us = probe_int.bench(fns, reps=9, inner=2) if err < 2e-2 else None
                    except Exception as ex:   # a config that does not compile / launch: report, go on
                        print(f"{t:5} {n:>5}x{k:<5} M={m:<5} {label:<44} FAILED {type(ex).__name__}: "
                              f"{str(ex).splitlines()[0][:150] if str(ex) else ''}", flush=True)
                        rows.append({**cell, "cand": label, "cfg": cfg, "error": f"{type(ex).__name__}: {str(ex)[:300]}"})
                        return None
                    if us is None:
                        print(f"{t:5} {n:>5}x{k:<5} M={m:<5} {label:<44} WRONG max rel err {err:.2e}", flush=True)
                        rows.append({**cell, "cand": label, "cfg": cfg, "error": f"wrong: max rel err {err:.3g}"})
                        return None
                    print(f"{t:5} {n:>5}x{k:<5} M={m:<5} {label:<44} {us:9.2f} us  {bf16 / us:5.2f}x  "
                          f"err {err:.1e}  (bf16 {bf16:.1f}){res[0]}", flush=True)
                    rows.append({**cell, "cand": label, "cfg": cfg, "us": us, "speedup": bf16 / us, "max_rel_err": err,
                                 **res[1]})
                    return us

                dq = timed("dequant_mm", [lambda p_=p_: tg.run_gguf_dequant_mm(x, p_, None) for p_ in preps])
                kind = "splitk" if m <= tg.SPLITK_MAX_M else "gemm"
                grid = (SPLITK_GRID if kind == "splitk" else GEMM_GRID)
                cands = [(f"{kind} default", kind, None)]
                if kind == "splitk":
                    cands.append(("gemm default (no split)", "gemm", None))
                for bn, bm, bk, nw, ns in grid:
                    cfg = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns,
                           "GROUP_N": 8, "waves": 2.0}
                    cands.append((f"{kind} BN{bn} BM{bm} BK{bk} w{nw} s{ns}", kind, cfg))
                top = None
                for label, knd, cfg in cands:
                    if time.time() - t0 > a.budget:
                        stopped = stopped or f"budget {a.budget:.0f} s spent inside {t} {n}x{k} M={m}"
                        break
                    us = timed(label, [lambda p_=p_, c_=cfg, k_=knd: tg.run_gguf(x, p_, None, k_, c_) for p_ in preps], cfg)
                    if us is not None and (top is None or us < top[1]):
                        top = (label, us, cfg)
                if top:
                    best[(t, n, k, m)] = {**cell, "best": top[0], "best_cfg": top[2], "best_us": top[1],
                                          "speedup": bf16 / top[1], "dequant_mm_us": dq}
                save()
        # free the copies of shapes no later M needs? all M use all shapes: keep them
    print("\nbest per cell (speedup over bf16 F.linear, same run)")
    print(f"{'type':5} {'N x K':>11} {'M':>5} {'bf16 us':>8} {'dequant_mm':>16} {'best kernel':>16}  config")
    for b in best.values():
        dq = b["dequant_mm_us"]
        dqs = f"{dq:7.1f} {b['bf16_us'] / dq:5.2f}x" if dq else "   -"
        print(f"{b['type']:5} {b['n']:>5}x{b['k']:<5} {b['m']:>5} {b['bf16_us']:8.1f} {dqs:>16} "
              f"{b['best_us']:8.1f} {b['speedup']:5.2f}x  {b['best']}")
    if stopped:
        print(f"STOPPED EARLY: {stopped}; rerun with --m / --types / --shapes for the rest")
    meta["stopped"] = stopped
    save()
    print("done in %.0f s" % (time.time() - t0))


if __name__ == "__main__":
    sys.exit(main())
