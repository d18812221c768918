"""E8M0 shared scales (OCP MX): an unsigned biased exponent, X = 2^(b - 127), 0xFF = NaN.

Never cast a float to torch.float8_e8m0fnu: that cast rounds the mantissa (1.5 -> 2).
Build the byte from the integer exponent instead.
"""
import torch

E8M0_BIAS = 127
E8M0_NAN = 0xFF
SCALE_RULES = ("floor", "even", "ceil", "rceil")


def decode_e8m0(b: torch.Tensor) -> torch.Tensor:
    """uint8 exponent bytes -> float32 scales (0xFF -> NaN)."""
    e = b.to(torch.int32) - E8M0_BIAS
    out = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)
    return torch.where(b.to(torch.int32) == E8M0_NAN, torch.full_like(out, float("nan")), out)


def shared_exponent(amax: torch.Tensor, emax_elem: int, elem_max: float, mbits: int,
                    rule: str = "floor") -> torch.Tensor:
    """Unbiased shared exponent E (int32) for blocks with absolute maximum `amax`.

    floor (OCP v1.0): floor(log2 amax) - emax_elem
    even  (Quark):    amax's mantissa rounded to `mbits` bits first, then floor
    ceil:             ceil(log2 amax) - emax_elem
    rceil (NVIDIA):   ceil(log2(amax / elem_max))
    amax == 0 gives the smallest exponent (-127). A NaN or Inf amax gives 128, and exponents
    above 127 are left as is; `encode_e8m0` turns them into NaN (0xFF) as the OCP rule does
    (the reference's log2(Inf) and log2(NaN) both land there).
    """
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown MX scale rule {rule!r}; allowed: {SCALE_RULES}")
    amax = amax.float()
    zero = amax == 0
    safe = torch.where(zero, torch.ones_like(amax), amax)
    mant, exp = torch.frexp(safe)  # safe = mant * 2^exp, mant in [0.5, 1)
    floor_log2 = exp - 1
    if rule == "floor":
        e = floor_log2 - emax_elem
    elif rule == "even":
        # round the significand (in [1, 2)) to mbits fractional bits, RNE; 2.0 bumps the exponent
        sig = mant * 2
        sig_r = torch.round(sig * (1 << mbits)) / (1 << mbits)
        e = floor_log2 + (sig_r >= 2).to(floor_log2.dtype) - emax_elem
    elif rule == "ceil":
        e = floor_log2 + (mant != 0.5).to(floor_log2.dtype) - emax_elem
    else:  # rceil
        r = safe / elem_max
        m2, x2 = torch.frexp(r)
        e = (x2 - 1) + (m2 != 0.5).to(x2.dtype)
        e = torch.where(r == 0, torch.full_like(e, -E8M0_BIAS), e)  # amax/elem_max underflowed
    e = e.to(torch.int32)
    e = torch.where(zero, torch.full_like(e, -E8M0_BIAS), e.clamp(min=-E8M0_BIAS))
    # frexp(Inf) and frexp(NaN) report exponent 0; the block's scale must be NaN instead
    return torch.where(torch.isfinite(amax), e, torch.full_like(e, E8M0_BIAS + 1))


def encode_e8m0(e: torch.Tensor) -> torch.Tensor:
    """Unbiased int exponent -> uint8 byte; exponents above 127 become NaN (0xFF)."""
    b = e.to(torch.int32) + E8M0_BIAS
    return torch.where(b > 254, torch.full_like(b, E8M0_NAN), b.clamp(min=0)).to(torch.uint8)
