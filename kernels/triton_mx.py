"""Microscaled floating-point weights in Triton: MXFP4, NVFP4, mxfp4_dualscale and MXFP8.

Two prepared layouts, each shared by a split-K kernel (small M) and a GEMM (large M):

"triton.fp4.v1" (mxfp4, nvfp4, mxfp4_dualscale)
  qweight  uint8 [N, Kp/2]  E2M1 codes in "split halves" units of 2H elements: byte j of unit u
                            holds element u*2H + j in its low nibble and u*2H + H + j in its high
                            nibble (H = 32, or 16 when K % 64 != 0 or for NVFP4). Each half of a
                            unit then lies in one scale group, and the two decoded halves are two
                            contiguous K slices: no shuffles between decoding and the MMA.
  scales   uint8 [G, N]     the group scales transposed so a tile's scales are one coalesced load:
                            E8M0 bytes relative to the row's largest (srel = s - smax + 253, the
                            bf16 exponent field of the in-loop factor), or E4M3 bytes (NVFP4)
  rexp     int8 [N]         the row's power of two taken out of the scales (smax - 127, or
                            floor(log2 max) for NVFP4), applied in the epilogue; it keeps every
                            in-loop factor in bf16/fp16 range (an E8M0 scale may be 2^127).
                            -128 flags a row holding a NaN scale (its outputs are NaN)
  dual     fp32 [K/512, N]  mxfp4_dualscale's coarse scale, applied per 512-chunk of K to the
                            fp32 partial product (exact: scales multiply partial sums)
"triton.mxfp8.v1" (mxfp8)
  weight   e4m3 [N, K]      the checkpoint tensor itself
  scales   uint8 [G, N]     relative E8M0 bytes transposed;  rexp int8 [N] as above

Weights are decoded in registers. Compiled for NVIDIA, E2M1 nibbles become bf16x2/fp16x2 pairs
with PTX prmt/lop3 (the exponent and mantissa bits of a code drop into the 16-bit float's low
exponent bits, which makes value * 2^-126 (bf16) or value * 2^-14 (fp16), subnormals included)
and one fma applies the group factor. Everywhere else (the interpreter, ROCm, XPU) a portable
decode computes the same values.

kind "gemm" (_mx_gemm_kernel, every format and MXFP8 W8A8 too) issues ONE tensor-core dot per
BLOCK_K tile: the decoded weight tile [BLOCK_N, BLOCK_K] is the A operand (registers; Hopper
wgmma takes it there), the activation tile x^T [BLOCK_K, BLOCK_M] the B operand (staged by
Triton's pipeliner). The group factors fold exactly into the decoded 16-bit values (relative to
the row's 2^rexp, applied in the epilogue), so the fp32 accumulator is never rescaled per group.
The decoded halves of each unit are merged into one tile in a K order (_tile_k) that Triton
lays out without a shuffle; the activation rows are read in that same order. MXFP8 W8A8 runs the
same kernel on the fake-quantized activation (an MX x MX product is exactly a bf16 x bf16 one).
kind "splitk" (_wdq_kernel; MXFP8 W8A8: _mx8_w8a8_kernel, e4m3 dots per 32-element group) is
the small-M path with two dots per unit.

Activation quantization: MXFP8 W8A8 quantizes x in one fused Triton pass (per-32 amax, shared
exponent by the scheme's rule, RNE saturating E4M3 cast), bit-exact with the scheme. The
W4A4/W4A8 modes fake-quantize x with the scheme's own functions and feed the exact values as
bf16 (E2M1/E4M3 times a power of two is exact in bf16); NVFP4's per-tensor input scale and
dualscale's per-512 coarse activation scale go to the epilogue / the per-chunk rescale, so the
dot operands stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.dispatch import Layout
from omniq.errors import KernelError, where
from omniq.kernels._common import (interpreting, launch_grid, layered_config, next_pow2, split_workspace,
                                   tile_counters, tl, triton)

FP4_LAYOUT = "triton.fp4.v1"
MXFP8_LAYOUT = "triton.mxfp8.v1"
FP4_SCHEMES = ("mxfp4", "nvfp4", "mxfp4_dualscale")

# FMT codes shared with the kernel
FMT_MXFP4, FMT_NVFP4, FMT_MXFP8 = 0, 1, 2
# shared-exponent rules of omniq.formats.e8m0, as kernel constants
RULES = {"floor": 0, "ceil": 1, "even": 2, "rceil": 3}


def nvidia_ptx(device: torch.device) -> bool:
    """PTX inline assembly is usable: compiled (not interpreted) for an NVIDIA GPU."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


# --------------------------------------------------------------------------------------------
# Prepared layouts
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class FP4Prepared:
    """The one device copy of an MXFP4 / NVFP4 / dualscale weight for the fp4 kernels."""

    qweight: torch.Tensor               # uint8 [N, Kp/2], split halves
    scales: torch.Tensor                # uint8 [G, N]
    rexp: torch.Tensor                  # int8 [N]
    dual: torch.Tensor | None           # fp32 [K/512, N] (dualscale)
    mul_scale: torch.Tensor | None      # fp32 [K] (dualscale)
    input_scale: torch.Tensor | None    # fp32 [1] (nvfp4 W4A4)
    n: int = 0
    k: int = 0
    h: int = 32
    fmt: int = FMT_MXFP4
    group: int = 32
    gscale: float = 1.0                 # nvfp4 weight_scale_2 (a Python float: no sync per call)
    iscale: float = 1.0                 # nvfp4 input_scale
    scheme: object = None
    name: str | None = None

    @property
    def n_units(self) -> int:
        return self.qweight.shape[1] // self.h


@dataclass(eq=False)
class MXFP8Prepared:
    weight: torch.Tensor                # e4m3 [N, K]
    scales: torch.Tensor                # uint8 [G, N]
    rexp: torch.Tensor                  # int8 [N]
    n: int = 0
    k: int = 0
    scheme: object = None
    name: str | None = None


# E8M0 scales in the prepared layouts: each byte relative to its row's largest (non-NaN) byte,
# srel = s - smax + 253 in [1, 253], i.e. the bf16 exponent field of the in-loop factor
# 2^(s - smax + 126) that multiplies the PTX-placed E2M1 values (value * 2^-126), and the row's
# power of two rexp = smax - 127 for the epilogue. A NaN byte (0xFF) makes its row NaN in the
# reference (x * NaN = NaN for every x), so it becomes rexp = -128, the row's NaN flag.
SREL_TOP = 253
REXP_NAN = -128


def relative_e8m0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E8M0 bytes [N, G] -> (srel uint8 [N, G], rexp int8 [N]) as described above."""
    b = b.to(torch.int32)
    nan = b == 0xFF
    smax = torch.where(nan, torch.zeros_like(b), b).amax(dim=1) if b.shape[1] else \
        torch.full((b.shape[0],), 127, dtype=torch.int32, device=b.device)
    srel = torch.where(nan, torch.ones_like(b), (b - smax[:, None] + SREL_TOP).clamp(1, SREL_TOP))
    rexp = torch.where(nan.any(dim=1) if b.shape[1] else torch.zeros_like(smax, dtype=torch.bool),
                       torch.full_like(smax, REXP_NAN), smax - 127)
    return srel.to(torch.uint8), rexp.to(torch.int8)


def _pad_groups(s: torch.Tensor, groups: int) -> torch.Tensor:
    """Scales [G, N] padded with rows of the smallest factor up to `groups` rows, so that the
    kernels load a whole unit's scales without masks (the padded K holds zero codes)."""
    if s.shape[0] < groups:
        s = torch.cat((s, torch.ones(groups - s.shape[0], s.shape[1], dtype=s.dtype, device=s.device)
                       if s.dtype == torch.uint8 else s.new_zeros(groups - s.shape[0], s.shape[1])))
    return s.contiguous()


def split_halves(codes: torch.Tensor, h: int) -> torch.Tensor:
    """E2M1 codes uint8 [N, K] -> split-halves bytes [N, Kp/2] (Kp = K rounded up to 2h, zero
    codes pad the tail)."""
    n, k = codes.shape
    kp = -(-k // (2 * h)) * (2 * h)
    if kp != k:
        codes = torch.nn.functional.pad(codes, (0, kp - k))
    c = codes.to(torch.uint8).reshape(n, kp // (2 * h), 2, h)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, kp // 2).contiguous()


def unsplit_halves(packed: torch.Tensor, h: int, k: int) -> torch.Tensor:
    """Inverse of split_halves: bytes [N, Kp/2] -> codes uint8 [N, K]."""
    n = packed.shape[0]
    p = packed.reshape(n, -1, h)
    return torch.stack((p & 0xF, p >> 4), dim=2).reshape(n, -1)[:, :k]


def prepare_fp4(qw, device) -> FP4Prepared:
    """Repack an mxfp4 / nvfp4 / mxfp4_dualscale weight into the triton.fp4.v1 layout, once."""
    scheme = qw.scheme
    if scheme.name not in FP4_SCHEMES:
        raise KernelError(f"{where(qw.name)}{scheme.name}: the triton fp4 layout serves {FP4_SCHEMES}")
    n, k = qw.shape
    codes = scheme.unpack(qw)                                    # uint8 [N, K], either storage
    dev = torch.device(device)
    dual = mul = iscale_t = None
    gscale = iscale = 1.0
    if scheme.name == "nvfp4":
        fmt, group, h = FMT_NVFP4, 16, 16
        sc = qw.tensors["weight_scale"]
        amax = sc.float().abs().amax(dim=1) if sc.shape[1] else torch.zeros(n)
        _, e = torch.frexp(torch.where(amax > 0, amax, torch.ones_like(amax)))
        rexp = (e - 1).to(torch.int8)                            # floor(log2(row max scale))
        sbytes = sc.view(torch.uint8)
        gscale = float(qw.tensors["weight_scale_2"].float().reshape(-1)[0])
        if "input_scale" in qw.tensors:
            iscale_t = qw.tensors["input_scale"].float().reshape(1).to(dev)
            iscale = float(iscale_t[0])
    else:
        fmt, group = FMT_MXFP4, 32
        h = 32 if k % 64 == 0 else 16
        sbytes = qw.tensors["weight_scale"]
        sbytes, rexp = relative_e8m0(sbytes if sbytes.dtype == torch.uint8 else sbytes.view(torch.uint8))
        if scheme.name == "mxfp4_dualscale":
            dual = qw.tensors["weight_dual_scale"].float().reshape(n, -1).t().contiguous().to(dev)
            mul = qw.tensors["mul_scale"].float().reshape(k).contiguous().to(dev)
    qweight = split_halves(codes, h)
    return FP4Prepared(
        qweight=qweight.to(dev), scales=_pad_groups(sbytes.t(), qweight.shape[1] * 2 // group).to(dev),
        rexp=rexp.contiguous().to(dev), dual=dual, mul_scale=mul, input_scale=iscale_t,
        n=n, k=k, h=h, fmt=fmt, group=group, gscale=gscale, iscale=iscale, scheme=scheme, name=qw.name)


def prepare_mxfp8(qw, device) -> MXFP8Prepared:
    """The mxfp8 checkpoint weight as is, with its scales transposed (triton.mxfp8.v1)."""
    if qw.scheme.name != "mxfp8":
        raise KernelError(f"{where(qw.name)}{qw.scheme.name}: the triton mxfp8 layout serves mxfp8 only")
    n, k = qw.shape
    dev = torch.device(device)
    b = qw.tensors["weight_scale"]
    srel, rexp = relative_e8m0(b if b.dtype == torch.uint8 else b.view(torch.uint8))
    groups = -(-k // 64) * 2          # the W8A16 kernel walks units of 64 elements
    return MXFP8Prepared(weight=qw.tensors["weight"].contiguous().to(dev), scales=_pad_groups(srel.t(), groups).to(dev),
                         rexp=rexp.contiguous().to(dev), n=n, k=k, scheme=qw.scheme, name=qw.name)


FP4 = Layout(FP4_LAYOUT, prepare_fp4)
MXFP8 = Layout(MXFP8_LAYOUT, prepare_mxfp8)



# PTX of the E2M1 decoders (two split-halves bytes -> one bf16x2/fp16x2 register per half, times
# the group factors). Operands: $0 lo pair, $1 hi pair (outputs), $2 the two bytes (b16), $3/$4
# the lo/hi factor pairs. tests/_fp_ptx_util.py executes these strings on every byte pair.
PTX_FP4_BF16 = """{
.reg .b32 c, cm, nz, t, u, v, w;
mov.b32 c, 0x81C081C0;
mov.b32 cm, 0x01C001C0;
mov.b32 nz, 0x80008000;
cvt.u32.u16 t, $2;
prmt.b32 t, t, 0, 0x1404;
shr.b32 u, t, 6;
and.b32 u, u, cm;
lop3.b32 $1, t, nz, u, 0xEA;
shr.b32 v, t, 2;
shl.b32 w, t, 4;
lop3.b32 $0, v, w, c, 0xA8;
fma.rn.bf16x2 $0, $0, $3, nz;
fma.rn.bf16x2 $1, $1, $4, nz;
}"""
PTX_FP4_F16 = """{
.reg .b32 cm, cs, t, u, v, w;
mov.b32 cm, 0x0E000E00;
mov.b32 cs, 0x80008000;
cvt.u32.u16 t, $2;
prmt.b32 t, t, 0, 0x1404;
shr.b32 u, t, 3;
and.b32 u, u, cm;
lop3.b32 $1, t, cs, u, 0xEA;
shl.b32 v, t, 1;
and.b32 v, v, cm;
shl.b32 w, t, 4;
lop3.b32 $0, w, cs, v, 0xEA;
fma.rn.f16x2 $0, $0, $3, cs;
fma.rn.f16x2 $1, $1, $4, cs;
}"""

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    _SREL = tl.constexpr(SREL_TOP)
    _RNAN = tl.constexpr(REXP_NAN)
    _PTX_FP4_BF16 = tl.constexpr(PTX_FP4_BF16)
    _PTX_FP4_F16 = tl.constexpr(PTX_FP4_F16)

    @triton.jit
    def _pow2(e):
        """2^e in fp32 for int32 e in [-126, 127], from its bits."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _exp2i(e):
        """2^e in fp32 for any int32 e in [-200, 200] (two normal halves; the product rounds
        into the subnormal range or to 0/inf as fp32 does)."""
        a = e >> 1
        return _pow2(a) * _pow2(e - a)

    @triton.jit
    def _e2m1_f32(c):
        """E2M1 codes (int32 0..15) -> fp32 values (portable decode)."""
        mag = c & 7
        e = mag >> 1
        m = mag & 1
        normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)
        v = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
        return tl.where((c & 8) != 0, -v, v)

    @triton.jit
    def _group_factor(s_rows, g, N, rexp, FMT: tl.constexpr, ASM: tl.constexpr):
        """Factor [BN] of group g (s_rows = scales + rows), see _scale_factor. Scales are padded
        to whole units: no mask."""
        return _scale_factor(tl.load(s_rows + g * N), rexp, FMT, ASM)

    @triton.jit
    def _scale_factor(sb, rexp, FMT: tl.constexpr, ASM: tl.constexpr):
        """Prepared scale bytes -> factors: the group scale / 2^rexp, times 2^126 (ASM 1, bf16
        result) or 2^14 (ASM 2, fp16 result) for the PTX placement, fp32 otherwise."""
        if FMT == 1:  # NVFP4: E4M3 block scale / 2^rexp, exact in fp32
            f = sb.to(tl.float8e4nv, bitcast=True).to(tl.float32) * _pow2(-rexp)
            if ASM == 1:
                f = (f * 8.507059173023462e+37).to(tl.bfloat16)     # * 2^126
            elif ASM == 2:
                f = (f * 16384.0).to(tl.float16)                    # * 2^14
        else:         # relative E8M0 byte: the bf16 exponent field of 2^(s - smax + 126)
            si = sb.to(tl.int32)
            if ASM == 1:
                f = (si << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
            elif ASM == 2:
                f = (tl.minimum(tl.maximum(si - (_SREL - 29), 0), 30) << 10).to(tl.int16).to(
                    tl.float16, bitcast=True)
            else:
                f = (tl.maximum(si - (_SREL - 127), 0) << 23).to(tl.float32, bitcast=True)
        return f

    @triton.jit
    def _row_factor(rexp):
        """2^rexp per row for the epilogue, NaN for a row flagged -128."""
        return tl.where(rexp == _RNAN, float("nan"), _exp2i(rexp))

    @triton.jit
    def _fp4_ptx(packed, flo, fhi, BF16: tl.constexpr):
        """Split-halves bytes [BN, H] and per-element factors -> (lo, hi) values [BN, H] with
        PTX, two bytes (two consecutive K of each half: one bf16x2/fp16x2 MMA register) per
        call: t = [0, b0, 0, b1]; the high nibbles sit at bits 15..12 of each 16-bit half (sign
        in place, magnitude >> 6 for bf16 / >> 3 for fp16, masked: the low nibble shares the
        byte), the low nibbles at 11..8 (sign << 4, magnitude >> 2 / << 1).
        Checked bit-exactly for all 65536 byte pairs by a PTX emulation (see the report)."""
        if BF16:
            lo, hi = tl.inline_asm_elementwise(
                asm=_PTX_FP4_BF16,
                constraints="=r,=r,h,r,r",
                args=[packed, flo, fhi], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            lo, hi = tl.inline_asm_elementwise(
                asm=_PTX_FP4_F16,
                constraints="=r,=r,h,r,r",
                args=[packed, flo, fhi], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
        return lo, hi

    @triton.jit
    def _fp4_halves(packed, flo, fhi, ASM: tl.constexpr, OUT: tl.constexpr):
        """Split-halves bytes (any shape) and the factors of their low / high halves (broadcast
        to that shape) -> (low-nibble values, high-nibble values) in OUT: PTX with ASM (factors
        as _group_factor made them for it), else the portable decode rounded once from fp32."""
        if ASM != 0:
            lo, hi = _fp4_ptx(packed, tl.broadcast_to(flo, packed.shape), tl.broadcast_to(fhi, packed.shape),
                              ASM == 1)
        else:
            p = packed.to(tl.int32)
            lo = (_e2m1_f32(p & 15) * flo).to(OUT)
            hi = (_e2m1_f32(p >> 4) * fhi).to(OUT)
        return lo, hi

    @triton.jit
    def _e4m3_scaled(wbytes, f, OUT: tl.constexpr):
        """E4M3 bytes times fp32 factors, rounded once into OUT (exact for the in-loop factors)."""
        return (wbytes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * f).to(OUT)

    @triton.jit
    def _merge_halves(lo, hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ORDER: tl.constexpr):
        """The decoded halves [BN, NU, H] of NU units -> one [BN, BK = NU * 2H] tile for one
        tl.dot, in the column order _tile_k names (the activation rows are read in that order)."""
        w = tl.join(lo, hi)                          # [BN, NU, H, 2]
        if ORDER == 0:
            w = tl.permute(w, (0, 1, 3, 2))          # [BN, NU, 2, H]: K order
        elif ORDER == 1:
            w = tl.permute(w, (0, 3, 1, 2))          # [BN, 2, NU, H]: low halves, then high halves
        return tl.reshape(w, (BLOCK_N, BLOCK_K))     # ORDER 2: [BN, NU, H, 2], halves interleaved

    @triton.jit
    def _tile_k(BLOCK_K: tl.constexpr, H: tl.constexpr, ORDER: tl.constexpr):
        """k within the tile of each column of _merge_halves(ORDER) (a dot ignores K's order):
        0 -> k = c; 1 -> runs of H, the low halves of the units first; 2 -> k, k + H alternating."""
        c = tl.arange(0, BLOCK_K)
        if ORDER == 0:
            k = c
        elif ORDER == 1:
            # c = t * BK/2 + u * H + j -> k = u * 2H + t * H + j, written as c plus a term constant
            # over each run of H so that Triton's axis analysis sees runs of H contiguous k
            # (vector loads the pipeliner can stage)
            k = c + ((c // H) % (BLOCK_K // (2 * H))) * H + (c // (BLOCK_K // 2)) * (H - BLOCK_K // 2)
        else:
            r = c % (2 * H)
            k = (c // (2 * H)) * (2 * H) + (r % 2) * H + r // 2
        return k

    @triton.jit
    def _scale_tile(s_rows, kt, N, n_groups, H: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """The prepared scale bytes [BN, NU, 2] of K tile kt: the groups of each unit's low and
        high half. Indices clamped to the stored groups (past the end of K the codes are zero,
        any finite factor will do). Loaded one tile ahead of their use: these byte loads are too
        narrow for the pipeliner's async copies."""
        u = kt * (BLOCK_K // (2 * H)) + tl.arange(0, BLOCK_K // (2 * H))
        g = u[:, None] * ((2 * H) // GROUP) + tl.arange(0, 2)[None, :] * (H // GROUP)
        return tl.load(s_rows[:, None, None] + tl.minimum(g, n_groups - 1)[None, :, :] * N)

    @triton.jit
    def _weight_tile(w_ptr, sb, rn, rexp, kt, KW, stride_w,
                     FMT: tl.constexpr, H: tl.constexpr, EVEN_K: tl.constexpr,
                     DOT: tl.constexpr, ASM: tl.constexpr, ORDER: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """K tile kt of the weight decoded in registers: [BLOCK_N, BLOCK_K] in DOT, the group
        factors (scale bytes sb from _scale_tile) folded in exactly, relative to the row's
        2^rexp; columns in _tile_k's order. Both formats walk units of 2H elements in two halves
        of H (fp4: the split-halves bytes; MXFP8: two 32-element groups), so one merge of the
        halves serves both. KW: the stored row length (bytes for fp4, elements for MXFP8);
        without EVEN_K the tail is masked to zero codes."""
        NU: tl.constexpr = BLOCK_K // (2 * H)
        f_lo, f_hi = tl.split(_scale_factor(sb, rexp[:, None, None], FMT, ASM))
        if FMT == 2:   # MXFP8: e4m3 bytes in K order
            col = (kt * NU + tl.arange(0, NU))[:, None] * (2 * H) + tl.arange(0, H)[None, :]
            ptrs = w_ptr + rn[:, None, None] * stride_w + col[None, :, :]
            if EVEN_K:
                b_lo = tl.load(ptrs)
                b_hi = tl.load(ptrs + H)
            else:
                b_lo = tl.load(ptrs, mask=col[None, :, :] < KW, other=0)
                b_hi = tl.load(ptrs + H, mask=col[None, :, :] + H < KW, other=0)
            lo = _e4m3_scaled(b_lo, f_lo[:, :, None], DOT)
            hi = _e4m3_scaled(b_hi, f_hi[:, :, None], DOT)
        else:          # E2M1 split halves: H bytes a unit
            col = (kt * NU + tl.arange(0, NU))[:, None] * H + tl.arange(0, H)[None, :]
            ptrs = w_ptr + rn[:, None, None] * stride_w + col[None, :, :]
            if EVEN_K:
                packed = tl.load(ptrs)
            else:
                packed = tl.load(ptrs, mask=col[None, :, :] < KW, other=0)
            lo, hi = _fp4_halves(packed, f_lo[:, :, None], f_hi[:, :, None], ASM, DOT)
        return _merge_halves(lo, hi, BLOCK_N, BLOCK_K, ORDER)

    @triton.jit
    def _tile_dot(acc, x_ptr, w_ptr, sb, rn, rm, rexp, kt, kord, K, KW, stride_xm, stride_w,
                  FMT: tl.constexpr, H: tl.constexpr, EVEN_K: tl.constexpr,
                  DOT: tl.constexpr, ASM: tl.constexpr, ORDER: tl.constexpr, UPCAST: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += W_tile(kt) @ x^T_tile(kt): the weight decoded in registers (the MMA's A
        operand), the activation rows read in the decoded columns' K order."""
        w = _weight_tile(w_ptr, sb, rn, rexp, kt, KW, stride_w, FMT, H, EVEN_K, DOT, ASM, ORDER, BLOCK_N, BLOCK_K)
        k = kt * BLOCK_K + kord
        if EVEN_K:
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + k[:, None])
        else:
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + k[:, None], mask=k[:, None] < K, other=0.0)
        return _mma(acc, w, xt.to(DOT), UPCAST, IEEE)

    @triton.jit
    def _mma(acc, w, xt, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc += w @ xt; the interpreter's bf16 dot is wrong, so it gets fp32 operands."""
        if UPCAST:
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        if IEEE or UPCAST:
            return tl.dot(w, xt, acc, input_precision="ieee")
        return tl.dot(w, xt, acc)

    @triton.jit
    def _tile_ids(N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr):
        """(pid_n, pid_m) in grouped order: GROUP_N weight tiles share an x tile in L2."""
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BLOCK_N)
        grid_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_N * grid_m
        first_n = (pid // width) * GROUP_N
        gsize = tl.minimum(grid_n - first_n, GROUP_N)
        pid_n = first_n + (pid % width) % gsize
        pid_m = (pid % width) // gsize
        return pid_n, pid_m

    @triton.jit
    def _epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym, tile, n_tiles,
                  pid_k, SPLIT_K, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """y[m, n] = acc[n, m] (+ bias[n]). With split-K each CTA parks its partial; the last to
        arrive (atomic counter, reset afterwards) sums them in split order and writes y."""
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
            tl.store(ws_ptr + (pid_k * n_tiles + tile) * (BLOCK_N * BLOCK_M) + local, acc)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s in range(SPLIT_K):
                    total += tl.load(ws_ptr + (s * n_tiles + tile) * (BLOCK_N * BLOCK_M) + local,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total = total + tl.load(bias_ptr + offs_n, mask=offs_n < N,
                                            other=0.0).to(tl.float32)[:, None]
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _wdq_kernel(x_ptr, w_ptr, s_ptr, rexp_ptr, dual_ptr, xd_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                    M, N, K, n_units, n_groups, stride_xm, stride_ym, stride_w, n_chunks, gscale,
                    FMT: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr, UNITS: tl.constexpr,
                    DUAL: tl.constexpr, XDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                    DOT: tl.constexpr, ASM: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K,
                    GROUP_N: tl.constexpr):
        """acc[n, m] = sum_k W[n, k] x[m, k] for a weight decoded in registers (swap-AB: the
        weight is the MMA's A operand). A unit is 2H elements of K: two halves of H, each
        inside one scale group. One loop iteration covers UNITS units (one 512-chunk for
        dualscale, whose coarse scales multiply the chunk's partial product)."""
        pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)   # clamped rows and columns: loads need no N/M masks
        rm = tl.minimum(offs_m, M - 1)
        rexp = tl.load(rexp_ptr + rn).to(tl.int32)
        s_rows = s_ptr + rn
        jh = tl.arange(0, H)

        n_iters = n_units // UNITS
        per = tl.cdiv(n_iters, SPLIT_K)
        i0 = pid_k * per
        i1 = tl.minimum(i0 + per, n_iters)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for it in range(i0, i1):
            if DUAL:
                part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            else:
                part = acc
            for uu in tl.static_range(UNITS):
                u = it * UNITS + uu
                k_lo = u * (2 * H) + jh
                k_hi = k_lo + H
                # groups per unit: 2H / GROUP (1 or 2); the high half starts H / GROUP after
                f_lo = _group_factor(s_rows, u * ((2 * H) // GROUP), N, rexp, FMT, ASM)
                f_hi = _group_factor(s_rows, u * ((2 * H) // GROUP) + H // GROUP, N, rexp, FMT, ASM)
                if FMT == 2:   # MXFP8 W8A16: e4m3 bytes of the checkpoint, K may be ragged
                    w_lo = _e4m3_scaled(tl.load(w_ptr + rn[:, None] * stride_w + k_lo[None, :],
                                                mask=k_lo[None, :] < K, other=0), f_lo[:, None], DOT)
                    w_hi = _e4m3_scaled(tl.load(w_ptr + rn[:, None] * stride_w + k_hi[None, :],
                                                mask=k_hi[None, :] < K, other=0), f_hi[:, None], DOT)
                else:
                    packed = tl.load(w_ptr + rn[:, None] * stride_w + (u * H + jh)[None, :])
                    w_lo, w_hi = _fp4_halves(packed, f_lo[:, None], f_hi[:, None], ASM, DOT)
                if EVEN_K:   # K is a whole number of units: no mask
                    x_lo = tl.load(x_ptr + rm[None, :] * stride_xm + k_lo[:, None])
                    x_hi = tl.load(x_ptr + rm[None, :] * stride_xm + k_hi[:, None])
                else:
                    x_lo = tl.load(x_ptr + rm[None, :] * stride_xm + k_lo[:, None], mask=k_lo[:, None] < K, other=0.0)
                    x_hi = tl.load(x_ptr + rm[None, :] * stride_xm + k_hi[:, None], mask=k_hi[:, None] < K, other=0.0)
                part = _mma(part, w_lo, x_lo.to(DOT), UPCAST, IEEE)
                part = _mma(part, w_hi, x_hi.to(DOT), UPCAST, IEEE)
            if DUAL:
                part = part * tl.load(dual_ptr + it * N + rn)[:, None]
                if XDUAL:
                    part = part * tl.load(xd_ptr + rm * n_chunks + it)[None, :]
                acc += part
            else:
                acc = part

        acc = acc * (_row_factor(rexp) * gscale)[:, None]
        _epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                  pid_n * tl.cdiv(M, BLOCK_M) + pid_m, tl.cdiv(N, BLOCK_N) * tl.cdiv(M, BLOCK_M), pid_k,
                  SPLIT_K, HAS_BIAS, BLOCK_N, BLOCK_M)

    @triton.jit
    def _mx_gemm_kernel(x_ptr, w_ptr, s_ptr, rexp_ptr, dual_ptr, xd_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                        M, N, K, KW, n_groups, stride_xm, stride_ym, stride_w, n_chunks, gscale,
                        FMT: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr,
                        DUAL: tl.constexpr, XDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                        DOT: tl.constexpr, ASM: tl.constexpr, ORDER: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
                        GROUP_N: tl.constexpr):
        """acc[n, m] = sum_k W[n, k] x[m, k], ONE tensor-core dot per BLOCK_K tile: the weight
        tile decoded in registers with its group factors folded in exactly (A operand), the
        activation tile x^T read in the same K order (B operand, staged by the pipeliner), no
        per-group rescale of the fp32 accumulator; the row's 2^rexp in the epilogue.
        Dualscale: the coarse scales multiply each 512-chunk's partial product (inner loop)."""
        pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)   # clamped rows and columns: loads need no N/M masks
        rm = tl.minimum(offs_m, M - 1)
        rexp = tl.load(rexp_ptr + rn).to(tl.int32)
        s_rows = s_ptr + rn
        kord = _tile_k(BLOCK_K, H, ORDER)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if DUAL:
            TPC: tl.constexpr = 512 // BLOCK_K   # K tiles per coarse chunk
            per = tl.cdiv(n_chunks, SPLIT_K)
            c0 = pid_k * per
            c1 = tl.minimum(c0 + per, n_chunks)
            last = tl.maximum(c1 * TPC - 1, 0)
            sb = _scale_tile(s_rows, c0 * TPC, N, n_groups, H, GROUP, BLOCK_K)
            for c in range(c0, c1):
                part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for t in range(0, TPC):
                    kt = c * TPC + t
                    sb_next = _scale_tile(s_rows, tl.minimum(kt + 1, last), N, n_groups, H, GROUP, BLOCK_K)
                    part = _tile_dot(part, x_ptr, w_ptr, sb, rn, rm, rexp, kt, kord, K, KW, stride_xm, stride_w,
                                     FMT, H, EVEN_K, DOT, ASM, ORDER, UPCAST, IEEE, BLOCK_N, BLOCK_K)
                    sb = sb_next
                part = part * tl.load(dual_ptr + c * N + rn)[:, None]
                if XDUAL:
                    part = part * tl.load(xd_ptr + rm * n_chunks + c)[None, :]
                acc += part
        else:
            n_kt = tl.cdiv(K, BLOCK_K)
            per = tl.cdiv(n_kt, SPLIT_K)
            k0 = pid_k * per
            k1 = tl.minimum(k0 + per, n_kt)
            last = tl.maximum(k1 - 1, 0)
            sb = _scale_tile(s_rows, k0, N, n_groups, H, GROUP, BLOCK_K)
            for kt in range(k0, k1):
                sb_next = _scale_tile(s_rows, tl.minimum(kt + 1, last), N, n_groups, H, GROUP, BLOCK_K)
                acc = _tile_dot(acc, x_ptr, w_ptr, sb, rn, rm, rexp, kt, kord, K, KW, stride_xm, stride_w,
                                FMT, H, EVEN_K, DOT, ASM, ORDER, UPCAST, IEEE, BLOCK_N, BLOCK_K)
                sb = sb_next
        acc = acc * (_row_factor(rexp) * gscale)[:, None]
        _epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                  pid_n * tl.cdiv(M, BLOCK_M) + pid_m, tl.cdiv(N, BLOCK_N) * tl.cdiv(M, BLOCK_M), pid_k,
                  SPLIT_K, HAS_BIAS, BLOCK_N, BLOCK_M)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, rexp_ptr, dual_ptr, out_ptr, N, K, n_units, stride_w, ldo, gscale,
                        FMT: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr, DUAL: tl.constexpr,
                        BLOCK_N: tl.constexpr, UNITS: tl.constexpr):
        """out[n, k] = W[n, k] (with the row factor and, for dualscale, the coarse scale), one
        pass over the weight: the first half of the dequantize-then-cuBLAS kernels."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = tl.minimum(offs_n, N - 1)
        rexp = tl.load(rexp_ptr + rn).to(tl.int32)
        rowf = _row_factor(rexp) * gscale
        s_rows = s_ptr + rn
        jh = tl.arange(0, H)
        for uu in tl.static_range(UNITS):
            u = tl.program_id(1) * UNITS + uu
            k_lo = u * (2 * H) + jh
            k_hi = k_lo + H
            f_lo = _group_factor(s_rows, u * ((2 * H) // GROUP), N, rexp, FMT, 0) * rowf
            f_hi = _group_factor(s_rows, u * ((2 * H) // GROUP) + H // GROUP, N, rexp, FMT, 0) * rowf
            if DUAL:
                d = tl.load(dual_ptr + ((u * 2 * H) // 512) * N + rn)
                f_lo = f_lo * d
                f_hi = f_hi * d
            dt = out_ptr.dtype.element_ty
            if FMT == 2:
                v_lo = _e4m3_scaled(tl.load(w_ptr + rn[:, None] * stride_w + k_lo[None, :], mask=k_lo[None, :] < K,
                                            other=0), f_lo[:, None], dt)
                v_hi = _e4m3_scaled(tl.load(w_ptr + rn[:, None] * stride_w + k_hi[None, :], mask=k_hi[None, :] < K,
                                            other=0), f_hi[:, None], dt)
            else:
                v_lo, v_hi = _fp4_halves(tl.load(w_ptr + rn[:, None] * stride_w + (u * H + jh)[None, :]),
                                         f_lo[:, None], f_hi[:, None], 0, dt)
            nm = (offs_n < N)[:, None]
            tl.store(out_ptr + offs_n[:, None] * ldo + k_lo[None, :], v_lo, mask=nm & (k_lo[None, :] < K))
            tl.store(out_ptr + offs_n[:, None] * ldo + k_hi[None, :], v_hi, mask=nm & (k_hi[None, :] < K))

    @triton.jit
    def _mx8_w8a8_kernel(xq_ptr, xs_ptr, w_ptr, s_ptr, rexp_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                         M, N, K, G, stride_xm, stride_xs, stride_ym, stride_w,
                         GPI: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K,
                         GROUP_N: tl.constexpr):
        """MXFP8 W8A8: per 32-element group g, acc[n, m] += (W_g . x_g) * 2^(sw[n,g]-127-rexp[n])
        * 2^(sx[m,g]-127), the group dot on e4m3 tensor cores in fp32. GPI groups per iteration."""
        pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.minimum(offs_n, N - 1)
        rm = tl.minimum(offs_m, M - 1)
        rexp = tl.load(rexp_ptr + rn).to(tl.int32)
        j = tl.arange(0, 32)
        n_iters = tl.cdiv(G, GPI)
        per = tl.cdiv(n_iters, SPLIT_K)
        i0 = pid_k * per
        i1 = tl.minimum(i0 + per, n_iters)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for it in range(i0, i1):
            for gg in tl.static_range(GPI):
                g = it * GPI + gg
                k = g * 32 + j
                kok = k < K
                w = tl.load(w_ptr + rn[:, None] * stride_w + k[None, :], mask=kok[None, :], other=0)
                xt = tl.load(xq_ptr + rm[None, :] * stride_xm + k[:, None], mask=kok[:, None], other=0)
                part = tl.dot(w.to(tl.float8e4nv, bitcast=True), xt.to(tl.float8e4nv, bitcast=True))
                sw = tl.load(s_ptr + g * N + rn, mask=(rn * 0 + g) < G, other=_SREL).to(tl.int32)
                sx = tl.load(xs_ptr + rm * stride_xs + g, mask=(rm * 0 + g) < G, other=127).to(tl.int32)
                fw = (tl.maximum(sw - (_SREL - 127), 0) << 23).to(tl.float32, bitcast=True)   # 2^(s - smax)
                fx = _exp2i(sx - 127)
                fx = tl.where(sx == 255, float("nan"), fx)
                acc += part * fw[:, None] * fx[None, :]
        acc = acc * _row_factor(rexp)[:, None]
        _epilogue(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_n, offs_m, N, M, stride_ym,
                  pid_n * tl.cdiv(M, BLOCK_M) + pid_m, tl.cdiv(N, BLOCK_N) * tl.cdiv(M, BLOCK_M), pid_k,
                  SPLIT_K, HAS_BIAS, BLOCK_N, BLOCK_M)

    @triton.jit
    def _shared_exp(amax, RULE: tl.constexpr):
        """omniq.formats.e8m0.shared_exponent(amax, 8, 448, 3, rule) for E4M3 elements, int32.
        Subnormal inputs are scaled by 2^64 first so one exponent-field formula serves all."""
        if RULE == 3:  # rceil: ceil(log2(amax / 448)), the quotient correctly rounded
            r = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
        else:
            r = amax
        sub = r < 1.1754943508222875e-38
        rs = tl.where(sub, r * 18446744073709551616.0, r)
        bits = rs.to(tl.int32, bitcast=True)
        ef = ((bits >> 23) & 0xFF) - tl.where(sub, 64, 0)
        man = bits & 0x7FFFFF
        if RULE == 0:
            e = ef - 127 - 8
        elif RULE == 1:
            e = ef - 127 + (man != 0).to(tl.int32) - 8
        elif RULE == 2:
            e = ef - 127 + (man >= 0x780000).to(tl.int32) - 8
        else:
            e = ef - 127 + (man != 0).to(tl.int32)
        e = tl.maximum(e, -127)
        e = tl.where(r == 0, -127, e)
        # NaN / Inf amax: exponent 128, which encodes as the NaN byte
        return tl.where(amax == amax, tl.where(amax < float("inf"), e, 128), 128)

    @triton.jit
    def _round_e4m3(v):
        """v (fp32, |v| <= 448) rounded to nearest-even on the E4M3 grid, as fp32. Done on the
        bits so the final cast is exact: Triton's interpreter does not carry a mantissa
        round-up into the exponent (31.65 -> 16), the hardware cast does."""
        a = tl.abs(v)
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125   # multiples of 2^-9
        r = tl.where(a < 0.015625, sub, normal)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _mx8_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, G, stride_xm, stride_qm, stride_sm,
                          RULE: tl.constexpr, BLOCK_G: tl.constexpr, FAKE: tl.constexpr):
        """x [M, K] -> e4m3 codes [M, K] and E8M0 bytes [M, G], per 32 along K, in one pass; with
        FAKE, the fake-quantized values P * 2^E instead (exact in bf16) into q_ptr."""
        m = tl.program_id(0)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        k = g[:, None] * 32 + tl.arange(0, 32)[None, :]
        kok = k < K
        x = tl.load(x_ptr + m * stride_xm + k, mask=kok, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        # max() may drop NaN on GPUs; a block holding NaN gets the NaN scale, as the scheme's amax
        amax = tl.where(tl.sum((x != x).to(tl.int32), axis=1) > 0, float("nan"), amax)
        e = _shared_exp(amax, RULE)
        ec = tl.minimum(e, 126)
        v = x * _exp2i(-ec)[:, None]            # a power of two: exact, as the scheme's ldexp
        v = _round_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0))
        if FAKE:
            fq = v * _exp2i(ec)[:, None]
            fq = tl.where((e > 127)[:, None], float("nan"), fq)
            tl.store(q_ptr + m * stride_qm + k, fq.to(q_ptr.dtype.element_ty), mask=kok)
        else:
            q = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            b = tl.where(e > 127, 255, e + 127)
            tl.store(q_ptr + m * stride_qm + k, q, mask=kok)
            tl.store(s_ptr + m * stride_sm + g, b.to(tl.uint8), mask=g < G)


# --------------------------------------------------------------------------------------------
# Host side: configurations and launches
# --------------------------------------------------------------------------------------------


SPLITK_MAX_M = 64

# Default configurations per kernel kind and M bucket; TUNED[(kind, fmt, n, k, m_bucket)]
# overrides them. Split-K: the H200 sweep of benchmarks/probe_fp.py --sweep (4 CTAs per SM beat 2
# by 1.15-1.3x at M <= 16; W8A8 split-K: 8 groups per iteration, 3 stages, 1.26x).
# "gemm" (_mx_gemm_kernel, every format, W8A8 MXFP8 included): one dot per BLOCK_K tile; for
# small M the tile row is split along K ("waves" CTAs per SM) to fill the GPU. ORDER: the K order
# of the decoded fp4 tile (_tile_k). Starting points for benchmarks/probe_mx_gemm.py to confirm.
DEFAULTS = {
    "splitk": {"BLOCK_N": 64, "BLOCK_M": 16, "UNITS": 4, "num_warps": 4, "num_stages": 4, "waves": 4.0},
    "gemm": {"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_K": 64, "ORDER": 1, "num_warps": 8, "num_stages": 4,
             "GROUP_N": 8},
    "w8a8_splitk": {"BLOCK_N": 64, "BLOCK_M": 16, "GPI": 8, "num_warps": 4, "num_stages": 3, "waves": 2.0},
}
# H200 sweep (results/h200-2026-11-29b/probe_mx_gemm.txt): BK 128 / 4 stages best in 4 of 5 M=64
# cells; BK 64 / 4 stages best at M=512 on 8192x8192 and 12288x3072
_SMALL_GEMM = {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "waves": 2.0, "GROUP_N": 1}
BY_M = {
    ("splitk", 32): {"BLOCK_M": 32}, ("splitk", 64): {"BLOCK_M": 64},
    ("w8a8_splitk", 32): {"BLOCK_M": 32}, ("w8a8_splitk", 64): {"BLOCK_M": 64},
    **{("gemm", mb): dict(_SMALL_GEMM, BLOCK_M=max(16, mb)) for mb in (1, 2, 4, 8, 16, 32, 64)},
    ("gemm", 128): {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4},
    ("gemm", 256): {"BLOCK_M": 128, "num_stages": 4},
}
TUNED: dict = {}


def config_for(kind: str, fmt: int, m: int, n: int, k: int) -> dict:
    return layered_config(DEFAULTS, BY_M, TUNED, kind, m, (kind, fmt, n, k))


def dot_dtype(dtype: torch.dtype):
    """(Triton dot dtype, upcast under the interpreter, IEEE fp32) for operands in `dtype`."""
    if dtype == torch.float32:
        return tl.float32, False, True
    if dtype == torch.bfloat16:
        return tl.bfloat16, interpreting(), False
    return tl.float16, False, False


def _launch_grid(kind, m, n, iters, device, cfg):
    """(BLOCK_N, BLOCK_M, tiles, split); only the split-K kinds split K unless cfg says so."""
    return launch_grid(cfg, n, m, iters, device, splitk=kind.endswith("splitk"), cap=32)


def _workspace(split, tiles, bn, bm, device, dummy=None):
    return split_workspace(split, tiles, bn, bm, device, tile_counters, dummy)


def _fp4_activation(x: torch.Tensor, p: FP4Prepared):
    """(x operand [M, K], its torch dtype, coarse activation scales [M, K/512] or None, extra
    epilogue factor) as the scheme's activation quantizer defines them."""
    from omniq.schemes.base import QuantizedWeight
    from omniq.schemes.mx import MX_ELEMENTS, dual_level_quantize, expand_blocks, mx_fake_quantize
    from omniq.formats.e8m0 import decode_e8m0
    s = p.scheme
    act = getattr(s, "activation", None)
    if s.name == "mxfp4_dualscale":
        xs = x.float() * p.mul_scale
        if act is None:
            dt = x.dtype
            return xs.to(dt), dt, None, 1.0
        q, fine, coarse = dual_level_quantize(xs, s.act_rounding)
        xq = q * expand_blocks(decode_e8m0(fine), 32, x.shape[-1])  # exact in bf16
        return xq.to(torch.bfloat16), torch.bfloat16, coarse.contiguous(), 1.0
    if act is None:
        return x, x.dtype, None, 1.0
    if s.name == "nvfp4":
        shim = QuantizedWeight(s, (p.n, p.k), {"input_scale": p.input_scale}, validate=False)
        xq = s.quantize_activation(x.float(), shim) * (1.0 / p.iscale)  # q * block scale, exact in bf16
        return xq.to(torch.bfloat16), torch.bfloat16, None, p.iscale
    xq = mx_fake_quantize(x.float(), MX_ELEMENTS[act], s.scale_rule, s.act_rounding)
    return xq.to(torch.bfloat16), torch.bfloat16, None, 1.0


def run_fp4(x: torch.Tensor, p: FP4Prepared, bias: torch.Tensor | None, kind: str = "gemm",
            cfg: dict | None = None, asm: bool | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T (+ bias) for a triton.fp4.v1 weight; kind "splitk" or "gemm"."""
    m = x.shape[0]
    xk, xdt, xd, efac = _fp4_activation(x, p)
    if xk.stride(-1) != 1:
        xk = xk.contiguous()
    cfg = dict(cfg or config_for(kind, p.fmt, m, p.n, p.k))
    dot, upcast, ieee = dot_dtype(xdt)
    use_asm = nvidia_ptx(x.device) and not ieee and (asm if asm is not None else cfg.get("ASM", True))
    asm_mode = (1 if xdt == torch.bfloat16 else 2) if use_asm else 0
    dual = p.dual is not None
    y = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    if kind == "gemm":
        return _launch_gemm(xk, p.qweight, p.scales, p.rexp, p.dual, xd, bias, y, p.qweight.shape[1],
                            float(p.gscale * efac), p.fmt, p.h, p.group, dot, upcast, ieee, asm_mode, cfg)
    units = cfg["UNITS"]
    if dual:
        units = 512 // (2 * p.h)       # one iteration = one coarse chunk
        # a 512-wide K step per stage: 3 stages of 128-row tiles asked for 304 KB of shared
        # memory on an H200 (232 KB there); keep the pipeline within it
        cfg["num_stages"] = min(cfg["num_stages"], 2)
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 64)
    else:
        units = max(1, min(units, p.n_units))
        while p.n_units % units:
            units //= 2
    iters = p.n_units // units
    bn, bm, tiles, split = _launch_grid(kind, m, p.n, iters, x.device, cfg)
    ws, cnt = _workspace(split, tiles, bn, bm, x.device)
    dummy = p.rexp
    _wdq_kernel[(tiles, split)](
        xk, p.qweight, p.scales, p.rexp, p.dual if dual else dummy, xd if xd is not None else dummy,
        bias if bias is not None else dummy, y, ws, cnt,
        m, p.n, p.k, p.n_units, p.scales.shape[0], xk.stride(0), y.stride(0), p.qweight.stride(0),
        p.k // 512 if dual else 1, float(p.gscale * efac),
        FMT=p.fmt, H=p.h, GROUP=p.group, UNITS=units, DUAL=dual, XDUAL=xd is not None,
        HAS_BIAS=bias is not None, EVEN_K=p.n_units * 2 * p.h == p.k, DOT=dot, ASM=asm_mode,
        UPCAST=upcast, IEEE=ieee, BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=split, GROUP_N=cfg.get("GROUP_N", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def _launch_gemm(x, w, scales, rexp, dual, xd, bias, y, kw, gscale, fmt, h, group, dot, upcast, ieee, asm_mode,
                 cfg) -> torch.Tensor:
    """One launch of _mx_gemm_kernel: y = x @ W^T (+ bias) for a weight stored as `w` (fp4 split
    halves, kw bytes a row, or MXFP8 e4m3, kw = K) with relative scales [G, N] and rexp [N]."""
    m, k = x.shape
    n = y.shape[1]
    step = 2 * h                                      # one unit (two halves): the smallest tile
    bk = max(step, min(next_pow2(cfg.get("BLOCK_K", 128)), next_pow2(k)))
    if dual is not None:
        bk = min(bk, 512)                             # a coarse chunk holds whole tiles
        iters = k // 512
    else:
        iters = -(-k // bk)
    bn, bm, tiles, split = launch_grid(cfg, n, m, iters, x.device, splitk="waves" in cfg, cap=32)
    ws, cnt = _workspace(split, tiles, bn, bm, x.device)
    dummy = rexp
    _mx_gemm_kernel[(tiles, split)](
        x, w, scales, rexp, dual if dual is not None else dummy, xd if xd is not None else dummy,
        bias if bias is not None else dummy, y, ws, cnt,
        m, n, k, kw, scales.shape[0], x.stride(0), y.stride(0), w.stride(0), k // 512 if dual is not None else 1,
        gscale, FMT=fmt, H=h, GROUP=group, DUAL=dual is not None, XDUAL=xd is not None,
        HAS_BIAS=bias is not None, EVEN_K=k % bk == 0, DOT=dot, ASM=asm_mode,
        ORDER=cfg.get("ORDER", 1), UPCAST=upcast, IEEE=ieee,
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split, GROUP_N=cfg.get("GROUP_N", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def quantize_mxfp8_activation(x: torch.Tensor, rule: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K] as uint8, E8M0 bytes [M, ceil(K/32)]) in one Triton pass,
    bit-exact with omniq.schemes.mx.mx_quantize(x, E4M3, rule, "rne")."""
    m, k = x.shape
    g = -(-k // 32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    s = torch.empty(m, g, dtype=torch.uint8, device=x.device)
    bg = min(32, next_pow2(g))
    _mx8_quant_kernel[(m, -(-g // bg))](x, q, s, m, k, g, x.stride(0), q.stride(0), s.stride(0),
                                        RULE=RULES[rule], BLOCK_G=bg, FAKE=False, num_warps=4)
    return q, s


def fake_quantize_mxfp8_activation(x: torch.Tensor, rule: str = "floor") -> torch.Tensor:
    """The MXFP8 fake-quantized activation P * 2^E as bf16 [M, K] (exact), one Triton pass."""
    m, k = x.shape
    g = -(-k // 32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(m, k, dtype=torch.bfloat16, device=x.device)
    bg = min(32, next_pow2(g))
    _mx8_quant_kernel[(m, -(-g // bg))](x, out, out, m, k, g, x.stride(0), out.stride(0), 0,
                                        RULE=RULES[rule], BLOCK_G=bg, FAKE=True, num_warps=4)
    return out


def run_mxfp8(x: torch.Tensor, p: MXFP8Prepared, bias: torch.Tensor | None, kind: str = "gemm",
              cfg: dict | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for an mxfp8 weight, the weight decoded in registers. kind "gemm":
    W8A16, and W8A8 as W8A16 over the fake-quantized activation (an MX x MX product is exactly a
    bf16 x bf16 one: x is quantized per 32 and fed as exact bf16); kind "splitk" with W8A8: e4m3
    tensor-core dots per 32-element group, each scaled by the two group factors."""
    m = x.shape[0]
    y = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    dummy = p.rexp
    w8a8 = p.scheme.activation is not None
    if w8a8 and kind == "splitk":
        xq, xs = quantize_mxfp8_activation(x, p.scheme.scale_rule)
        g = xs.shape[1]
        cfg = dict(cfg or config_for("w8a8_splitk", FMT_MXFP8, m, p.n, p.k))
        gpi = max(1, min(cfg["GPI"], next_pow2(g)))
        iters = -(-g // gpi)
        bn, bm, tiles, split = _launch_grid("w8a8_splitk", m, p.n, iters, x.device, cfg)
        ws, cnt = _workspace(split, tiles, bn, bm, x.device)
        _mx8_w8a8_kernel[(tiles, split)](
            xq, xs, p.weight.view(torch.uint8), p.scales, p.rexp, bias if bias is not None else dummy,
            y, ws, cnt, m, p.n, p.k, g, xq.stride(0), xs.stride(0), y.stride(0), p.weight.stride(0),
            GPI=gpi, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=split,
            GROUP_N=cfg.get("GROUP_N", 1), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return y
    xk = fake_quantize_mxfp8_activation(x, p.scheme.scale_rule) if w8a8 else x
    if xk.stride(-1) != 1:
        xk = xk.contiguous()
    cfg = dict(cfg or config_for(kind, FMT_MXFP8, m, p.n, p.k))
    dot, upcast, ieee = dot_dtype(xk.dtype)
    if kind == "gemm":
        return _launch_gemm(xk, p.weight.view(torch.uint8), p.scales, p.rexp, None, None, bias, y, p.k, 1.0,
                            FMT_MXFP8, 32, 32, dot, upcast, ieee, 0, cfg)
    n_units = -(-p.k // 64)
    units = max(1, min(cfg["UNITS"], n_units))
    while n_units % units:
        units //= 2
    iters = n_units // units
    bn, bm, tiles, split = _launch_grid(kind, m, p.n, iters, x.device, cfg)
    ws, cnt = _workspace(split, tiles, bn, bm, x.device)
    _wdq_kernel[(tiles, split)](
        xk, p.weight.view(torch.uint8), p.scales, p.rexp, dummy, dummy, bias if bias is not None else dummy,
        y, ws, cnt, m, p.n, p.k, n_units, p.scales.shape[0], xk.stride(0), y.stride(0), p.weight.stride(0),
        1, 1.0,
        FMT=FMT_MXFP8, H=32, GROUP=32, UNITS=units, DUAL=False, XDUAL=False, HAS_BIAS=bias is not None,
        EVEN_K=p.k % 64 == 0,
        DOT=dot, ASM=0, UPCAST=upcast, IEEE=ieee, BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=split,
        GROUP_N=cfg.get("GROUP_N", 1), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


# --------------------------------------------------------------------------------------------
# Dequantize, then cuBLAS: for large M, where the tensor-core GEMM over a weight decoded in
# registers pays the decode once per M tile. One Triton pass writes the weight in the dot dtype
# (a transient buffer, freed after the call, never cached: the layer keeps its one quantized
# copy), then torch's matmul runs at the dense rate.
# --------------------------------------------------------------------------------------------
DEQUANT_MIN_M = 128


def _dequant_launch(w, scales, rexp, dual, n, k, n_units, h, group, fmt, out_dtype, gscale=1.0):
    out = torch.empty(n, k, dtype=out_dtype, device=w.device)
    units = 1
    while units < 8 and n_units % (units * 2) == 0:
        units *= 2
    bn = 32
    _dequant_kernel[(-(-n // bn), n_units // units)](
        w, scales, rexp, dual if dual is not None else rexp, out, n, k, n_units, w.stride(0), out.stride(0),
        float(gscale), FMT=fmt, H=h, GROUP=group, DUAL=dual is not None, BLOCK_N=bn, UNITS=units, num_warps=4)
    return out


def dequantize_fp4(p: FP4Prepared, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """The weight [N, K] in `dtype` from the triton.fp4.v1 layout, times `scale` (default
    NVFP4's weight_scale_2), each value rounded once from fp32."""
    return _dequant_launch(p.qweight, p.scales, p.rexp, p.dual, p.n, p.k, p.n_units, p.h, p.group, p.fmt, dtype,
                           p.gscale if scale is None else scale)


def dequantize_mxfp8(p: MXFP8Prepared, dtype: torch.dtype) -> torch.Tensor:
    return _dequant_launch(p.weight.view(torch.uint8), p.scales, p.rexp, None, p.n, p.k, -(-p.k // 64), 32, 32,
                           FMT_MXFP8, dtype)


def _mm(x, w, bias, out_dtype):
    """x @ w^T + bias on the dense library path, rounded once into out_dtype (an fp32 result
    when the operands' dtype is not the output's: bf16 fake-quantized activations)."""
    if x.dtype == out_dtype:
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    y = None
    if x.is_cuda:
        try:
            y = torch.mm(x, w.t(), out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):
            y = None
    if y is None:
        y = torch.mm(x.float(), w.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def run_fp4_dequant_mm(x: torch.Tensor, p: FP4Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize-then-matmul for a triton.fp4.v1 weight (large M)."""
    from omniq.schemes.mx import expand_blocks
    xk, _, xd, efac = _fp4_activation(x, p)
    # the dense product runs in x's dtype: fake-quantized activations are exact there (bf16 ->
    # fp32/fp16), dualscale's per-512 activation scales join x (rounded once), and the folded
    # weight rounds once at that dtype's precision
    if xd is not None:
        xk = xk.float() * expand_blocks(xd, 512, p.k)
    xk = xk.to(x.dtype)
    w = dequantize_fp4(p, x.dtype, p.gscale * efac)
    return _mm(xk, w, bias, x.dtype)


def run_mxfp8_dequant_mm(x: torch.Tensor, p: MXFP8Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize-then-matmul for mxfp8: W8A8 multiplies the exact fake-quantized activation
    (bf16) by the exact dequantized weight; W8A16 multiplies x as is."""
    xk = x
    if p.scheme.activation is not None:
        xk = fake_quantize_mxfp8_activation(x, p.scheme.scale_rule).to(x.dtype)
    w = dequantize_mxfp8(p, x.dtype)
    return _mm(xk, w, bias, x.dtype)


def check_fp4_problem(scheme, n: int, k: int, act_dtype: torch.dtype) -> str | None:
    """None when the fp4 kernels handle this problem, else the reason."""
    if act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations must be bf16, fp16 or fp32, not {act_dtype}"
    if scheme.name == "mxfp4_dualscale" and k % 512:
        return f"mxfp4_dualscale needs K % 512 == 0 (K={k})"
    if scheme.name == "mxfp4" and k % 32:
        return f"mxfp4 needs K % 32 == 0 (K={k})"
    if scheme.name == "nvfp4" and k % 16:
        return f"nvfp4 needs K % 16 == 0 (K={k})"
    return None
