"""Why the tuner and the benchmark disagree on fp8 12288x3072 M=1: each kernel timed the tuner's
way (select.time_kernel over rotation_copies) three times, in alternating order."""
import torch, omniq
from omniq.dispatch import get_kernel
from omniq.dispatch.select import prepared_nbytes, rotation_copies, time_kernel
dev = torch.device("cuda")
for spec, n, k, m in [("fp8", 12288, 3072, 1), ("fp8", 12288, 3072, 16), ("fp8", 8192, 8192, 1)]:
    sch = omniq.get_scheme(spec)
    qw = sch.quantize(torch.randn(n, k, device=dev) * 0.02)
    names = ["triton.w8a8.gemm", "cuda.w8a8.gemv", "triton.w8a8.splitk"]
    kerns = [get_kernel(nm) for nm in names]
    first = kerns[0].layout.prepare(qw, dev)
    c = rotation_copies(prepared_nbytes(first), dev)
    preps = [first] + [kerns[0].layout.prepare(qw, dev) for _ in range(c - 1)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    res = {nm: [] for nm in names}
    for rep in range(3):
        for kern in (kerns if rep % 2 == 0 else kerns[::-1]):
            res[kern.name].append(time_kernel(kern, x, preps))
    # 8 copies (cap) and 40 reps: is it the copy count or noise?
    c8 = [kerns[0].layout.prepare(qw, dev) for _ in range(8)]
    more = {kern.name: time_kernel(kern, x, c8, reps=40) for kern in kerns}
    print(f"{spec} {n}x{k} M={m} copies={c} nbytes={prepared_nbytes(first)/1e6:.1f}MB L2={torch.cuda.get_device_properties(dev).L2_cache_size/1e6:.1f}MB")
    for nm in names:
        print(f"   {nm:22s} tuner-way {' '.join(f'{v:6.1f}' for v in res[nm])}   8 copies x40 {more[nm]:6.1f}", flush=True)
