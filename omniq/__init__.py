"""omniq: one quantization kernel layer for diffusion, autoregressive and omni models.

    import omniq
    qw = omniq.get_scheme("gptq", bits=4, group_size=128).quantize(w)   # w: [N, K]
    y = omniq.linear(x, qw)                                            # fastest valid kernel
    print(omniq.explain(qw, m=1))                                      # why that kernel
"""
from omniq.errors import KernelError, OmniqError
from omniq.schemes import AffineView, QuantizedWeight, QuantScheme, TensorSpec, get_scheme, list_schemes
from omniq.dispatch import (Kernel, Layout, Problem, all_kernels, disable_kernels, get_kernel,
                            register_kernel, set_tuning, use_kernel)
from omniq.linear import PreparedLinear, explain, linear, prepare

__version__ = "0.1.0"

__all__ = ["KernelError", "OmniqError", "AffineView", "QuantizedWeight", "QuantScheme", "TensorSpec",
           "get_scheme", "list_schemes", "Kernel", "Layout", "Problem", "all_kernels", "disable_kernels",
           "get_kernel", "register_kernel", "set_tuning", "use_kernel", "PreparedLinear", "explain", "linear",
           "prepare", "quantize_", "QuantLinear"]


def __getattr__(name):  # nn pulls in torch.nn machinery; load it on first use
    if name in ("quantize_", "QuantLinear"):
        from omniq import nn
        return getattr(nn, name)
    raise AttributeError(f"module 'omniq' has no attribute {name!r}")
