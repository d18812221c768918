"""Quantization schemes. Importing this package registers every method family."""
from omniq.schemes.base import AffineView, QuantizedWeight, QuantScheme, TensorSpec
from omniq.schemes.registry import get_scheme, list_schemes, register_scheme

# one module per method family; each registers its schemes on import
from omniq.schemes import fp8, int8, gptq, awq, mx, nvfp4, gguf, msmodelslim  # noqa: E402,F401

__all__ = ["AffineView", "QuantizedWeight", "QuantScheme", "TensorSpec", "get_scheme", "list_schemes",
           "register_scheme"]
