"""CPU harness for the vLLM / vLLM-Omni integration tests (test code, never imported by omniq).

vLLM-Omni 0.30 has no CPU platform, so running its real DiT code here needs shims:
- attention: the unspecified platform has no diffusion attention backend and
  `AttentionImpl.forward` dispatches only to accelerators; both are pointed at SDPA;
- distributed: vLLM's own gloo init (vLLM-Omni's divides by the device count, 0 on a CPU);
- `CompilationMode.NONE`: no torch.compile of vLLM custom ops (about 2 s per process).

Builders make tiny Z-Image, Flux and Qwen-Image transformers whose quantized layers have K
and N that every omniq scheme can store (Flux and Qwen-Image: K a multiple of 256, as GGUF
K-quants need; Z-Image: K in {384, 1024}, see ZIMAGE), a random
diffusers-style state dict (unfused q/k/v, w1/w3 names, as checkpoints hold them) from a
model's own parameters, and a fixed input per model.
"""
from __future__ import annotations

import contextlib
import socket
from types import SimpleNamespace

import torch

SDPA_BACKEND = "vllm_omni.diffusion.attention.backends.sdpa.SDPABackend"


def patch_cpu_attention() -> None:
    from vllm_omni.diffusion.attention.backends.sdpa import SDPAImpl
    from vllm_omni.platforms.interface import UnspecifiedOmniPlatform

    UnspecifiedOmniPlatform.get_diffusion_attn_backend_cls = classmethod(lambda cls, *a, **k: SDPA_BACKEND)
    SDPAImpl.forward = lambda self, q, k, v, attn_metadata=None: self._forward_impl(
        q, k, v, attn_metadata, mask_mode="broadcast_k")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_config():
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig
    return VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.NONE))


@contextlib.contextmanager
def vllm_cpu(tp_size: int = 1, rank: int = 0, init_method: str | None = None):
    """vLLM's config and (gloo) model-parallel groups for the duration of the block."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    import os
    patch_cpu_attention()
    init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
    # vLLM's CPU worker sets this; its TP communicator names its shared memory after it
    os.environ["VLLM_DIST_IDENT"] = "omniq-test-" + init_method.rsplit(":", 1)[-1]
    cfg = vllm_config()
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=tp_size, rank=rank, distributed_init_method=init_method,
                                     local_rank=rank, backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=tp_size)
        try:
            yield cfg
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


# ---- tiny models ----------------------------------------------------------------------------------
# Z-Image's FFN width is int(dim * 8/3): dim 192 gives FFN 512, so K is 192 or 512 and N a
# multiple of 64: every scheme stores every layer (GPTQ's last group of 128 is partial at K=192,
# as its format allows) except GGUF K-quants (blocks of 256), which fit only w2 (K=512); the
# others stay in BF16 under them, as omniq does for any layer a scheme cannot store. (dim 768,
# the smallest with every K a multiple of 256, costs 16x more CPU time in every test.)
ZIMAGE = dict(dim=192, n_layers=1, n_refiner_layers=1, n_heads=6, n_kv_heads=6, cap_feat_dim=64, in_channels=16,
              axes_dims=[8, 12, 12], axes_lens=[64, 32, 32])
FLUX = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=128,
            num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 56, 56))

# (layer prefixes that receive the quant config) per model at these sizes: vLLM-Omni hard-wires
# the rest (embedders, modulation, final layers; Flux's dual-stream blocks) to full precision.
QUANTIZED = {
    "zimage": [f"{b}.0.{l}" for b in ("noise_refiner", "context_refiner", "layers")
               for l in ("attention.to_qkv", "attention.to_out.0", "feed_forward.w13", "feed_forward.w2")],
    "flux": [f"single_transformer_blocks.0.{l}" for l in ("proj_mlp", "proj_out", "attn.to_qkv")],
    "qwen": [f"transformer_blocks.0.{l}"
             for l in ("attn.to_qkv", "attn.add_kv_proj", "attn.to_out.0", "attn.to_add_out",
                       "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")],
}


def od_config():
    """The few OmniDiffusionConfig fields the transformers read."""
    parallel = SimpleNamespace(sequence_parallel_size=1, mask_sp_padding=False, ulysses_degree=1, ring_degree=1,
                               ulysses_mode="default", tensor_parallel_size=1, cfg_parallel_size=1)
    return SimpleNamespace(parallel_config=parallel, tf_model_config=SimpleNamespace(params={}), model="tiny",
                           diffusion_attention_config=None)


def build(kind: str, quant_config, dtype=torch.bfloat16) -> torch.nn.Module:
    """A tiny transformer of `kind` ("zimage", "flux", "qwen") with `quant_config`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if kind == "zimage":
            from vllm_omni.diffusion.models.z_image.z_image_transformer import ZImageTransformer2DModel
            return ZImageTransformer2DModel(quant_config=quant_config, **ZIMAGE)
        if kind == "flux":
            from vllm_omni.diffusion.models.flux.flux_transformer import FluxTransformer2DModel
            return FluxTransformer2DModel(od_config=None, quant_config=quant_config, **FLUX)
        if kind == "qwen":
            from vllm_omni.diffusion.models.qwen_image.qwen_image_transformer import QwenImageTransformer2DModel
            return QwenImageTransformer2DModel(od_config=od_config(), quant_config=quant_config, **QWEN)
    finally:
        torch.set_default_dtype(old)
    raise ValueError(kind)


# The transformers' load_weights map these unfused checkpoint names onto their fused layers.
_UNFUSE = {"to_qkv": ("to_q", "to_k", "to_v"), "add_kv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
           "w13": ("w1", "w3")}


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diffusers-style random weights for `model` (built unquantized): Linear weights ~ N(0, 1/K),
    biases and norm weights small, fused layers split into their checkpoint shards."""
    from vllm.model_executor.layers.linear import LinearBase
    g = torch.Generator().manual_seed(seed)
    fused = {name: m for name, m in model.named_modules()
             if isinstance(m, LinearBase) and name.rpartition(".")[2] in _UNFUSE}
    out = {}
    for name, p in model.named_parameters():
        mod, _, leaf = name.rpartition(".")
        if p.dim() == 2:
            t = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        elif leaf == "weight":
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            t = 0.02 * torch.randn(p.shape, generator=g)
        t = t.to(p.dtype)
        if mod in fused:
            head, _, last = mod.rpartition(".")
            sizes = fused[mod].output_sizes
            for shard, part in zip(_UNFUSE[last], t.split(sizes, dim=0)):
                out[f"{head}.{shard}.{leaf}"] = part.clone()
        else:
            out[name] = t
    if "zimage" not in type(model).__name__.lower():
        # Flux / Qwen-Image checkpoints name the attention output projection to_out.0
        out = {k.replace(".attn.to_out.", ".attn.to_out.0.") if ".attn.to_out." in k and ".to_out.0." not in k
               else k: v for k, v in out.items()}
    return out


def process_after_loading(model: torch.nn.Module) -> None:
    """vLLM-Omni's own post-load step (online finalization, then process_weights_after_loading)."""
    from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader
    DiffusersPipelineLoader._process_weights_after_loading(object.__new__(DiffusersPipelineLoader), model,
                                                           torch.device("cpu"))


def load(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], quant_config=None, on_tensor=None) -> None:
    """vLLM-Omni's own loading over `state_dict` in sorted (safetensors) order: the real
    `DiffusersPipelineLoader.load_weights` (model.load_weights plus its check that every
    parameter was loaded), then its post-load step. `on_tensor(name)` runs after each tensor."""
    import time

    from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader

    def stream(*_, **__):
        for name in sorted(state_dict):
            yield name, state_dict[name]
            if on_tensor is not None:
                on_tensor(name)

    loader = object.__new__(DiffusersPipelineLoader)
    loader.quant_config = quant_config
    loader.counter_before_loading_weights = time.perf_counter()
    loader.get_all_weights = stream
    loader.load_weights(model)
    process_after_loading(model)


def inputs(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    if kind == "zimage":
        return dict(x=[torch.randn(16, 1, 8, 8, generator=g).to(bf)], t=torch.tensor([0.5], dtype=bf),
                    cap_feats=[torch.randn(32, 64, generator=g).to(bf)])
    if kind == "flux":
        h = w = 4
        grid = torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        img_ids = torch.stack(grid, -1).reshape(-1, 3)
        return dict(hidden_states=torch.randn(1, h * w, 16, generator=g).to(bf),
                    encoder_hidden_states=torch.randn(1, 8, 64, generator=g).to(bf),
                    pooled_projections=torch.randn(1, 32, generator=g).to(bf),
                    timestep=torch.tensor([0.5], dtype=bf), img_ids=img_ids, txt_ids=torch.zeros(8, 3),
                    return_dict=False)
    if kind == "qwen":
        return dict(hidden_states=torch.randn(1, 16, 16, generator=g).to(bf),
                    encoder_hidden_states=torch.randn(1, 8, 64, generator=g).to(bf),
                    encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long),
                    timestep=torch.tensor([0.5], dtype=bf), img_shapes=[(1, 4, 4)], txt_seq_lens=[8],
                    return_dict=False)
    raise ValueError(kind)


def forward(kind: str, model: torch.nn.Module, x: dict) -> torch.Tensor:
    from vllm_omni.diffusion.forward_context import set_forward_context
    with torch.no_grad(), set_forward_context(omni_diffusion_config=od_config()):
        out = model(**x)
    if kind == "zimage":
        out = out[0]
        return torch.stack(out) if isinstance(out, list) else out
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "sample", out)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


# ---- inspection -----------------------------------------------------------------------------------
def linear_methods(model: torch.nn.Module) -> dict[str, object]:
    """Layer prefix -> quant method, for every vLLM linear layer that received a quant config
    (layers built with quant_config=None have an empty prefix in vLLM-Omni)."""
    from vllm.model_executor.layers.linear import LinearBase
    return {m.prefix: m.quant_method for _, m in model.named_modules() if isinstance(m, LinearBase) and m.prefix}


def omniq_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Layer prefix -> module, for the layers omniq quantized."""
    return {m.omniq_prefix: m for _, m in model.named_modules() if getattr(m, "omniq", None) is not None}


def capture_inputs(model: torch.nn.Module, kind: str, x: dict, names) -> dict[str, torch.Tensor]:
    """The input activation [M, K] (fp32) of each named module during one forward."""
    names = set(names)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name in names:
            def hook(m, args, name=name):
                seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        forward(kind, model, x)
    finally:
        for h in hooks:
            h.remove()
    return seen
