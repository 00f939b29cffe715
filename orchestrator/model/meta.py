"""What placement knows about a model: exact bytes per layer and which file holds which layer.

Everything here comes from three kinds of small reads — ``config.json``,
``model.safetensors.index.json`` and each weight file's safetensors header — so a 420 GB model
is measured without reading its weights. Bytes are attributed the way mlx-lm loads them
(``mlx_lm.utils.sharded_load``): a tensor whose name contains ``layers.N.`` belongs to layer N,
and every other tensor (embeddings, final norm, lm_head) is loaded by *every* rank. Layers are
never assumed equal: DeepSeek-R1's dense layers are 0.36 GB and its MoE layers 7.2 GB.

`build_meta` is pure (parsed inputs in, `ModelMeta` out); `load_local_meta` reads a directory;
the Hub reader lives in `hub.py` and feeds the same `build_meta`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelError
from orchestrator.model.safetensors import Header, read_header

# mlx_lm.utils.sharded_load's rule, verbatim: the first `layers.N.` in a tensor name.
LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# KV cache entries are stored in the activation dtype (bf16/f16 for served models).
KV_ELEMENT_BYTES = 2


@dataclass(frozen=True)
class Footprint:
    """Bytes of a group of tensors (one layer, or the tensors every rank holds).

    ``total`` is what sits in memory; ``active`` is what one decoded token reads (for MoE
    layers only the routed experts' share); ``packed`` is the part stored as quantized
    ``uint32`` words, the part that shrinks if the model is re-quantized to fewer bits.
    """

    total: int = 0
    active: int = 0
    packed: int = 0

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.total + other.total, self.active + other.active,
                         self.packed + other.packed)


@dataclass(frozen=True)
class LoadedTensor:
    """One tensor a rank loads (MTP layers past ``num_layers`` are left out): for the tensor
    split, which shards each tensor by its name and shape (`placement.shard`)."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    active: int  # bytes one decoded token reads (routed experts: the top-k share)
    layer: int | None  # None: the tensors every pipeline rank holds


@dataclass(frozen=True)
class ModelFile:
    """One weight file and what a rank needs it for."""

    name: str  # as in weight_map: relative to the model root
    size: int  # bytes of the complete file, header included
    layers: tuple[int, ...]  # layer numbers of the tensors weight_map puts in it, sorted
    shared: bool  # holds a tensor without a layer number, so every rank needs it
    sha256: str | None = None  # the Hub's LFS oid; None for a local directory


@dataclass(frozen=True)
class ModelMeta:
    """A model's memory shape, as placement needs it."""

    source: str  # the directory, or "repo@revision"
    model_type: str | None
    num_layers: int
    layers: tuple[Footprint, ...]  # index = layer number
    shared: Footprint  # loaded by every rank
    unused_bytes: int  # tensors of layers >= num_layers (e.g. DeepSeek's MTP), loaded by no rank
    files: tuple[ModelFile, ...]
    num_parameters: int
    bits: int | None = None  # quantization, if any
    group_size: int | None = None
    kv_bytes_per_token_layer: int | None = None  # one token's KV cache in one layer
    estimated: bool = False  # built from a parameter count (the guide's formula), not headers
    tensors: tuple[LoadedTensor, ...] = ()  # every loaded tensor, in file then header order
    num_heads: int | None = None  # attention heads (config.json), which the tensor split divides
    num_kv_heads: int | None = None
    hidden_size: int | None = None  # one token's activation width: what an all-reduce sends

    @property
    def total_bytes(self) -> int:
        """Bytes of all weight files: what a full download is."""
        return sum(f.size for f in self.files)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor once, as one machine holding the whole model would."""
        return self.shared.total + sum(layer.total for layer in self.layers)


def files_for_layers(meta: ModelMeta, start: int, end: int) -> tuple[str, ...]:
    """The files a rank holding layers ``start <= n < end`` loads, exactly as mlx-lm picks them.

    A file is needed when it holds any tensor without a layer number, or any tensor of a layer
    in the range. Missing one is silent in mlx-lm (``strict=False`` leaves random weights), so
    this list is what must be present and verified on the node.
    """
    return tuple(f.name for f in meta.files
                 if f.shared or any(start <= n < end for n in f.layers))


def layer_of(tensor_name: str) -> int | None:
    """The layer number mlx-lm assigns a tensor, or None for tensors every rank loads."""
    match = LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def build_meta(
    source: str,
    config: Mapping[str, Any],
    weight_map: Mapping[str, str],
    headers: Mapping[str, Header],
    *,
    sizes: Mapping[str, int] | None = None,
    sha256: Mapping[str, str] | None = None,
) -> ModelMeta:
    """Combine the parsed config, index and headers into a `ModelMeta`; pure.

    ``headers`` must have an entry for every file ``weight_map`` names (the readers check that
    the files exist first, so the error names the missing file rather than a tensor).
    ``sizes`` overrides the file sizes implied by the headers (the Hub's tree API gives them).
    """
    file_names = sorted(set(weight_map.values()))
    tensors_by_file = {name: {t.name: t for t in headers[name].tensors} for name in file_names}
    for tensor, file in weight_map.items():
        if tensor not in tensors_by_file[file]:
            raise ModelError(f"{source}: {INDEX_FILE} puts {tensor!r} in {file}, "
                             f"but that file's header has no such tensor")

    num_layers = _num_layers(config, weight_map, source)
    bits, group_size = _quantization(config)
    experts, active_experts = _experts(config)
    layers = [Footprint()] * num_layers
    shared = Footprint()
    unused = 0
    parameters = 0
    loaded: list[LoadedTensor] = []
    for file in file_names:
        by_name = tensors_by_file[file]
        for t in by_name.values():
            packed = (t.dtype == "U32" and t.name.endswith(".weight")
                      and f"{t.name[:-len('weight')]}scales" in by_name)
            is_quant_meta = (t.name.endswith((".scales", ".biases"))
                             and f"{t.name.rsplit('.', 1)[0]}.weight" in by_name
                             and by_name[f"{t.name.rsplit('.', 1)[0]}.weight"].dtype == "U32")
            elements = math.prod(t.shape)
            if packed and bits:
                parameters += elements * 32 // bits
            elif not is_quant_meta:
                parameters += elements
            active = t.nbytes
            if experts and _is_routed_expert(t.name):
                active = t.nbytes * active_experts // experts
            layer = layer_of(t.name)
            if layer is None and "embed_tokens" in t.name and _has_head(weight_map):
                active = 0  # an embedding lookup reads one row per token, not the table
            part = Footprint(t.nbytes, active, t.nbytes if packed else 0)
            if layer is None or layer < num_layers:
                loaded.append(LoadedTensor(t.name, t.shape, t.nbytes, active, layer))
            if layer is None:
                shared += part
            elif layer < num_layers:
                layers[layer] += part
            else:
                unused += t.nbytes
    empty = [n for n, fp in enumerate(layers) if fp.total == 0]
    if empty:
        raise ModelError(f"{source}: the checkpoint has no weights for layers {_ranges(empty)} "
                         f"of {num_layers} (config.json num_hidden_layers); mlx-lm refuses it too")

    file_layers: dict[str, set[int]] = {name: set() for name in file_names}
    file_shared: set[str] = set()
    for tensor, file in weight_map.items():
        layer = layer_of(tensor)
        if layer is None:
            file_shared.add(file)
        else:
            file_layers[file].add(layer)
    files = tuple(
        ModelFile(name=name,
                  size=(sizes or {}).get(name, headers[name].file_bytes),
                  layers=tuple(sorted(file_layers[name])),
                  shared=name in file_shared,
                  sha256=(sha256 or {}).get(name))
        for name in file_names)
    return ModelMeta(
        source=source,
        model_type=_str_or_none(config.get("model_type")),
        num_layers=num_layers,
        layers=tuple(layers),
        shared=shared,
        unused_bytes=unused,
        files=files,
        num_parameters=parameters,
        bits=bits,
        group_size=group_size,
        kv_bytes_per_token_layer=_kv_bytes_per_token_layer(config),
        tensors=tuple(loaded),
        num_heads=_get_int(config, "num_attention_heads"),
        num_kv_heads=_get_int(config, "num_key_value_heads"),
        hidden_size=_get_int(config, "hidden_size"),
    )


def requantized(meta: ModelMeta, bits: int) -> ModelMeta:
    """Estimate the same model quantized to ``bits``: packed weights scale, scales stay.

    Used only to suggest "fewer bits would fit"; the source says it is an estimate.
    """
    old_bits = meta.bits
    if not old_bits:
        raise ValueError("only a quantized model can be re-quantized")

    def scale(fp: Footprint) -> Footprint:
        packed = fp.packed * bits // old_bits
        delta = fp.packed - packed
        active_delta = delta * fp.active // fp.total if fp.total else 0
        return Footprint(fp.total - delta, fp.active - active_delta, packed)

    return replace(meta, source=f"{meta.source} re-quantized to {bits}-bit (estimate)",
                   layers=tuple(scale(fp) for fp in meta.layers), shared=scale(meta.shared),
                   bits=bits, tensors=())  # no headers: no exact tensor split


def load_local_meta(root: Path) -> ModelMeta:
    """Read a local model directory: config, index, headers. Never reads weights.

    A directory without an index (a single ``model.safetensors``) gets one built from the
    headers, as mlx-lm's loader would glob ``model*.safetensors``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist")
    config = _read_json(root / CONFIG_FILE)
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map = _weight_map(_read_json(index_path), str(index_path))
        missing = sorted(f for f in set(weight_map.values()) if not (root / f).is_file())
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more"
                                               if len(missing) > 10 else "")
            raise ModelError(f"{root}: {INDEX_FILE} names {len(missing)} weight "
                             f"file{'s' if len(missing) != 1 else ''} that "
                             f"{'are' if len(missing) != 1 else 'is'} missing: {shown}")
        headers = {f: read_header(root / f) for f in sorted(set(weight_map.values()))}
    else:
        found = sorted(p.name for p in root.glob("model*.safetensors"))
        if not found:
            raise ModelError(f"{root}: no {INDEX_FILE} and no model*.safetensors files")
        headers = {f: read_header(root / f) for f in found}
        weight_map = {t.name: f for f, h in headers.items() for t in h.tensors}
    return build_meta(str(root), config, weight_map, headers)


def parse_weight_map(raw: bytes, where: str) -> dict[str, str]:
    """Decode ``model.safetensors.index.json`` bytes to its weight_map."""
    return _weight_map(_loads(raw, where), where)


def parse_config(raw: bytes, where: str) -> dict[str, Any]:
    """Decode ``config.json`` bytes."""
    config = _loads(raw, where)
    if not isinstance(config, dict):
        raise ModelError(f"{where}: expected a JSON object")
    return config


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return _loads(raw, str(path))


def _loads(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: not valid JSON ({exc})") from None


def _weight_map(index: Any, where: str) -> dict[str, str]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise ModelError(f"{where}: expected a non-empty \"weight_map\" of tensor name -> file")
    for file in set(weight_map.values()):
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise ModelError(f"{where}: weight file {file!r} is outside the model directory")
    return weight_map


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else {}


def _get_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for source in (config, _text_config(config)):
        for key in keys:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _num_layers(config: Mapping[str, Any], weight_map: Mapping[str, str], source: str) -> int:
    declared = _get_int(config, "num_hidden_layers", "n_layer", "num_layers")
    if declared is not None and declared > 0:
        return declared
    seen = [n for n in map(layer_of, weight_map) if n is not None]
    if not seen:
        raise ModelError(f"{source}: config.json has no num_hidden_layers and no tensor is "
                         "named `layers.N.`; this model cannot be split into pipeline stages")
    return max(seen) + 1


def _quantization(config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, Mapping) and isinstance(q.get("bits"), int):
            group = q.get("group_size")
            return int(q["bits"]), group if isinstance(group, int) else None
    return None, None


def _experts(config: Mapping[str, Any]) -> tuple[int, int]:
    experts = _get_int(config, "n_routed_experts", "num_local_experts", "num_experts")
    active = _get_int(config, "num_experts_per_tok", "moe_top_k")
    if experts and active:
        return experts, min(active, experts)
    return 0, 0


def _is_routed_expert(name: str) -> bool:
    return ".switch_mlp." in name or ".experts." in name


def _has_head(weight_map: Iterable[str]) -> bool:
    return any("lm_head" in name for name in weight_map)


def _kv_bytes_per_token_layer(config: Mapping[str, Any]) -> int | None:
    """One token's KV cache in one layer: MLA caches the latent, others K and V per KV head."""
    latent = _get_int(config, "kv_lora_rank")
    if latent:
        return (latent + (_get_int(config, "qk_rope_head_dim") or 0)) * KV_ELEMENT_BYTES
    heads = _get_int(config, "num_attention_heads")
    kv_heads = _get_int(config, "num_key_value_heads") or heads
    hidden = _get_int(config, "hidden_size")
    head_dim = _get_int(config, "head_dim") or (hidden // heads if hidden and heads else None)
    if kv_heads and head_dim:
        return 2 * kv_heads * head_dim * KV_ELEMENT_BYTES
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5", so a message about 58 layers stays one line."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)

