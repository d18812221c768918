"""GGUF (llama.cpp / ggml) block-quantized weights: the raw block bytes of a GGUF file.

Storage: `weight` uint8 [N, K / block * bytes_per_block], each row the ggml blocks of that
output channel back to back, exactly as in the file (formats.md section 5). The codecs live in
`omniq.formats.gguf_blocks` (one table row per type).

Quantizers: the legacy types (q8_0, q4_0, q4_1, q5_0, q5_1) reproduce gguf-py 0.19.0 byte for
byte (its tie rules: RHAZ for q8_0, trunc(x/d + 0.5) for the rest). The K-quants use omniq's
least-squares search (see gguf_blocks), never worse per super-block than round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.errors import OmniqError, where
from omniq.formats import gguf_blocks as gb
from omniq.schemes.base import AffineView, QuantizedWeight, QuantScheme, TensorSpec
from omniq.schemes.registry import scheme

GGUF_TYPES = tuple(gb.BLOCK_TYPES)


def resolve_type(value) -> gb.BlockType:
    """A ggml type given as a name ("q4_k", "Q4_K", "GGML_TYPE_Q4_K"), a type id (12) or a
    gguf.GGMLQuantizationType member."""
    bt = None
    if isinstance(value, str):
        key = value.strip().lower()
        key = key[len("ggml_type_"):] if key.startswith("ggml_type_") else key
        bt = gb.BLOCK_TYPES.get(key)
    elif isinstance(value, int) and not isinstance(value, bool):   # IntEnum members included
        bt = gb.BY_TYPE_ID.get(int(value))
    if bt is None:
        allowed = ", ".join(f"{n} ({gb.BLOCK_TYPES[n].type_id})" for n in GGUF_TYPES)
        raise OmniqError(f"gguf: invalid type={value!r}; allowed types (ggml type id): {allowed}")
    return bt


@scheme("gguf")
@dataclass(frozen=True)
class GGUFScheme(QuantScheme):
    """ggml block types: `type` in q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k
    (case-insensitive; ggml type ids and gguf.GGMLQuantizationType members are accepted and
    normalised to the lower-case name).

    Values (float32, gguf-py's op order): q8_0 d*q; q4_0 d*(q-8); q5_0 d*(q-16); q4_1/q5_1
    d*q + m; q2_k/q4_k/q5_k (d*sc)*q - dmin*mn per 16/32/32 elements; q3_k (d*(sc-32))*(q-4)
    and q6_k (d*sc)*(q-32) per 16 elements.
    """

    type: str = "q4_k"

    def __post_init__(self):
        object.__setattr__(self, "type", resolve_type(self.type).name)

    @property
    def block(self) -> gb.BlockType:
        return gb.BLOCK_TYPES[self.type]

    @property
    def k_multiple(self) -> int:  # 32 for the legacy types, 256 for the K-quants
        return self.block.block_size

    # ---- description -------------------------------------------------------------------------
    def row_bytes(self, k: int, layer: str | None = None) -> int:
        bt = self.block
        if k % bt.block_size:
            raise OmniqError(f"{where(layer)}gguf({self.type}): K={k} input features is not a multiple of the "
                             f"{self.type} block size {bt.block_size}; ggml blocks are never padded, so "
                             f"pad the layer to a multiple of {bt.block_size} or leave it unquantized")
        return k // bt.block_size * bt.type_size

    def tensor_specs(self, n: int, k: int) -> dict[str, TensorSpec]:
        # in_dim counts bytes: K/block blocks of type_size bytes each, so a K-shard must hold
        # whole blocks (K per rank a multiple of the block size).
        return {"weight": TensorSpec((n, self.row_bytes(k)), torch.uint8, in_dim=1, out_dim=0)}

    def validate(self, qw: QuantizedWeight) -> None:
        n, k = qw.shape
        nbytes = self.row_bytes(k, qw.name)
        w = qw.tensors.get("weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == n and w.shape[1] != nbytes:
            bt = self.block
            raise OmniqError(f"{where(qw.name)}gguf({self.type}): tensor 'weight' has {w.shape[1]} bytes per row; "
                             f"a {self.type} row of K={k} is {k // bt.block_size} blocks x {bt.type_size} bytes "
                             f"= {nbytes} bytes (shape ({n}, {nbytes})). Check the GGUF tensor type and shape")
        super().validate(qw)

    # ---- verbs -------------------------------------------------------------------------------
    def _blocks(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.tensors["weight"].reshape(-1, self.block.type_size)

    def scale(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoded block fields of `w` quantized: codes, d (and m / dmin, sc, mn), each with
        leading dims [N, K/block] (formats/gguf_blocks.py names them)."""
        bt = self.block
        n, k = w.shape
        f = gb.quantize_blocks(bt, w.float().reshape(-1, bt.block_size))
        return {key: t.reshape(n, k // bt.block_size, *t.shape[1:]) for key, t in f.items()}

    def pack(self, w: torch.Tensor, scales: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Encode block fields (from `scale`) to bytes. Without "codes", the codes are rounded
        to nearest against the given scales."""
        bt = self.block
        n, k = w.shape
        f = {key: t.reshape(-1, *t.shape[2:]) for key, t in scales.items()}
        if "codes" not in f:
            f = gb.with_codes(bt, w.float().reshape(-1, bt.block_size), f)
        raw = gb.pack_blocks(bt, f).reshape(n, self.row_bytes(k))
        return QuantizedWeight(self, (n, k), {"weight": raw})

    def quantize(self, w: torch.Tensor, name: str | None = None) -> QuantizedWeight:
        self.check_weight(w, name)
        fields = self.scale(w)
        bad = [key for key in ("d", "m", "dmin") if key in fields and not torch.isfinite(fields[key]).all()]
        if bad:
            raise OmniqError(f"{where(name)}gguf({self.type}): |weight| up to {w.abs().max().item():.4g} overflows "
                             f"the float16 block scale(s) {bad}; rescale the weight or use a type with a "
                             f"finer scale (q8_0 holds |w| < ~8.3e6)")
        qw = self.pack(w, fields)
        qw.name = name
        return qw

    def unpack(self, qw: QuantizedWeight) -> torch.Tensor:
        n, k = qw.shape
        return gb.unpack_blocks(self.block, self._blocks(qw))["codes"].reshape(n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        n, k = qw.shape
        return gb.dequantize_blocks(self.block, self._blocks(qw)).reshape(n, k)

    def affine_view(self, qw: QuantizedWeight) -> AffineView:
        """codes [N, K] as stored, group scales/offsets [N, K/group] in float32 with
        codes*scales + offsets == dequantize exactly (as values; a zero may differ in sign).

        Exact because every product is exact in float32: |code| < 2^8 times a float16 d
        (11 significant bits) times an integer sub-scale (<= 7 bits) fits 24 bits, so the
        only rounding is the final add, the same one gguf-py does; symmetric types carry
        offset = -zero*scale, exact too since (code - zero)*scale is representable.
        """
        bt = self.block
        n, k = qw.shape
        f = gb.unpack_blocks(bt, self._blocks(qw))
        scale, offset = gb.group_params(bt, f)
        if offset is None and bt.zero:
            offset = -(bt.zero * scale)
        g = k // bt.group_size
        return AffineView(codes=f["codes"].reshape(n, k), scales=scale.reshape(n, g),
                          offsets=None if offset is None else offset.reshape(n, g),
                          group_size=bt.group_size, bits=bt.bits, signed=bt.signed)
