"""Hypothesis strategies shared by the scheme tests: weights, activations, shapes.

Tensors are drawn as (seed, distribution, magnitude) and built with torch, which keeps
examples fast at realistic sizes while still covering the awkward cases: zero rows,
constant rows, one-signed rows, outliers and values on exact grid points (rounding ties).
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

DISTRIBUTIONS = ("normal", "uniform", "heavy", "sparse", "positive", "negative", "constant_rows",
                 "zero_rows", "grid")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_tensor(shape, dist: str, seed: int, magnitude: float = 1.0) -> torch.Tensor:
    """A float32 tensor of `shape` (last dim = the reduction dim) drawn from `dist`."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    normal = torch.randn(shape, generator=g)
    if dist == "normal":
        t = normal
    elif dist == "uniform":
        t = torch.rand(shape, generator=g) * 2 - 1
    elif dist == "heavy":      # log-normal spread: outliers orders of magnitude above the rest
        t = normal * torch.exp(2 * torch.randn(shape, generator=g))
    elif dist == "sparse":
        t = normal * (torch.rand(shape, generator=g) < 0.1)
    elif dist == "positive":
        t = normal.abs() + 0.5
    elif dist == "negative":
        t = -(normal.abs() + 0.5)
    elif dist == "constant_rows":
        t = torch.randn(shape[:-1] + (1,), generator=g).expand(shape).clone()
    elif dist == "zero_rows":
        t = normal * (torch.rand(shape[:-1] + (1,), generator=g) < 0.5)
    elif dist == "grid":       # multiples of 1/4: many exact halfway points after scaling
        t = torch.randint(-16, 17, shape, generator=g).float() / 4
    else:
        raise ValueError(dist)
    return (t * magnitude).float().contiguous()


@st.composite
def tensors(draw, shape, dists=DISTRIBUTIONS, magnitudes=(-3, 3), dtypes=(torch.float32,)):
    """A tensor of `shape`: distribution, magnitude 10^[lo, hi] and dtype drawn."""
    dist = draw(st.sampled_from(dists))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = 10.0 ** draw(st.floats(*magnitudes))
    dtype = draw(st.sampled_from(dtypes))
    t = make_tensor(shape, dist, seed, mag)
    top = torch.finfo(dtype).max      # a heavy draw at 10^3 overflows fp16: keep it finite
    return t.clamp(-top, top).to(dtype)


def weights(n: int, k: int, **kw):
    """A weight [N, K] (out_features, in_features)."""
    return tensors((n, k), **kw)


@st.composite
def activations(draw, k: int, max_m: int = 9, three_d: bool = True, dtypes=FLOAT_DTYPES, **kw):
    """An activation [M, K] or [B, S, K] (M = 1 drawn often), in a drawn float dtype."""
    m = draw(st.one_of(st.just(1), st.integers(1, max_m)))
    if three_d and draw(st.booleans()):
        b = draw(st.integers(1, 3))
        shape = (b, max(1, m // b), k)
    else:
        shape = (m, k)
    return draw(tensors(shape, dtypes=dtypes, **kw))


def dims(multiple: int = 1, lo: int = 1, hi: int = 160):
    """Sizes that are multiples of `multiple`, in [lo, hi] (rounded up to one multiple)."""
    lo_i = max(1, -(-lo // multiple))
    return st.integers(lo_i, max(lo_i, hi // multiple)).map(lambda i: i * multiple)


def k_near_groups(group: int, multiple: int = 1, max_groups: int = 3):
    """K at a group boundary (j*group) or one packing step off it (j*group +- multiple)."""
    return st.tuples(st.integers(1, max_groups), st.sampled_from((-multiple, 0, multiple))).map(
        lambda t: max(multiple, t[0] * group + t[1]))


def near_ties(points, ulps: int = 2):
    """float32 values at and within `ulps` float32 steps of each of `points`: placed at the
    rounding ties of a quantization grid (times its scale), they tell apart x/s from x*(1/s)
    and one tie rule from another, which random values almost never do."""
    import numpy as np
    base = np.asarray(points, dtype=np.float32)
    out, up, down = [base], base, base
    for _ in range(ulps):
        up = np.nextafter(up, np.float32(np.inf))
        down = np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return np.concatenate(out)
