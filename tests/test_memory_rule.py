"""Quantizing must save the memory it promises: every layout a kernel prepares holds at most
1.05 x the scheme's nominal bytes (the explicit opt-in dequantize cache excepted)."""
import pytest
import torch

import omniq
from omniq.dispatch.registry import all_kernels

# Schemes with the parameters that stress the rule most (small groups = more scale bytes).
CASES = [
    ("fp8", {}), ("fp8", {"weight_granularity": "block"}), ("int8", {}), ("int8", {"activation": None}),
    ("gptq", {"bits": 4, "group_size": 128}), ("gptq", {"bits": 4, "group_size": 32}),
    ("gptq", {"bits": 8, "group_size": 128}), ("gptq", {"bits": 4, "group_size": 128, "desc_act": True}),
    ("awq", {"group_size": 128}), ("awq", {"group_size": 64}),
    ("mxfp8", {}), ("mxfp4", {}), ("mxfp4", {"activation": None}), ("mxfp4_dualscale", {}), ("nvfp4", {}),
    ("w8a8", {}), ("w8a8_dynamic", {}), ("w4a8_dynamic", {}),
] + [("gguf", {"type": t}) for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")]

# Layouts built on the CPU here; NPU/XPU layouts need their vendor ops (tested by emulation),
# CUDA-only repacks run in the GPU suite.
CPU_BUILDABLE_BACKENDS = ("reference", "cpu", "triton")
N, K = 256, 1024


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{'-'.join(f'{v}' for v in p.values())}" for n, p in CASES])
def test_every_layout_is_within_five_percent_of_nominal(name, params):
    scheme = omniq.get_scheme(name, **params)
    qw = scheme.quantize(torch.randn(N, K) * 0.05)
    nominal = scheme.nominal_nbytes(N, K)
    assert qw.nbytes <= 1.05 * nominal, f"the checkpoint tensors themselves exceed nominal: {qw}"
    layouts = {k.layout.name: k.layout for k in all_kernels()
               if k.backend in CPU_BUILDABLE_BACKENDS and k.serves(scheme) is None}
    from omniq.linear import _nbytes
    for lname, layout in layouts.items():
        if "cache" in lname:  # the documented opt-in: a dequantized copy, by request only
            continue
        prepared = layout.prepare(qw, torch.device("cpu"))
        assert _nbytes(prepared) <= 1.05 * nominal, (
            f"layout {lname} holds {_nbytes(prepared)} bytes for {scheme.key}, nominal {nominal}")
