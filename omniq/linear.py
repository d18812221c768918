"""omniq.linear: y = x @ W^T + b for a quantized W, on the fastest valid kernel for x's device.

A weight is prepared once per device (`omniq.prepare`): the dispatcher picks one storage
layout for it, and afterwards switches per M bucket only among kernels sharing that layout,
so a layer never holds two copies. Under torch.compile the call is the custom op
`omniq::linear` (with a fake implementation); in eager mode it skips the op machinery, since
per-call overhead matters at small M.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from omniq.dispatch import overrides
from omniq.dispatch.kernel import CHECKPOINT, Problem, m_bucket
from omniq.dispatch.registry import get_kernel
from omniq.dispatch.select import candidates, choose, explain_problem, forced
from omniq.errors import KernelError, OmniqError, where
from omniq.schemes.base import QuantizedWeight

# Representative M values used to pick a layer's one layout: the layout that wins most of them.
LAYOUT_VOTE_M = (1, 16, 128, 1024, 8192)


class PreparedLinear:
    """A quantized weight prepared for one device, with its per-(M bucket, dtype) choices."""

    _handles = itertools.count()
    _live: "weakref.WeakValueDictionary[int, PreparedLinear]" = weakref.WeakValueDictionary()

    def __init__(self, qw: QuantizedWeight, device=None, act_dtype: torch.dtype = torch.bfloat16,
                 layout: str | None = None, kernel: str | None = None):
        self.qw = qw
        # a kernel this layer must always use (e.g. a vLLM config's "kernel"): checked here, at
        # prepare time, and per M bucket like OMNIQ_KERNEL, without a per-call context manager
        self.pinned = kernel
        self.device = torch.device(device) if device is not None else qw.device
        self.n, self.k = qw.shape
        self.layout = layout or self._pick_layout(act_dtype)
        kernel = next(k for k in _all() if k.layout.name == self.layout)
        self.data = kernel.layout.prepare(qw, self.device)
        if self.layout != CHECKPOINT.name:
            # keep the metadata only: the repacked layout is this layer's one weight copy
            self.qw = QuantizedWeight(qw.scheme, qw.shape, {}, name=qw.name, validate=False)
        self._choices: dict = {}
        self._generation = overrides.generation()
        self.handle = next(self._handles)
        PreparedLinear._live[self.handle] = self

    def problem(self, m: int, act_dtype: torch.dtype) -> Problem:
        return Problem(self.qw.scheme, self.n, self.k, m, act_dtype, self.device)

    def _pick_layout(self, act_dtype: torch.dtype) -> str:
        """The one layout this layer keeps: among layouts with a valid kernel at every
        representative M, the one whose kernels win the most of those M."""
        problems = [self.problem(m, act_dtype) for m in LAYOUT_VOTE_M]
        if self.pinned or overrides.forced_kernel():
            errors = []
            for pr in problems:  # the forced kernel must run this N x K for some M
                try:
                    return forced(pr, None, self.qw.name, self.pinned).layout.name
                except KernelError as e:
                    errors.append(e)
            raise errors[0]
        per_m = [candidates(pr) for pr in problems]
        layouts = {k.layout.name for ks in per_m for k in ks}
        covering = {l for l in layouts if all(any(k.layout.name == l for k in ks) for ks in per_m)}
        if not covering:
            choose(problems[0], None, None, self.qw.name)  # raises with the reason if nothing runs
            raise KernelError(f"{where(self.qw.name)}no single weight layout has a kernel for every M "
                              f"in {LAYOUT_VOTE_M}; see omniq.explain()")
        votes: dict[str, int] = {}
        for pr in problems:
            l = choose(pr, covering, None, self.qw.name).layout.name
            votes[l] = votes.get(l, 0) + 1
        # ties go to the layout chosen at the largest M (compute-bound calls cost the most)
        order = [choose(pr, covering, None, self.qw.name).layout.name for pr in reversed(problems)]
        return max(votes, key=lambda l: (votes[l], -order.index(l)))

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared layout (the layer's one weight copy)."""
        return _nbytes(self.data)

    def kernel_for(self, m: int, act_dtype: torch.dtype):
        gen = overrides.generation()
        if gen != self._generation:
            self._choices.clear()
            self._generation = gen
        key = (m_bucket(m), act_dtype)
        k = self._choices.get(key)
        if k is None:
            k = choose(self.problem(m, act_dtype), self.layout, {self.layout: self.data}, self.qw.name,
                       self.pinned)
            self._choices[key] = k
        return k

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self, bias)

    def __repr__(self) -> str:
        return f"PreparedLinear({self.qw.scheme.key}, N={self.n}, K={self.k}, layout={self.layout}, {self.device})"


def _all():
    from omniq.dispatch.registry import all_kernels
    return all_kernels()


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, QuantizedWeight):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(getattr(type(obj), "nbytes", None), property):
        return int(obj.nbytes)  # a prepared object holding opaque packed data counts itself
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(v) for v in vars(obj).values())
    return 0


_prepared_cache: "weakref.WeakKeyDictionary[QuantizedWeight, dict]" = weakref.WeakKeyDictionary()


def prepare(qw: QuantizedWeight, device=None, act_dtype: torch.dtype = torch.bfloat16,
            layout: str | None = None, kernel: str | None = None) -> PreparedLinear:
    """Prepare `qw` for `device` once: choose its layout and repack the storage for it.
    `kernel` pins one kernel for this layer (an error now if it cannot run the layer)."""
    if kernel is not None:
        get_kernel(kernel)  # an unknown name fails here, listing the registered ones
    return PreparedLinear(qw, device, act_dtype, layout, kernel)


def _prepared(w, device: torch.device, act_dtype) -> PreparedLinear:
    if isinstance(w, PreparedLinear):
        return w
    if not isinstance(w, QuantizedWeight):
        raise OmniqError(f"omniq.linear expects a QuantizedWeight or PreparedLinear; got {type(w).__name__}")
    per_device = _prepared_cache.setdefault(w, {})
    p = per_device.get(device)
    if p is None:
        p = per_device[device] = PreparedLinear(w, device, act_dtype)
    return p


def _run(x: torch.Tensor, p: PreparedLinear, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 2 and x.shape[1] == p.k and x.shape[0]:
        # the common case (vLLM flattens tokens): no reshape in or out, ~2 us less per call
        return p.kernel_for(x.shape[0], x.dtype).run(x, p.data, bias)
    if x.shape[-1] != p.k:
        raise OmniqError(f"{where(p.qw.name)}activation has {x.shape[-1]} input features, the weight expects "
                         f"K={p.k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, p.n)
    kernel = p.kernel_for(x2.shape[0], x.dtype)
    y = kernel.run(x2, p.data, bias)
    return y.reshape(*lead, p.n)


@torch.library.custom_op("omniq::linear", mutates_args=())
def _linear_op(x: torch.Tensor, handle: int, bias: torch.Tensor | None) -> torch.Tensor:
    p = PreparedLinear._live.get(handle)
    if p is None:
        raise KernelError(f"omniq::linear: prepared weight {handle} no longer exists")
    return _run(x, p, bias)


@_linear_op.register_fake
def _linear_fake(x, handle, bias):
    p = PreparedLinear._live[handle]
    return x.new_empty(*x.shape[:-1], p.n)


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with the fastest valid kernel for x's device; x is [..., K]."""
    p = w if type(w) is PreparedLinear else _prepared(w, x.device, x.dtype)
    if torch.compiler.is_compiling():
        return _linear_op(x, p.handle, bias)
    return _run(x, p, bias)


def explain(w, m: int = 1, device=None, act_dtype: torch.dtype = torch.bfloat16, measure: bool = False):
    """Every registered kernel for this weight at M = m, with its verdict and reason.

    `w` is a QuantizedWeight (or PreparedLinear). With measure=True, valid kernels are timed.
    """
    if isinstance(w, PreparedLinear):
        p = w
    else:
        device = torch.device(device) if device is not None else w.device
        try:
            p = prepare(w, device, act_dtype)
        except KernelError:
            p = None
        if p is None:
            problem = Problem(w.scheme, w.shape[0], w.shape[1], m, act_dtype, device)
            return explain_problem(problem)
    return explain_problem(p.problem(m, act_dtype), p.layout, {p.layout: p.data}, measure, p.pinned)
