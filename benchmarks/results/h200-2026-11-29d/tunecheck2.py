"""fp8 12288x3072 M=1: triton.w8a8.gemm timed 12.3 us by the tuner and 19.3 us by run.py. Same
copies, timed (a) the tuner's way, (b) with run.py's Timer, (c) graphs of R rounds over the copies."""
import os, sys, statistics
import torch, omniq
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from run import Timer, clone_prepared
from omniq.dispatch import get_kernel
from omniq.dispatch.select import capture_graph, prepared_nbytes, rotation_copies, time_kernel
dev = torch.device("cuda")
sch = omniq.get_scheme("fp8")
n, k = 12288, 3072
qw = sch.quantize(torch.randn(n, k, device=dev) * 0.02)
x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
timer = Timer(dev, 0.1, 200, True, 1.0)
for name in ["triton.w8a8.gemm", "cuda.w8a8.gemv", "triton.w8a8.splitk"]:
    kern = get_kernel(name)
    first = kern.layout.prepare(qw, dev)
    c = rotation_copies(prepared_nbytes(first), dev)
    fresh = [first] + [kern.layout.prepare(qw, dev) for _ in range(c - 1)]
    clones = [first] + [clone_prepared(first) for _ in range(c - 1)]
    out = [f"{name:20s} c={c}"]
    out.append(f"tuner(fresh) {time_kernel(kern, x, fresh):6.1f}")
    out.append(f"tuner(clones) {time_kernel(kern, x, clones):6.1f}")
    t = timer([lambda q=q: kern.run(x, q, None) for q in fresh])
    out.append(f"Timer(fresh) {t['us']:6.1f} [{t['how']}]")
    fns = [lambda q=q: kern.run(x, q, None) for q in fresh]
    for rounds in (1, 4, 12):
        g = capture_graph(fns, dev, rounds=rounds)
        ts = []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); g.replay(); e.record(); e.synchronize()
            ts.append(s.elapsed_time(e) * 1e3 / (rounds * c))
        out.append(f"R{rounds} {statistics.median(ts):6.1f}")
        del g
    print("  ".join(out), flush=True)
