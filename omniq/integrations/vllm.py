"""vLLM integration: the `omniq` quantization method for vLLM's linear layers.

`OmniqConfig` (registered with vLLM as "omniq") turns a spec such as
`{"scheme": "gptq", "bits": 4, "group_size": 128, "ignored_layers": [...]}` into one
`OmniqLinearMethod` per quantized layer. The method registers the scheme's storage tensors
as vLLM parameters whose classes tell vLLM's loaders how to shard them (QKV / merged /
column / row / replicated), adopts a pre-quantized checkpoint's tensors, or, online,
quantizes a BF16/FP16 checkpoint layer by layer as each layer's last shard arrives; then the
dispatcher prepares each layer once and `apply` runs `omniq.linear`.

Fused layers whose checkpoint shards carry their own per-tensor scales (q/k/v, w1/w3):
omniq keeps ONE scale per layer, because every kernel takes one. Equal shard scales are
adopted as they are; different ones are reconciled at load time: the weight is dequantized
shard by shard and requantized as one tensor (one extra rounding, reported in the log), and
static activation parameters (`input_*`) take the union of the shards' ranges, so no shard's
activations clip. Keeping per-shard scales would need one GEMM per shard.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

import omniq
from omniq import QuantizedWeight, TensorSpec
from omniq.errors import KernelError, OmniqError, where

from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase, LinearMethodBase,
                                               QKVParallelLinear, RowParallelLinear, UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.model_loader.reload.meta import CopyCounter
from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter,
                                           GroupQuantScaleParameter, ModelWeightParameter,
                                           PackedColumnParameter, PackedvLLMParameter,
                                           PerTensorScaleParameter, RowvLLMParameter)

log = logging.getLogger("omniq")

METHOD = "omniq"

# Keys of a spec that configure the integration; every other key is a scheme parameter.
CONFIG_KEYS = ("scheme", "ignored_layers", "modules_to_not_convert", "kernel", "is_checkpoint_serialized",
               "quant_method", "method")

# Fused vLLM layers of the supported DiTs (and LLMs) and their checkpoint shard names, so
# `ignored_layers` may name either. The model's own `packed_modules_mapping`, when vLLM
# sets it on the config, is consulted too.
FUSED_LAYERS = {
    "to_qkv": ["to_q", "to_k", "to_v"],
    "add_kv_proj": ["add_q_proj", "add_k_proj", "add_v_proj"],
    "w13": ["w1", "w3"],
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}

# vLLM's shard ids of fused layers, in order.
_QKV_IDS = ("q", "k", "v")


def _split(spec: dict) -> tuple[str, dict, dict]:
    """(scheme name, scheme params, integration options) from a flat spec."""
    spec = dict(spec)
    for key in ("quant_method", "method"):
        m = spec.pop(key, None)
        if m is not None and str(m).lower().replace("-", "_") != METHOD:
            raise OmniqError(f"omniq: this config is for quant_method 'omniq', not {m!r}")
    scheme = spec.pop("scheme", "int8")
    opts = {k: spec.pop(k) for k in CONFIG_KEYS if k in spec}
    return scheme, spec, opts


@register_quantization_config(METHOD)
class OmniqConfig(QuantizationConfig):
    """Any omniq scheme as a vLLM quantization method.

    scheme: an omniq scheme name (`omniq.list_schemes()`), its parameters as further keys.
    ignored_layers: layer prefixes kept in full precision (vLLM's UnquantizedLinearMethod);
        an entry matches a layer whose prefix equals it, ends with ".<entry>", or contains
        it between dots ("img_mlp"); fused layers (to_qkv, w13, add_kv_proj) are matched by
        their own name or any shard's (to_q, w1, ...), and a fused layer is skipped whole.
    kernel: force one omniq kernel for every quantized layer; a layer it cannot run is a
        load-time error naming the layer and the reason.
    is_checkpoint_serialized: the checkpoint holds the scheme's tensors (pre-quantized);
        False (default) quantizes a BF16/FP16 checkpoint while it loads.
    """

    # Callables returning (where, quantization_config dict) of the checkpoint being loaded,
    # or None; vllm_omni.py adds one that reads the transformer's config.json.
    checkpoint_config_sources: list[Callable[[], tuple[str, dict] | None]] = []

    def __init__(self, scheme: str = "int8", ignored_layers: list[str] | None = None, kernel: str | None = None,
                 is_checkpoint_serialized: bool = False, modules_to_not_convert: list[str] | None = None,
                 **scheme_params):
        super().__init__()
        self.scheme_name = scheme
        self.scheme_params = dict(scheme_params)
        self.scheme = omniq.get_scheme(scheme, **scheme_params)  # unknown scheme / parameter: OmniqError
        if isinstance(ignored_layers, str):
            ignored_layers = [ignored_layers]
        ignored = list(ignored_layers or []) + list(modules_to_not_convert or [])
        if any(not isinstance(x, str) for x in ignored):
            raise OmniqError(f"omniq: ignored_layers must be a list of layer names; got {ignored!r}")
        self.ignored_layers = ignored
        if kernel is not None:
            try:
                omniq.get_kernel(kernel)
            except KernelError as e:
                raise OmniqError(f"omniq: kernel={kernel!r}: {e}") from None
        self.kernel = kernel
        self.is_checkpoint_serialized = bool(is_checkpoint_serialized)
        static = [t for t, s in self.scheme.tensor_specs(256, 1024).items()
                  if t.startswith("input_") and not s.optional]
        if static and not self.is_checkpoint_serialized and "input_scale" not in scheme_params:
            log.warning("omniq: %s quantizes activations with static %s, which online quantization cannot "
                        "calibrate: it uses the scheme's placeholder (input_scale=1.0). Pass input_scale=..., or "
                        "load a calibrated checkpoint (omniq.integrations.vllm_omni.quantize_state_dict with "
                        "activations=...)", self.scheme.key, static)
        self._checked_checkpoint = False
        self.skipped_layers: dict[str, str] = {}  # prefix -> why it stays in full precision

    # ---- QuantizationConfig --------------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the dispatcher decides per device; the reference kernel runs anywhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "OmniqConfig":
        scheme, params, opts = _split(config)
        opts.pop("quant_method", None)
        opts.pop("method", None)
        return cls(scheme=scheme, **opts, **params)

    @classmethod
    def from_config_dict_json(cls, text: str) -> "OmniqConfig":
        """Plain vLLM: `LLM(..., quantization="omniq",
        hf_overrides={"quantization_config_dict_json": '{"scheme": "int8"}'})`."""
        import json
        return cls.from_config(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` a checkpoint of this config declares in its config.json."""
        d = {"quant_method": METHOD, "scheme": self.scheme_name, **self.scheme_params}
        if self.ignored_layers:
            d["ignored_layers"] = list(self.ignored_layers)
        if self.is_checkpoint_serialized:
            d["is_checkpoint_serialized"] = True
        return d

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.ignored_layers:
            self.ignored_layers = hf_to_vllm_mapper.apply_list(self.ignored_layers)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        import json
        import os
        for sub in ("transformer", ""):
            path = os.path.join(str(model_name), sub, "config.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    qc = json.load(f).get("quantization_config")
                if qc is not None:
                    self.check_checkpoint_config(qc, path)
                return

    def __repr__(self) -> str:
        return f"OmniqConfig({self.scheme.key}, serialized={self.is_checkpoint_serialized}, kernel={self.kernel})"

    # ---- checkpoint agreement --------------------------------------------------------------
    def check_checkpoint_config(self, disk: dict | str, source: str = "the checkpoint") -> None:
        """Refuse a checkpoint whose quantization disagrees with this request; adopt what an
        omniq checkpoint says about itself (serialized, its full-precision layers)."""
        if isinstance(disk, str):
            disk = {"quant_method": disk}
        method = str(disk.get("quant_method", disk.get("method", ""))).lower().replace("-", "_")
        if method != METHOD:
            raise OmniqError(
                f"{source} declares quant_method={method!r} but the request is omniq {self.scheme.key}: "
                f"its tensors are in another method's format. Omit the quantization request to load it "
                f"with its own method, or quantize the BF16 checkpoint with omniq instead")
        name, params, opts = _split(disk)
        try:
            theirs = omniq.get_scheme(name, **params)
        except OmniqError as e:
            raise OmniqError(f"{source}: its omniq quantization_config is invalid: {e}") from None
        if theirs.key != self.scheme.key:
            raise OmniqError(f"{source} holds omniq {theirs.key} but the request is {self.scheme.key}; omit "
                             f"the request (the checkpoint's config is used) or request the same scheme")
        if opts.get("is_checkpoint_serialized") and not self.is_checkpoint_serialized:
            log.info("omniq: %s is pre-quantized; adopting its tensors", source)
            self.is_checkpoint_serialized = True
        for layer in opts.get("ignored_layers") or []:
            if layer not in self.ignored_layers:
                self.ignored_layers.append(layer)

    def _check_checkpoint_once(self) -> None:
        if self._checked_checkpoint:
            return
        self._checked_checkpoint = True
        for source in self.checkpoint_config_sources:
            found = source()
            if found is not None:
                self.check_checkpoint_config(found[1], found[0])
                return

    # ---- layer selection -----------------------------------------------------------------
    def fused_shards(self, prefix: str) -> list[str] | None:
        last = prefix.rsplit(".", 1)[-1]
        return (self.packed_modules_mapping or {}).get(last) or FUSED_LAYERS.get(last)

    def is_ignored(self, prefix: str) -> bool:
        names = [prefix]
        shards = self.fused_shards(prefix)
        if shards:
            head = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
            names += [head + s for s in shards]
        return any(_matches(n, entry) for n in names for entry in self.ignored_layers)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        self._check_checkpoint_once()
        if self.is_ignored(prefix):
            self.skipped_layers[prefix] = "in ignored_layers"
            return UnquantizedLinearMethod()
        why = self._shape_problem(layer, prefix)
        if why is not None:
            self.skipped_layers[prefix] = why
            log.warning("omniq: layer %r stays in full precision: %s", prefix, why)
            return UnquantizedLinearMethod()
        cls = OmniqLinearMethod if self.is_checkpoint_serialized else OmniqOnlineLinearMethod
        return cls(self, prefix)

    def _shape_problem(self, layer: LinearBase, prefix: str) -> str | None:
        """Why the scheme cannot store this layer at all (it then stays in full precision), or
        None. A layer the scheme can store whole but not split as tensor parallelism splits it
        is an error: silently dropping it to full precision would hide a TP choice's cost."""
        k = layer.input_size
        widths = list(getattr(layer, "output_sizes", None) or [layer.output_size])
        mult = self.scheme.k_multiple
        if mult > 1 and k % mult:
            return f"K={k} is not a multiple of {self.scheme.name}'s block of {mult}"
        try:
            self.scheme.tensor_specs(sum(widths), k)
        except OmniqError as e:
            return str(e)
        row = isinstance(layer, RowParallelLinear)
        column = isinstance(layer, ColumnParallelLinear)
        tp = getattr(layer, "tp_size", 1) if (row or column) else 1  # replicated layers are not split
        k_local = k // tp if row else k
        local = [w // tp for w in widths] if column else widths
        try:
            if mult > 1 and k_local % mult:
                raise OmniqError(f"K={k_local} is not a multiple of the block of {mult}")
            specs = self.scheme.tensor_specs(sum(local), k_local)
        except OmniqError as e:
            raise OmniqError(f"{where(prefix)}tensor_parallel_size={tp} splits this {sum(widths)}x{k} layer into "
                             f"{sum(local)}x{k_local} per rank, which {self.scheme.name} cannot store: {e}") from None
        if not self.is_checkpoint_serialized:
            return None  # online, each rank quantizes its own shard as one tensor
        for t, s in specs.items():
            if tp > 1 and row and s.in_dim is not None and k_local % s.in_step:
                raise OmniqError(f"{where(prefix)}tensor_parallel_size={tp} gives each rank K={k_local} input "
                                 f"features, not a multiple of {s.in_step} ({t!r} has one entry per {s.in_step}); "
                                 f"row-parallel shards must split on group boundaries: choose a TP size or "
                                 f"group size that divides K={k} into multiples of {s.in_step}")
            split = len(local) > 1 or (tp > 1 and column)
            if split and s.out_dim is not None and not s.per_tensor and any(w % s.out_step for w in local):
                raise OmniqError(f"{where(prefix)}{t!r} packs {s.out_step} output features per entry but this "
                                 f"layer's checkpoint shards are {local} wide per rank; each must be a multiple "
                                 f"of {s.out_step} to load")
        return None


def _matches(prefix: str, entry: str) -> bool:
    entry = entry.strip(".")
    return prefix == entry or prefix.endswith("." + entry) or f".{entry}." in f".{prefix}."


# ---- parameters -------------------------------------------------------------------------------
def _make_param(spec: TensorSpec, shape: tuple[int, ...], loader, device=None) -> BasevLLMParameter:
    """The vLLM parameter class whose load_* methods shard this storage tensor correctly."""
    data = torch.empty(shape, dtype=spec.dtype, device=device)
    kw: dict[str, Any] = dict(data=data, weight_loader=loader)
    if spec.per_tensor:
        return PerTensorScaleParameter(**kw)
    packed = spec.out_dim is not None and spec.out_step > 1
    if spec.in_dim is not None and spec.out_dim is not None:
        if packed:
            return PackedvLLMParameter(input_dim=spec.in_dim, output_dim=spec.out_dim, packed_dim=spec.out_dim,
                                       packed_factor=spec.out_step, **kw)
        return GroupQuantScaleParameter(input_dim=spec.in_dim, output_dim=spec.out_dim, **kw)
    if spec.out_dim is not None:
        if packed:
            return PackedColumnParameter(output_dim=spec.out_dim, packed_dim=spec.out_dim,
                                         packed_factor=spec.out_step, **kw)
        return ChannelQuantScaleParameter(output_dim=spec.out_dim, **kw)
    if spec.in_dim is not None:
        return RowvLLMParameter(input_dim=spec.in_dim, **kw)
    return BasevLLMParameter(**kw)


def _shard_ids(layer) -> list:
    widths = layer.logical_widths
    if len(widths) == 1:
        return [None]
    return list(_QKV_IDS) if isinstance(layer, QKVParallelLinear) else list(range(len(widths)))


def _shard_name(config: OmniqConfig, prefix: str, sid) -> str:
    shards = config.fused_shards(prefix)
    idx = _QKV_IDS.index(sid) if isinstance(sid, str) else sid
    if shards and idx is not None and idx < len(shards):
        head = prefix.rsplit(".", 1)[0]
        return f"{head}.{shards[idx]}"
    return f"{prefix}[shard {sid}]"


class OmniqLinearMethod(LinearMethodBase):
    """A layer quantized by omniq, loaded from a pre-quantized checkpoint."""

    uses_meta_device = False
    supports_offload_after_quant = False  # the prepared weight is not a module parameter

    def __init__(self, config: OmniqConfig, prefix: str):
        self.config = config
        self.scheme = config.scheme
        self.prefix = prefix

    # ---- weights ----------------------------------------------------------------------------
    def _common(self, layer, input_size_per_partition, output_partition_sizes, params_dtype):
        layer.logical_widths = list(output_partition_sizes)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = sum(output_partition_sizes)
        layer.orig_dtype = params_dtype
        layer.omniq_prefix = self.prefix

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        self._common(layer, input_size_per_partition, output_partition_sizes, params_dtype)
        n, k = layer.output_size_per_partition, input_size_per_partition
        specs = self.scheme.tensor_specs(n, k)
        loader = extra_weight_attrs.get("weight_loader")
        layer.omniq_specs = specs
        layer.omniq_loaded = {}
        for t, spec in specs.items():
            if t == "bias":
                continue  # the layer owns `bias`; a scheme's "bias" is the same checkpoint tensor
            shape = (len(output_partition_sizes),) if spec.per_tensor else spec.shape
            param = _make_param(spec, shape, self._recording_loader(layer, t, spec, loader))
            if spec.optional:
                param.is_checkpoint_optional = True
            layer.register_parameter(t, param)

    def _recording_loader(self, layer, tname: str, spec: TensorSpec, inner):
        prefix = self.prefix

        def load(param, loaded_weight, *args, **kwargs):
            ok = (spec.dtype, *spec.also_accepts)
            if loaded_weight.dtype not in ok:
                raise OmniqError(f"{where(prefix)}checkpoint tensor {tname!r} has dtype {loaded_weight.dtype}; "
                                 f"{self.scheme.name} stores it as {' or '.join(map(str, ok))}")
            try:
                res = inner(param, loaded_weight, *args, **kwargs)
            except AssertionError:
                raise OmniqError(f"{where(prefix)}checkpoint tensor {tname!r} has shape "
                                 f"{tuple(loaded_weight.shape)}, which does not fit the layer's "
                                 f"{tuple(param.shape)} {self.scheme.key} storage (shard {args[0] if args else None})"
                                 ) from None
            sid = args[0] if args else kwargs.get("loaded_shard_id")
            layer.omniq_loaded.setdefault(tname, set()).add(sid)
            return res

        return load

    # ---- after loading ------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "omniq", None) is not None:
            return
        folded = "bias" in layer.omniq_specs
        self._finish(layer, self._gather(layer), folded)

    def _missing_shards(self, layer, tname: str) -> list:
        got = layer.omniq_loaded.get(tname, set())
        if None in got:
            return []
        return [s for s in _shard_ids(layer) if s not in got]

    def _gather(self, layer) -> QuantizedWeight:
        specs: dict[str, TensorSpec] = layer.omniq_specs
        n, k = layer.output_size_per_partition, layer.input_size_per_partition
        tensors: dict[str, torch.Tensor] = {}
        per_shard: dict[str, torch.Tensor] = {}
        for t, spec in specs.items():
            if t == "bias":
                continue
            missing = self._missing_shards(layer, t)
            param = layer._parameters.pop(t)
            if missing:
                if spec.optional and not layer.omniq_loaded.get(t):
                    continue
                names = [f"{_shard_name(self.config, self.prefix, s)}.{t}" if s is not None else f"{self.prefix}.{t}"
                         for s in missing]
                raise OmniqError(f"{where(self.prefix)}the checkpoint has no {t!r} for this layer "
                                 f"(missing {names}); a {self.scheme.key} checkpoint stores it for every "
                                 f"quantized layer: re-export the checkpoint, or list the layer in ignored_layers "
                                 f"and load a full-precision weight for it")
            data = param.data
            if spec.per_tensor:
                if data.numel() > 1 and not bool((data == data[:1]).all()):
                    per_shard[t] = data
                tensors[t] = data[:1].clone()
            else:
                tensors[t] = data
        self._adapt_to_rank(layer, tensors)
        if per_shard:
            return self._reconcile(layer, tensors, per_shard)
        return QuantizedWeight(self.scheme, (n, k), tensors, name=self.prefix)

    def _adapt_to_rank(self, layer, tensors: dict) -> None:
        """Checkpoint conventions that depend on where the layer's K-shard sits."""
        row = isinstance(layer, RowParallelLinear) and getattr(layer, "tp_size", 1) > 1
        if "g_idx" in tensors:
            g_idx = tensors["g_idx"].to(torch.int32)
            if row:  # group numbers are global; this rank holds groups [first, first + G_local)
                g_idx = g_idx - g_idx.min()
            groups = tensors["scales"].shape[0] if "scales" in tensors else None
            if groups is not None and bool((g_idx >= groups).any()):
                raise OmniqError(f"{where(self.prefix)}g_idx (act-order) spreads this rank's input features over "
                                 f"groups stored on other ranks; a row-parallel layer needs contiguous groups: "
                                 f"load this checkpoint with tensor_parallel_size=1")
            tensors["g_idx"] = g_idx
        if row and layer.tp_rank > 0 and "quant_bias" in tensors:
            # msModelSlim's quant_bias holds corrections over the full K: add it on one rank only
            tensors["quant_bias"] = torch.zeros_like(tensors["quant_bias"])

    def _shard_weights(self, layer, tensors: dict, per_shard: dict) -> list[QuantizedWeight]:
        """The fused layer's checkpoint shards as separate QuantizedWeights, each with its own
        per-tensor values."""
        specs = layer.omniq_specs
        k = layer.input_size_per_partition
        out, off = [], 0
        for i, (w, sid) in enumerate(zip(layer.logical_widths, _shard_ids(layer))):
            part = {}
            for t, v in tensors.items():
                s = specs[t]
                if t in per_shard:
                    part[t] = per_shard[t][i:i + 1].clone()
                elif s.out_dim is not None and not s.per_tensor:
                    part[t] = v.narrow(s.out_dim, off // s.out_step, math.ceil(w / s.out_step))
                else:
                    part[t] = v
            out.append(QuantizedWeight(self.scheme, (w, k), part, name=f"{self.prefix}[{sid}]"))
            off += w
        return out

    def _merge(self, layer, shards: list[QuantizedWeight]) -> QuantizedWeight:
        specs = layer.omniq_specs
        tensors = {}
        for t in shards[0].tensors:
            s = specs[t]
            if s.out_dim is not None and not s.per_tensor:
                tensors[t] = torch.cat([q.tensors[t] for q in shards], dim=s.out_dim)
            else:
                tensors[t] = shards[0].tensors[t]
        return QuantizedWeight(self.scheme, (layer.output_size_per_partition, layer.input_size_per_partition),
                               tensors, name=self.prefix)

    def _activation_range(self, layer, shards: list[QuantizedWeight]) -> torch.Tensor:
        """Sample activations spanning the union of the shards' static activation ranges: each
        shard's range is read off its own quantizer (a huge ramp saturates at its ends)."""
        k = layer.input_size_per_partition
        probe = torch.tensor([[-1e30] * k, [1e30] * k], dtype=torch.float32)
        lo, hi = 0.0, 0.0
        for q in shards:
            y = self.scheme.quantize_activation(probe, q)
            lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
        return torch.tensor([[lo] * k, [hi] * k], dtype=torch.float32)

    def _reconcile(self, layer, tensors: dict, per_shard: dict) -> QuantizedWeight:
        """One set of per-tensor values for a fused layer whose shards carry different ones."""
        shards = self._shard_weights(layer, tensors, per_shard)
        has_act = any(t.startswith("input_") for t in tensors)
        weight_side = sorted(t for t in per_shard if not t.startswith("input_"))
        if weight_side:
            log.info("omniq: layer %r: its shards carry different %s; dequantized and requantized the fused "
                     "weight to one scale", self.prefix, weight_side)
            w = torch.cat([self.scheme.dequantize(q) for q in shards])
            qw = self.scheme.quantize(w, name=self.prefix)
            if has_act:
                qw = self.scheme.calibrate(qw, self._activation_range(layer, shards))
            return QuantizedWeight(self.scheme, qw.shape, qw.tensors, name=self.prefix)
        log.info("omniq: layer %r: its shards carry different static activation parameters %s; using ones that "
                 "cover every shard's range", self.prefix, sorted(per_shard))
        x = self._activation_range(layer, shards)
        return self._merge(layer, [self.scheme.calibrate(q, x) for q in shards])

    def _finish(self, layer, qw: QuantizedWeight, folded_bias: bool) -> None:
        device = qw.device if qw.device.type != "meta" else torch.device("cpu")
        act_dtype = layer.orig_dtype if layer.orig_dtype.is_floating_point else torch.bfloat16
        # a forced kernel that cannot run this layer raises KernelError naming it, now
        prepared = omniq.prepare(qw, device, act_dtype=act_dtype, kernel=self.config.kernel)
        layer.omniq = prepared
        # msModelSlim checkpoints fold the float bias into quant_bias: adding it again doubles it
        layer.omniq_folded_bias = folded_bias
        layer.omniq_specs = None

    # ---- forward ------------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        p = layer.omniq
        if layer.omniq_folded_bias:
            bias = None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = omniq.linear(x2, p, bias)  # a configured kernel is pinned in the prepared layer
        return y.reshape(*lead, y.shape[-1])


class OmniqOnlineLinearMethod(OmniqLinearMethod):
    """A layer quantized by omniq while a BF16/FP16 checkpoint loads.

    The weight starts on the meta device; the first shard that arrives materializes it, and
    the shard that completes it quantizes the layer and frees the full-precision copy, so
    loading holds about one layer in full precision above the quantized model.
    """

    uses_meta_device = True  # tells vLLM's loaders that layers finish during load_weights

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        self._common(layer, input_size_per_partition, output_partition_sizes, params_dtype)
        layer.omniq_specs = self.scheme.tensor_specs(layer.output_size_per_partition, input_size_per_partition)
        inner = extra_weight_attrs.get("weight_loader")
        layer.omniq_load_device = torch.get_default_device()
        layer.omniq_loaded_numel = 0
        layer.omniq_loaded = {"weight": set()}
        weight = ModelWeightParameter(
            data=torch.empty(layer.output_size_per_partition, input_size_per_partition, dtype=params_dtype,
                             device="meta"),
            input_dim=1, output_dim=0, weight_loader=self._lazy_loader(layer, inner))
        layer.register_parameter("weight", weight)

    def _lazy_loader(self, layer, inner):
        def load(param, loaded_weight, *args, **kwargs):
            if getattr(layer, "omniq", None) is not None:
                raise OmniqError(f"{where(self.prefix)}a weight shard arrived after the layer was complete and "
                                 f"quantized (duplicate checkpoint tensor?)")
            if not loaded_weight.is_floating_point():
                raise OmniqError(f"{where(self.prefix)}checkpoint weight has dtype {loaded_weight.dtype}: online "
                                 f"{self.scheme.name} quantizes a floating-point checkpoint. For a pre-quantized "
                                 f"one, set is_checkpoint_serialized=true")
            if layer.weight.device.type == "meta":
                self._materialize(layer, layer.omniq_load_device)
            counter = CopyCounter()
            with counter:
                res = inner(layer.weight, loaded_weight, *args, **kwargs)
            layer.omniq_loaded_numel += counter.copied_numel
            layer.omniq_loaded["weight"].add(args[0] if args else kwargs.get("loaded_shard_id"))
            if layer.omniq_loaded_numel >= layer.weight.numel():
                self._quantize(layer)
                layer._already_called_process_weights_after_loading = True
            return res

        return load

    @staticmethod
    def _materialize(layer, device) -> None:
        old = layer.weight
        new = ModelWeightParameter(data=torch.empty_like(old, device=device), input_dim=1, output_dim=0,
                                   weight_loader=old.weight_loader)
        new.tp_rank, new.tp_size = old.tp_rank, old.tp_size
        layer.register_parameter("weight", new)

    def _quantize(self, layer) -> None:
        w = layer._parameters.pop("weight").data
        qw = self.scheme.quantize(w, name=self.prefix)
        del w
        self._finish(layer, qw, folded_bias=False)

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "omniq", None) is not None:
            return
        weight = layer.weight
        if weight.device.type == "meta":
            # never loaded (dummy load format): random weights as vLLM's dummy loader makes
            from vllm.model_executor.model_loader.weight_utils import initialize_single_dummy_weight
            log.warning("omniq: layer %r received no weight; quantizing a dummy one", self.prefix)
            self._materialize(layer, layer.omniq_load_device)
            initialize_single_dummy_weight(layer.weight)
        elif layer.omniq_loaded_numel < weight.numel():
            missing = self._missing_shards(layer, "weight")
            names = [f"{_shard_name(self.config, self.prefix, s)}.weight" for s in missing] or [self.prefix]
            raise OmniqError(f"{where(self.prefix)}the checkpoint filled {layer.omniq_loaded_numel} of "
                             f"{weight.numel()} weight elements (missing {names}); cannot quantize a partial weight")
        self._quantize(layer)


register_weight_loader_v2_supported_method(OmniqLinearMethod)
register_weight_loader_v2_supported_method(OmniqOnlineLinearMethod)


def stored_nbytes(layer: torch.nn.Module) -> int:
    """Bytes of the quantized weight a layer holds (its prepared layout), 0 if not omniq's."""
    p = getattr(layer, "omniq", None)
    return 0 if p is None else p.nbytes
