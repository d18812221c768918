"""Kernel protocol, registry, selection, tuning cache, overrides and explain."""
from omniq.dispatch.kernel import CHECKPOINT, Kernel, Layout, Problem, m_bucket
from omniq.dispatch.overrides import disable_kernels, use_kernel
from omniq.dispatch.registry import all_kernels, get_kernel, register_kernel
from omniq.dispatch.select import Verdict, candidates, choose, explain_problem, set_tuning

__all__ = ["CHECKPOINT", "Kernel", "Layout", "Problem", "m_bucket", "disable_kernels", "use_kernel",
           "all_kernels", "get_kernel", "register_kernel", "Verdict", "candidates", "choose",
           "explain_problem", "set_tuning"]
