"""`python -m omniq ...`: doctor, explain, tune, matrix.

    python -m omniq doctor
    python -m omniq explain --scheme gptq --bits 4 --group-size 128 --n 8192 --k 8192 --m 1
    python -m omniq tune --device cuda
    python -m omniq matrix            # the scheme x backend support matrix (markdown)
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

import torch

# Shapes (N, K) and M values that `tune` measures by default: real DiT / LLM layers.
TUNE_SHAPES = ((3072, 12288), (12288, 3072), (8192, 8192))
TUNE_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def scheme_params(extra: list[str]) -> dict:
    """Turn `--bits 4 --group-size 128 --sym` into {'bits': 4, 'group_size': 128, 'sym': True}."""
    params, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise SystemExit(f"omniq: unexpected argument {tok!r}; scheme parameters look like --group-size 128")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            params[key] = _value(val)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            params[key] = _value(extra[i + 1])
            i += 2
        else:
            params[key] = True
            i += 1
    return params


def scheme_from_spec(spec: str, extra_params: dict):
    """`gptq:bits=4:group_size=128` (benchmarks/run.py's spelling) -> the scheme; `extra_params`
    (from --flags) apply to every scheme of the list."""
    from omniq import get_scheme
    name, *pairs = spec.split(":")
    params = dict(extra_params)
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"omniq: scheme spec {spec!r}: {pair!r} is not param=value")
        key, val = pair.split("=", 1)
        params[key] = _value(val)
    return get_scheme(name, **params)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise SystemExit(f"omniq: unknown dtype {name!r}; use bfloat16, float16 or float32")
    return dt


def cmd_explain(args, extra) -> int:
    from omniq import Problem, get_scheme
    from omniq.dispatch.select import explain_problem
    scheme = get_scheme(args.scheme, **scheme_params(extra))
    device = torch.device(args.device)
    problem = Problem(scheme, args.n, args.k, args.m, _dtype(args.dtype), device)
    print(f"{scheme.key}  N={args.n} K={args.k} M={args.m} (bucket {problem.bucket}) "
          f"{args.dtype} on {device}")
    prepared_for = None
    if args.measure:
        from omniq.linear import prepare
        w = torch.randn(args.n, args.k, device=device) * 0.02
        p = prepare(scheme.quantize(w), device, problem.act_dtype)
        prepared_for = {p.layout: p.data}
        verdicts = explain_problem(problem, p.layout, prepared_for, measure=True)
    else:
        verdicts = explain_problem(problem)
    for v in verdicts:
        print("  " + v.line())
    return 0


def backend_status() -> list[tuple[str, str]]:
    """(component, status) lines for doctor: what is present here and why not."""
    out = [("python", platform.python_version()), ("torch", torch.__version__)]
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        out.append(("cuda", f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}"))
    else:
        out.append(("cuda", "absent: " + ("torch is a CPU build" if torch.version.cuda is None
                                          else "no CUDA device visible")))
    triton = importlib.util.find_spec("triton")
    if triton is None:
        out.append(("triton", "absent: triton is not installed (pip install omniq[triton])"))
    else:
        import triton as _t
        out.append(("triton", f"{_t.__version__}" + ("" if torch.cuda.is_available() else
                                                     " (no GPU: kernels run only interpreted, for tests)")))
    npu = importlib.util.find_spec("torch_npu")
    out.append(("torch_npu", "present" if npu else "absent: torch_npu is not installed (Ascend NPU backend off)"))
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    out.append(("xpu", "present" if xpu else "absent: torch has no XPU device"))
    ipex = importlib.util.find_spec("intel_extension_for_pytorch")
    out.append(("ipex", "present" if ipex else "absent: intel_extension_for_pytorch is not installed"))
    vllm = importlib.util.find_spec("vllm")
    out.append(("vllm", "present" if vllm else "absent: vllm is not installed (integration off)"))
    return out


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


def cmd_doctor(args, extra) -> int:
    from omniq import all_kernels
    device = default_device()
    print(f"omniq doctor — device: {device}")
    for name, status in backend_status():
        print(f"  {name:<10} {status}")
    kernels = all_kernels()
    print(f"kernels: {len(kernels)} registered")
    by_backend: dict[str, list] = {}
    for k in kernels:
        by_backend.setdefault(k.backend, []).append(k)
    for backend in sorted(by_backend):
        ks = by_backend[backend]
        usable = [k for k in ks if k.available(device) is None]
        reasons = sorted({k.available(device) for k in ks if k.available(device)})
        line = f"  {backend:<10} {len(ks):3d} kernels, {len(usable):3d} available on {device.type}"
        if reasons:
            line += f"  ({reasons[0]}{'; ...' if len(reasons) > 1 else ''})"
        print(line)
    return 0


def cmd_tune(args, extra) -> int:
    from omniq.dispatch import tuning
    from omniq.dispatch.kernel import Problem
    from omniq.dispatch.registry import all_kernels
    from omniq.dispatch.rotation import rotating_copies
    from omniq.dispatch.select import rejection, trial
    device = torch.device(args.device)
    common = scheme_params(extra)
    schemes = [scheme_from_spec(s, common) for s in args.schemes.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else TUNE_SHAPES
    ms = [int(m) for m in args.m.split(",")] if args.m else TUNE_M
    dtype = _dtype(args.dtype)
    out = {}
    total = len(schemes) * len(shapes) * len(ms)
    done = 0
    for scheme in schemes:
        for n, k in shapes:
            qw = scheme.quantize(torch.randn(n, k, device=device) * 0.02)
            layouts = {}
            for m in ms:
                problem = Problem(scheme, n, k, m, dtype, device)
                cands = [kern for kern in all_kernels() if rejection(kern, problem) is None]
                for kern in cands:
                    if kern.layout.name not in layouts:
                        # copies to rotate over: a weight that fits in L2 would otherwise be timed
                        # L2-hot, which favours compute-heavy kernels at decode-size M
                        layouts[kern.layout.name] = rotating_copies(kern.layout.prepare(qw, device), device)
                times = trial(problem, cands, layouts, save=False)
                done += 1
                if times:
                    best = min(times, key=times.get)
                    out[problem.key()] = {"kernel": best, "times_us": times}
                    print(f"[{done}/{total}] {scheme.name} {n}x{k} M={m}: {best} {times[best]:.1f} us",
                          file=sys.stderr)
            # merged after every shape, so an interrupted run keeps what it measured
            path = tuning.record(device, out, args.output)
    print(f"wrote {len(out)} entries to {path}")
    return 0


def support_matrix() -> str:
    """Markdown table: each scheme (default parameters) x backend -> kernels that serve it.

    Generated from the registry, so the README's copy can be checked against the code.
    """
    from omniq.dispatch.registry import all_kernels
    from omniq.schemes import get_scheme
    from omniq.schemes.registry import primary_schemes
    backends = ("cuda", "triton", "cpu", "npu", "xpu", "reference")
    kernels = all_kernels()
    rows = ["| scheme | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
    for name in primary_schemes():
        s = get_scheme(name)
        cells = []
        for b in backends:
            names = sorted(k.name for k in kernels if k.backend == b and k.serves(s) is None)
            cells.append("<br>".join(f"`{n}`" for n in names) if names else "—")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cmd_matrix(args, extra) -> int:
    print(support_matrix())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omniq", description="omniq: quantized linear kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("explain", help="every kernel's verdict for one problem (extra --flags are scheme params)")
    p.add_argument("--scheme", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--measure", action="store_true", help="time the valid kernels on a random weight")
    p.set_defaults(fn=cmd_explain)
    p = sub.add_parser("doctor", help="device, backends present or absent, kernel count")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("tune", help="measure candidates over the shape grid and write the tuning table")
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--schemes", default="gptq,int8,fp8",
                   help="comma-separated specs, e.g. gptq:bits=4:group_size=128,mxfp4:activation=None")
    p.add_argument("--shapes", default=None, help="e.g. 8192x8192,3072x12288 (N x K)")
    p.add_argument("--m", default=None, help="e.g. 1,16,512")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--output", default=None, help="table path (default: the user cache)")
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("matrix", help="print the scheme x backend support matrix (markdown)")
    p.set_defaults(fn=cmd_matrix)
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd not in ("explain", "tune"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args, extra)
    except (ValueError, RuntimeError) as e:  # OmniqError / KernelError: one clear line
        print(f"omniq: error: {e}", file=sys.stderr)
        return 2
