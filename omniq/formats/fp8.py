"""FP8 (OCP E4M3FN / E5M2) saturating casts.

A plain `tensor.to(torch.float8_e4m3fn)` turns |x| > 464 into NaN (c10's conversion has no
saturation), so every producer clamps first; so do we.
"""
import torch

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
FP8_MAX = {torch.float8_e4m3fn: E4M3_MAX, torch.float8_e5m2: E5M2_MAX}


def saturating_cast(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Clamp to the finite range of `dtype`, then cast with round-to-nearest-even."""
    fmax = FP8_MAX[dtype]
    return x.float().clamp(-fmax, fmax).to(dtype)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype=torch.float8_e4m3fn) -> torch.Tensor:
    """x -> sat(x / scale) -> fp32 * scale: what a W8A8 kernel sees of its activation."""
    return saturating_cast(x.float() / scale, dtype).float() * scale
