"""Independent numpy oracles for the microscaling and NVFP4 tests, written from formats.md §3
and §5 with ml_dtypes as the element codec. Nothing here imports omniq: these are what the
code under test is compared against."""
import ml_dtypes
import numpy as np

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# element format -> (emax, largest magnitude, mantissa bits), formats.md §3.2
ELEMENTS = {"e2m1": (2, 6.0, 1), "e4m3": (8, 448.0, 3)}


# ---- data --------------------------------------------------------------------------------
def gen_weight(rng: np.random.Generator, n: int, k: int, block: int = 32) -> np.ndarray:
    """float32 [n, k] whose blocks span many binades, with few-bit mantissas (so exact ties of
    E2M1 and E4M3 rounding occur), all-zero blocks, dense gaussian blocks and outliers."""
    nb = -(-k // block)
    base = rng.integers(-8, 8, size=(n, nb, 1))
    spread = rng.integers(-7, 1, size=(n, nb, block))
    mant = rng.integers(-127, 128, size=(n, nb, block))
    w = mant * np.exp2(base + spread - 4.0)
    kind = rng.random((n, nb, 1))
    w = np.where(kind < 0.08, 0.0, w)
    gauss = rng.standard_normal((n, nb, block)) * np.exp2(base)
    w = np.where((kind >= 0.08) & (kind < 0.35), gauss, w)
    outlier = (kind >= 0.35) & (kind < 0.45) & (rng.random((n, nb, block)) < 0.05)
    w = np.where(outlier, w * 2.0 ** 12, w)
    return w.reshape(n, nb * block)[:, :k].astype(np.float32)


# ---- element codecs ----------------------------------------------------------------------
def e2m1_codes(v, rounding: str) -> np.ndarray:
    """Codes 0..15 of v on the E2M1 grid, saturating at 6; the sign bit is kept (a negative
    value that rounds to zero, and -0.0, is -0, code 8, as ml_dtypes stores it).
    rne: ml_dtypes' cast; rhaz / rtz: the nearest grid point, ties away from / toward zero."""
    v = np.asarray(v, dtype=np.float64)
    if rounding == "rne":
        return v.astype(np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    a = np.minimum(np.abs(v), 6.0)
    d = np.abs(a[..., None] - E2M1_GRID)
    idx = d.argmin(-1) if rounding == "rtz" else 7 - d[..., ::-1].argmin(-1)
    return (idx + 8 * np.signbit(v)).astype(np.uint8)


def e2m1_values(codes) -> np.ndarray:
    return np.asarray(codes, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def e4m3_round(v) -> np.ndarray:
    """Saturating RNE cast to E4M3, as float32 values."""
    v = np.clip(np.asarray(v, dtype=np.float64), -448.0, 448.0).astype(np.float32)
    return v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e8m0_values(b) -> np.ndarray:
    return np.asarray(b, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)


def e4m3_values(b) -> np.ndarray:
    return np.asarray(b, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


# ---- the shared exponent -----------------------------------------------------------------
def scale_byte(amax, rule: str, elem: str) -> np.ndarray:
    """E8M0 byte of blocks with absolute maximum `amax` (float32), per formats.md §3.3:
    floor  floor(log2 amax) - emax                  (OCP / microxcaling)
    ceil   ceil(log2 amax) - emax
    even   torchao's EVEN: add half an ulp at `mbits` to amax's fp32 bits, keep the exponent
    rceil  ceil(log2(amax / max_elem)), the division in fp32
    amax 0 -> -127; below -127 clamps to -127; NaN/Inf or above 127 -> 0xFF."""
    emax, emax_val, mbits = ELEMENTS[elem]
    amax = np.asarray(amax, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a64 = amax.astype(np.float64)
        if rule == "floor":
            e = np.floor(np.log2(a64)) - emax
        elif rule == "ceil":
            e = np.ceil(np.log2(a64)) - emax
        elif rule == "even":
            bits = amax.view(np.uint32).astype(np.uint64)
            bits = (bits + (1 << (23 - mbits - 1))) & 0x7F800000
            e = (bits >> 23).astype(np.float64) - 127 - emax
        elif rule == "rceil":
            e = np.ceil(np.log2((amax / np.float32(emax_val)).astype(np.float64)))
        else:
            raise ValueError(rule)
    e = np.where(amax == 0, -127.0, e)
    e = np.maximum(e, -127.0)
    ok = np.isfinite(amax) & (e <= 127)
    return np.where(ok, e + 127, 255).astype(np.uint8)


# ---- MX quantization ---------------------------------------------------------------------
def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    k = x.shape[-1]
    nb = -(-k // block)
    xp = np.zeros(x.shape[:-1] + (nb * block,), dtype=np.float32)
    xp[..., :k] = x
    return xp.reshape(*x.shape[:-1], nb, block)


def mx_quant(x, elem: str, rule: str, rounding: str, block: int = 32):
    """-> (element codes: E2M1 codes uint8 or E4M3 values float32, [..., K]; scale bytes)."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    xb = _blocks(x, block)
    b = scale_byte(np.abs(xb).max(-1), rule, elem)
    v = xb.astype(np.float64) * np.exp2(-(b.astype(np.float64) - 127))[..., None]  # exact
    if elem == "e2m1":
        q = e2m1_codes(v, rounding)
    else:
        q = e4m3_round(v)
    return q.reshape(*x.shape[:-1], -1)[..., :k], b


def mx_dequant(q, b, elem: str, block: int = 32) -> np.ndarray:
    vals = e2m1_values(q) if elem == "e2m1" else np.asarray(q, dtype=np.float32)
    k = vals.shape[-1]
    s = np.repeat(e8m0_values(b), block, axis=-1)[..., :k]
    return (vals * s).astype(np.float32)


def mx_fake_quant(x, elem: str, rule: str, rounding: str, block: int = 32) -> np.ndarray:
    q, b = mx_quant(x, elem, rule, rounding, block)
    return mx_dequant(q, b, elem, block)


def dual_quant(x, rounding: str):
    """Two-level MXFP4 (formats.md §3.6; CANN aclnnDynamicDualLevelMxQuant): l0 = amax512/6,
    t = x / l0 in fp32, then OCP FLOOR MXFP4 of t. -> (codes, fine bytes, l0 fp32)."""
    x = np.asarray(x, dtype=np.float32)
    xb = _blocks(x, 512)
    l0 = (np.abs(xb).max(-1) / np.float32(6.0)).astype(np.float32)
    safe = np.where(l0 == 0, np.float32(1.0), l0)
    t = (xb / safe[..., None]).astype(np.float32).reshape(x.shape)
    q, b = mx_quant(t, "e2m1", "floor", rounding)
    return q, b, l0


def dual_dequant(q, fine, l0) -> np.ndarray:
    v = mx_dequant(q, fine, "e2m1")
    return (v * np.repeat(l0, 512, axis=-1)).astype(np.float32)


def dual_fake_quant(x, rounding: str) -> np.ndarray:
    return dual_dequant(*dual_quant(x, rounding))


# ---- error bounds ------------------------------------------------------------------------
def half_step(a, elem: str) -> np.ndarray:
    """Half the distance between the element grid points around |a| (a already scaled)."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    if elem == "e2m1":
        step = np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0))
    else:
        ex = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))
        step = np.exp2(ex - 3)
    return step / 2


def matmul_bound(xq: np.ndarray, w: np.ndarray) -> np.ndarray:
    """How far an fp32 product may stray from the exact one: K ulps of sum |x||w| (plus one)."""
    k = xq.shape[-1]
    return (k + 2) * 2.0 ** -23 * (np.abs(xq) @ np.abs(w).T) + 1e-30


# ---- GGUF block builders (formats.md §5) ------------------------------------------------
def gguf_mxfp4_bytes(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[N, K] E2M1 codes + [N, K/32] E8M0 bytes -> GGUF MXFP4 rows [N, K/32*17]: e @0, qs[16]
    with element j<16 in the low nibble of qs[j] and j>=16 in the high nibble of qs[j-16]."""
    n, k = codes.shape
    c = codes.reshape(n, k // 32, 32).astype(np.uint8)
    qs = c[..., :16] | (c[..., 16:] << 4)
    return np.concatenate([scale.reshape(n, k // 32, 1).astype(np.uint8), qs], -1).reshape(n, -1)


def gguf_nvfp4_bytes(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[N, K] codes + [N, K/16] UE4M3 bytes -> GGUF NVFP4 rows [N, K/64*36]: 4 scale bytes,
    then qs[32]; sub-block j uses bytes 8j..8j+7, element i<8 low nibble, i>=8 high nibble."""
    n, k = codes.shape
    c = codes.reshape(n, k // 64, 4, 16).astype(np.uint8)
    qs = (c[..., :8] | (c[..., 8:] << 4)).reshape(n, k // 64, 32)
    d = scale.reshape(n, k // 64, 4).astype(np.uint8)
    return np.concatenate([d, qs], -1).reshape(n, -1)
