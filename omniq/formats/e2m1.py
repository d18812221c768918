"""FP4 E2M1 elements (OCP MX, NVFP4): sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0.
No Inf/NaN. Code 8 is -0."""
import torch

E2M1_MAX = 6.0
# Magnitudes of codes 0..7; codes 8..15 are the same values negated.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)

# Rounding rules used by producers (formats.md §3.3, §3.5, §5):
#   "rne"  round half to even on the E2M1 grid (ModelOpt NVFP4, vLLM, torchao)
#   "rhaz" round half away from zero (microxcaling "nearest", msModelSlim)
#   "rtz"  ties toward zero (gguf-py MXFP4: first argmin wins)
ROUNDING_RULES = ("rne", "rhaz", "rtz")


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15, one per element) -> float32 values."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


def encode_e2m1(x: torch.Tensor, rounding: str = "rne", signed_zero: bool = False) -> torch.Tensor:
    """float values (already divided by their scale) -> uint8 codes 0..15, saturating at 6.

    NaN encodes as 0 (E2M1 has no NaN); callers reject NaN weights before this point.
    Zero's sign: by default every zero is +0 (code 0, as gguf-py's argmin gives); with
    `signed_zero=True` the input's sign bit is kept, so a negative value that rounds to zero
    (and -0.0) is -0, code 8, as ml_dtypes and torch casts and ModelOpt's `_cast_fp4` do
    (ModelOpt tests x < 0, which differs only for -0.0).
    """
    if rounding not in ROUNDING_RULES:
        raise ValueError(f"unknown e2m1 rounding {rounding!r}; allowed: {ROUNDING_RULES}")
    x = x.float()
    mag = x.abs().clamp(max=E2M1_MAX)
    grid = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=x.device)
    # index of the largest grid point <= mag, and the distance to the next one up
    lo = torch.bucketize(mag, grid, right=True) - 1
    lo = lo.clamp(0, 7)
    hi = (lo + 1).clamp(max=7)
    d_lo = mag - grid[lo]
    d_hi = grid[hi] - mag
    up = d_hi < d_lo
    tie = (d_hi == d_lo) & (hi != lo)
    if rounding == "rne":
        up |= tie & (lo % 2 == 1)  # even codes have mantissa bit 0
    elif rounding == "rhaz":
        up |= tie
    code = torch.where(up, hi, lo)
    code = torch.where(torch.isnan(x), torch.zeros_like(code), code)  # bucketize puts NaN past 6
    sign = torch.signbit(x) if signed_zero else (x < 0) & (code != 0)
    return (code + 8 * sign.long()).to(torch.uint8)
