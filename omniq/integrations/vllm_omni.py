"""vLLM-Omni integration: `quantization_config={"method": "omniq", "scheme": ...}` for DiTs.

Importing this module (or vLLM loading its `vllm.general_plugins` entry point, which calls
`register()`) makes "omniq" a vLLM-Omni quantization method, so every way vLLM-Omni takes a
quantization config reaches omniq:

    Omni(model=..., quantization_config={"method": "omniq", "scheme": "int8"})
    vllm serve <model> --omni --diffusion-quantization-config '{"method": "omniq", "scheme": "fp8"}'
    transformer/config.json: "quantization_config": {"quant_method": "omniq", "scheme": "gptq",
                             "bits": 4, "group_size": 128, "is_checkpoint_serialized": true}

Per-component specs: vLLM-Omni 0.30's Z-Image and Flux pipelines hand the whole config to
the transformer, whose layer prefixes have no "transformer." (`layers.0.attention.to_qkv`),
so `{"transformer": {...}, "vae": None}` routes none of their layers (vLLM-Omni then fails
with "All linear layers should support quant method."). Put the transformer's entry under
"default" instead, which reaches the unprefixed layers and works for Qwen-Image too:
`{"default": {"method": "omniq", "scheme": "int8"}, "vae": None}`; `component_spec()`
rewrites the former into the latter.

Pre-quantized checkpoints: `quantize_state_dict` turns a BF16 diffusers state dict into an
omniq one (calibrating static activation scales on sample inputs if given) and returns the
`quantization_config` to write into transformer/config.json; vLLM-Omni then loads it with
omniq and no flag.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from omniq.integrations.vllm import FUSED_LAYERS, METHOD, OmniqConfig


def build(**kwargs: Any) -> OmniqConfig:
    """vLLM-Omni's builder for "omniq": the spec's keys (method popped) as keyword arguments."""
    return OmniqConfig.from_config(kwargs)


def _checkpoint_quantization_config() -> tuple[str, dict] | None:
    """The transformer config.json's quantization_config of the model being built, if any."""
    try:
        from vllm_omni.diffusion.config import get_current_diffusion_config_or_none
    except ImportError:
        return None
    od = get_current_diffusion_config_or_none()
    params = getattr(getattr(od, "tf_model_config", None), "params", None) or {}
    qc = params.get("quantization_config")
    if qc is None:
        return None
    return f"the transformer config.json of {getattr(od, 'model', 'the model')!r}", qc


def register() -> None:
    """Register "omniq" with vLLM-Omni (idempotent; a no-op where vLLM-Omni is absent, vLLM
    itself having registered the method when omniq.integrations.vllm was imported)."""
    try:
        from vllm_omni.quantization import register_quantization_override
    except ImportError:
        return
    register_quantization_override(METHOD, build)
    if _checkpoint_quantization_config not in OmniqConfig.checkpoint_config_sources:
        OmniqConfig.checkpoint_config_sources.append(_checkpoint_quantization_config)


def component_spec(spec: dict) -> dict:
    """A per-component spec that reaches the transformer of every vLLM-Omni 0.30 DiT: the
    "transformer" entry also becomes "default" (see the module docstring)."""
    spec = dict(spec)
    if "transformer" in spec and "default" not in spec:
        spec["default"] = spec["transformer"]
    return spec


# ---- pre-quantized checkpoints ------------------------------------------------------------------
def checkpoint_layers(model: torch.nn.Module) -> dict[str, str]:
    """Checkpoint (diffusers) layer name -> module name in `model`, for every layer of `model`
    that omniq quantizes. Fused layers list each shard (to_q, to_k, to_v -> to_qkv)."""
    from vllm.model_executor.layers.linear import LinearBase

    from omniq.integrations.vllm import OmniqLinearMethod
    out = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, LinearBase) and isinstance(mod.quant_method, OmniqLinearMethod)):
            continue
        # the layer's prefix is its checkpoint name (Qwen-Image's `attn.to_out` module loads `attn.to_out.0`)
        head, _, last = (mod.prefix or name).rpartition(".")
        shards = FUSED_LAYERS.get(last)
        for s in shards or [last]:
            out[f"{head}.{s}" if head else s] = name
    return out


def quantize_state_dict(weights: Iterable[tuple[str, torch.Tensor]] | dict, spec: dict | OmniqConfig,
                        layers: Iterable[str], activations: dict[str, torch.Tensor] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize a BF16/FP16 diffusers state dict into an omniq checkpoint.

    layers: the checkpoint layer names to quantize (`checkpoint_layers(model)` of a model
        built with the same spec); their `.weight` becomes the scheme's tensors, everything
        else is kept.
    activations: optional sample inputs per layer name ([..., K]); schemes with static
        activation parameters (`input_scale`, ...) are calibrated on them (`scheme.calibrate`),
        otherwise they keep the scheme's placeholder.
    Returns (state dict, the `quantization_config` for the transformer's config.json, which
    makes vLLM-Omni load the checkpoint with omniq and no flag).
    """
    cfg = spec if isinstance(spec, OmniqConfig) else OmniqConfig.from_config(dict(spec))
    scheme = cfg.scheme
    layers = set(layers)
    sd = dict(weights)
    for name in list(sd):
        layer, _, leaf = name.rpartition(".")
        if leaf != "weight" or layer not in layers:
            continue
        w = sd.pop(name)
        bias = sd.get(f"{layer}.bias")
        if bias is not None and "bias" in scheme.tensor_specs(*w.shape):
            # msModelSlim's format folds the float bias into its integer quant_bias
            scheme.check_weight(w, layer)
            qw = scheme.pack(w.float(), {**scheme.scale(w.float()), "bias": bias.float()})
            qw.name = layer
        else:
            qw = scheme.quantize(w, name=layer)
        if activations is not None and layer in activations:
            qw = scheme.calibrate(qw, activations[layer])
        for tname, v in qw.tensors.items():
            sd[f"{layer}.{tname}"] = v
    qc = cfg.to_dict()
    qc["is_checkpoint_serialized"] = True
    return sd, qc


register()
