"""Shared by the GGUF kernel tests: random valid block bytes and gguf-py's values for them."""
import numpy as np
import torch

from omniq.formats.gguf_blocks import BLOCK_FACTS


def random_blocks(gtype: str, n: int, nb: int, seed: int) -> torch.Tensor:
    """uint8 [N, nb * bytes per block]: any bytes, f16 fields kept finite and modest (exponent
    bits of the high byte forced low)."""
    bpb = BLOCK_FACTS[gtype]["block_bytes"]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, nb, bpb), generator=g, dtype=torch.uint8)
    for name, (off, _) in BLOCK_FACTS[gtype]["fields"].items():
        if name in ("d", "dmin", "m"):
            raw[:, :, off + 1] &= 0x3B
    return raw.reshape(n, nb * bpb)


def gguf_py_values(gtype: str, raw: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]: gguf-py's dequantization of the raw rows (the independent oracle)."""
    import gguf  # a test dependency (requirements-test.txt): missing it is a failure, not a skip
    qtype = getattr(gguf.GGMLQuantizationType, gtype.upper())
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw.numpy(), qtype))).float()
