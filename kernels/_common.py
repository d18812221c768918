"""Host-side helpers shared by omniq's Triton kernel modules: the optional Triton import,
interpreter detection, SM counts, launch-grid and split-K choice, split-K workspaces, layered
configurations, split-K arrival counters, and the availability rule of every Triton-backed kernel.

Only Python that runs on the host lives here; the @triton.jit code stays in each kernel module.
"""
from __future__ import annotations

import os

import torch

from omniq.dispatch import Kernel
from omniq.dispatch.overrides import forced_kernel

try:  # Triton is optional: omniq imports without it, the kernels report its absence
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def float_dot_dtype(dtype: torch.dtype):
    """(Triton dot dtype, IEEE fp32) for float activations in `dtype`."""
    if dtype == torch.float32:
        return tl.float32, True
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32, False  # the interpreter's bf16 dot is wrong; fp32 holds bf16 exactly
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), False


def split_for(tiles: int, k_tiles: int, device: torch.device, waves: float = 2.0, cap: int = 16) -> int:
    """Split-K factor that gives about `waves` CTAs per SM (at most `cap`) without empty splits."""
    want = max(1, int(round(waves * sm_count(device) / max(tiles, 1))))
    s = min(want, cap, k_tiles)
    while s > 1 and -(-k_tiles // s) * (s - 1) >= k_tiles:  # the last split would be empty
        s -= 1
    return max(s, 1)


def pick_split(cfg: dict, tiles: int, iters: int, device: torch.device, splitk: bool = True,
               cap: int = 16, waves: float = 2.0) -> int:
    """The split-K factor of one launch: cfg's SPLIT_K, else (split-K kernels) split_for, at most
    one split per K iteration."""
    if splitk:
        split = cfg.get("SPLIT_K") or split_for(tiles, iters, device, cfg.get("waves", waves), cap)
    else:
        split = cfg.get("SPLIT_K", 1)
    return max(1, min(split, iters))


def launch_grid(cfg: dict, n: int, m: int, iters: int, device: torch.device, splitk: bool = True,
                cap: int = 16) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, output tiles, split-K factor) of a swap-AB tiled launch: tiles of at
    least 16 and at most the next power of two of N / M."""
    bn = max(16, min(cfg["BLOCK_N"], next_pow2(n)))
    bm = max(16, min(cfg["BLOCK_M"], next_pow2(m)))
    tiles = -(-n // bn) * -(-m // bm)
    return bn, bm, tiles, pick_split(cfg, tiles, iters, device, splitk, cap)


_COUNTERS: dict = {}


def tile_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """Split-K arrival counters per (device, stream), zero between launches (the last CTA of
    each tile resets its counter). Kernels on one stream never overlap, so layers share them;
    a CUDA graph captured on a side stream gets its own buffer (zeroed once, inside the graph)."""
    if device.type == "cuda":
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (str(device), 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n_tiles:
        buf = torch.zeros(max(n_tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def split_workspace(split: int, tiles: int, bn: int, bm: int, device: torch.device, counters,
                    dummy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials buffer, arrival counters) for a split-K launch; without a split, one small
    placeholder (or `dummy`) for both, which the kernel never reads."""
    if split == 1:
        if dummy is None:
            dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, dummy
    ws = torch.empty(split * tiles * bn * bm, dtype=torch.float32, device=device)
    return ws, counters(device, tiles)


def layered_config(defaults: dict, by_m: dict, tuned: dict, kind: str, m: int, tuned_key: tuple,
                   *refinements: dict) -> dict:
    """DEFAULTS[kind], then BY_M[(kind, M bucket)], then `refinements`, then
    TUNED[(*tuned_key, M bucket)]: later layers override earlier ones."""
    from omniq.dispatch.kernel import m_bucket
    mb = m_bucket(m)
    cfg = dict(defaults[kind])
    cfg.update(by_m.get((kind, mb), {}))
    for r in refinements:
        cfg.update(r)
    cfg.update(tuned.get((*tuned_key, mb), {}))
    return cfg


def triton_reason(kernel_name: str, device: torch.device) -> str | None:
    """Why a Triton kernel cannot run on `device` here, or None. On a CPU Triton runs only
    interpreted (TRITON_INTERPRET=1) and only for a forced kernel (tests): never by choice."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cpu":
        if interpreting() and forced_kernel() == kernel_name:
            return None
        return ("Triton does not compile for the CPU; its interpreter (TRITON_INTERPRET=1) runs only a "
                "forced kernel, for tests")
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch has no CUDA runtime here"
    if device.type == "xpu":
        return None
    return f"Triton does not compile for device type {device.type!r}"



class TritonKernel(Kernel):
    """A Kernel backed by Triton: available where Triton compiles; on a CPU only interpreted
    and forced (triton_reason)."""
    backend = "triton"

    def available(self, device: torch.device) -> str | None:
        return triton_reason(self.name, device)
