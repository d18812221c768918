"""A tiny interpreter for the PTX subset the fp4 / GGUF decoders use, so the exact asm strings
the kernels hand to tl.inline_asm_elementwise can be checked on the CPU (CI has no GPU).

Semantics from the PTX ISA: prmt (default mode: selector nibble i picks byte i of {b, a}),
lop3 (3-input truth table, a = 0xF0, b = 0xCC, c = 0xAA), shl/shr (logical), and/cvt.u32.u16,
mov.b32 {lo, hi} (a register's two 16-bit halves),
fma.rn / sub.rn on bf16x2 and f16x2 (exact result, rounded once per 16-bit lane, as ml_dtypes
and numpy round). Values are Python ints holding the 32-bit registers.
"""
import re

import ml_dtypes
import numpy as np

M32 = 0xFFFFFFFF
_DT = {"bf16x2": ml_dtypes.bfloat16, "f16x2": np.float16}


def lanes(x: int, dt):
    v = np.array([x & 0xFFFF, (x >> 16) & 0xFFFF], dtype=np.uint16).view(dt)
    return float(v[0]), float(v[1])


def pack(lo: float, hi: float, dt) -> int:
    v = np.array([lo, hi], dtype=np.float64).astype(dt).view(np.uint16)
    return int(v[0]) | (int(v[1]) << 16)


def _prmt(a: int, b: int, sel: int) -> int:
    by = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        if s & 8:
            raise NotImplementedError("prmt sign-replicate selectors are not used")
        out |= by[s] << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    r = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        r |= ((lut >> idx) & 1) << bit
    return r


def _lanewise(op, a, b, c, dt):
    out = []
    for x, y, z in zip(lanes(a, dt), lanes(b, dt), lanes(c, dt) if c is not None else (0.0, 0.0)):
        out.append(op(np.float64(x), np.float64(y), np.float64(z)))
    return pack(out[0], out[1], dt)


def run_ptx(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute `asm` with $i operands (ints); returns every $i after execution."""
    regs = {f"${i}": v for i, v in operands.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0) & M32

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        m = re.match(r"([a-z0-9.]+)\s+(.*)", line)
        op, args = m.group(1), [t.strip() for t in m.group(2).split(",")]
        d = args[0]
        if op == "mov.b32" and d.startswith("{"):    # mov.b32 {lo, hi}, r: unpack two 16-bit halves
            lo, hi, src = d.strip("{ "), args[1].strip("} "), val(args[2])
            regs[lo], regs[hi] = src & 0xFFFF, src >> 16
        elif op == "mov.b32":
            regs[d] = val(args[1])
        elif op == "cvt.u32.u16":
            regs[d] = val(args[1]) & 0xFFFF
        elif op == "prmt.b32":
            regs[d] = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op in ("shr.b32", "shr.u32"):
            regs[d] = val(args[1]) >> val(args[2])
        elif op == "shl.b32":
            regs[d] = (val(args[1]) << val(args[2])) & M32
        elif op == "and.b32":
            regs[d] = val(args[1]) & val(args[2])
        elif op == "lop3.b32":
            regs[d] = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif op.startswith("fma.rn."):
            regs[d] = _lanewise(lambda x, y, z: x * y + z, val(args[1]), val(args[2]), val(args[3]),
                                _DT[op.split(".")[-1]])
        elif op.startswith("sub.rn."):
            regs[d] = _lanewise(lambda x, y, z: x - y, val(args[1]), val(args[2]), None, _DT[op.split(".")[-1]])
        else:
            raise NotImplementedError(f"PTX op {op!r} is not emulated")
    return {int(k[1:]): v for k, v in regs.items() if k.startswith("$")}
