"""Integer packing: sub-byte codes into uint8 bytes and int32 words.

Orders used by the public formats (formats.md §3.4, §4):
  nibble pairs, low first   element 2i in bits 3..0, 2i+1 in bits 7..4 (torch float4_e2m1fn_x2,
                            ModelOpt, msModelSlim, Quark)
  int32 sequential          value i of a word in bits [b*i + b-1 : b*i] (GPTQ qweight/qzeros)
  int32 AWQ interleave      nibble i of a word holds column 8c + AWQ_ORDER[i]
"""
import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_nibbles(codes: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """uint8 codes 0..15 -> uint8 bytes, halving `dim`; element 2i in the low nibble."""
    codes = codes.movedim(dim, -1).to(torch.uint8)
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: packed dimension {codes.shape[-1]} is odd; it must be even")
    out = (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)
    return out.movedim(-1, dim).contiguous()


def unpack_nibbles(packed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 bytes -> uint8 codes, doubling `dim`."""
    p = packed.movedim(dim, -1).to(torch.uint8)
    out = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    return out.movedim(-1, dim).contiguous()


def pack_int32(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Pack unsigned `bits`-wide values (0 .. 2^bits-1) along `dim` into int32 words.

    `order[i]` names which of the 32/bits consecutive values goes into slot i of the word
    (None = sequential). Returns int32 with `dim` shrunk by 32/bits.
    """
    per = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    if v.shape[-1] % per:
        raise ValueError(f"pack_int32: dimension of size {v.shape[-1]} is not a multiple of {per} "
                         f"({bits}-bit values, {per} per int32 word)")
    v = v.reshape(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
    word = ((v & ((1 << bits) - 1)) << shifts).sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> int32 values 0 .. 2^bits-1, `dim` grown by 32/bits.

    `order` is the same permutation given to pack_int32.
    """
    per = 32 // bits
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        inv = [0] * per
        for slot, src in enumerate(order):
            inv[src] = slot
        v = v[..., inv]
    v = v.flatten(-2).to(torch.int32)
    return v.movedim(-1, dim).contiguous()
