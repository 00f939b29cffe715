"""The sandbox's tiny deepseek_v3 model, written with the standard library alone.

Why: `orch` itself never needs mlx (the nodes get it from the wheelhouse), so `orch sandbox up`
must work from a plain ``pip install -e .``. safetensors is a simple format (an 8-byte
little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then
the raw little-endian tensors), and a byte-level BPE tokenizer with no merges is a JSON file,
so neither mlx nor tokenizers is needed to write them.

The model is `tiny_model.make_tiny_deepseek`'s: the same config, tensor names, shapes and
dtype (float32), the same cut of the weights into files by bytes, the same tokenizer file
(tested equal to what the tokenizers library writes). Only the random values differ: they
come from Python's seeded `random`, initialised as mlx-lm initialises its modules (uniform
±1/sqrt(fan-in) for linear layers, ones for norms, zeros for the router's bias).
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from array import array
from bisect import bisect_left
from itertools import accumulate
from pathlib import Path
from typing import Any

from orchestrator.simulator.tiny_model import BOS, CHAT_TEMPLATE, EOS, tiny_config

Shape = tuple[int, ...]


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table (what tokenizers' ByteLevel.alphabet() returns), sorted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return sorted(chr(c) for c in chars)


def tokenizer_json() -> dict[str, Any]:
    """tokenizer.json for the byte-level BPE with no merges, as tokenizers serialises it."""
    vocab = {BOS: 0, EOS: 1}
    for symbol in byte_level_alphabet():
        vocab[symbol] = len(vocab)
    special = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, c in enumerate((BOS, EOS))]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                          "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def write_tokenizer(root: Path) -> int:
    data = tokenizer_json()
    (root / "tokenizer.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "add_bos_token": False, "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return len(data["model"]["vocab"])


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, Shape]]:
    """deepseek_v3's parameters in mlx-lm's order (as `tree_flatten(model.parameters())`)."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    heads, rank_q, rank_kv = (config["num_attention_heads"], config["q_lora_rank"],
                              config["kv_lora_rank"])
    nope, rope, v = (config["qk_nope_head_dim"], config["qk_rope_head_dim"],
                     config["v_head_dim"])
    experts, moe, dense = (config["n_routed_experts"], config["moe_intermediate_size"],
                           config["intermediate_size"])
    shared = moe * config["n_shared_experts"]
    shapes: list[tuple[str, Shape]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_a_proj.weight", (rank_q, h)),
            (p + "self_attn.q_a_layernorm.weight", (rank_q,)),
            (p + "self_attn.q_b_proj.weight", (heads * (nope + rope), rank_q)),
            (p + "self_attn.kv_a_proj_with_mqa.weight", (rank_kv + rope, h)),
            (p + "self_attn.kv_a_layernorm.weight", (rank_kv,)),
            (p + "self_attn.embed_q.weight", (heads, rank_kv, nope)),
            (p + "self_attn.unembed_out.weight", (heads, v, rank_kv)),
            (p + "self_attn.o_proj.weight", (h, heads * v)),
        ]
        if i < config["first_k_dense_replace"]:
            shapes += [(p + "mlp.gate_proj.weight", (dense, h)),
                       (p + "mlp.up_proj.weight", (dense, h)),
                       (p + "mlp.down_proj.weight", (h, dense))]
        else:
            shapes += [(p + "mlp.switch_mlp.gate_proj.weight", (experts, moe, h)),
                       (p + "mlp.switch_mlp.up_proj.weight", (experts, moe, h)),
                       (p + "mlp.switch_mlp.down_proj.weight", (experts, h, moe)),
                       (p + "mlp.gate.weight", (experts, h)),
                       (p + "mlp.gate.e_score_correction_bias", (experts,)),
                       (p + "mlp.shared_experts.gate_proj.weight", (shared, h)),
                       (p + "mlp.shared_experts.up_proj.weight", (shared, h)),
                       (p + "mlp.shared_experts.down_proj.weight", (h, shared))]
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    return [*shapes, ("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def values(name: str, shape: Shape, rng: random.Random) -> array[float]:
    count = math.prod(shape)
    if name.endswith(("layernorm.weight", "norm.weight")):
        return array("f", [1.0]) * count
    if name.endswith("e_score_correction_bias"):
        return array("f", [0.0]) * count
    scale = 1 / math.sqrt(shape[-1])
    return array("f", (rng.uniform(-scale, scale) for _ in range(count)))


def save_safetensors(path: Path, tensors: list[tuple[str, Shape, array[float]]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, shape, data in tensors:
        size = len(data) * data.itemsize
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset,
                                                                               offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, data in tensors:
            if sys.byteorder != "little":
                data = array("f", data)
                data.byteswap()
            data.tofile(f)


def make_tiny_deepseek(root: Path, n_layers: int = 4, n_files: int = 3, seed: int = 0,
                       overrides: dict[str, Any] | None = None) -> Path:
    """Write the tiny deepseek_v3 model into ``root`` (no mlx, no tokenizers) and return it.
    ``overrides`` replace config keys, as in `tiny_model.make_tiny_deepseek`."""
    if n_layers < 1 or n_files < 1:
        raise ValueError("need at least one layer and one file")
    root.mkdir(parents=True, exist_ok=True)
    config = {**tiny_config(n_layers, write_tokenizer(root)), **(overrides or {})}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    rng = random.Random(seed)  # noqa: S311 - model weights, not secrets
    weights = [(name, shape, values(name, shape, rng)) for name, shape in tensor_shapes(config)]
    if n_files > len(weights):
        raise ValueError(f"{n_files} files for {len(weights)} tensors")
    sizes = [len(v) * v.itemsize for _, _, v in weights]
    total = sum(sizes)
    before = [0, *accumulate(sizes)]
    starts = [0]
    for f in range(1, n_files):  # as tiny_model: file f starts past f/n of the bytes
        first = bisect_left(before, total * f // n_files)
        starts.append(min(max(first, starts[-1] + 1), len(weights) - (n_files - f)))
    weight_map = {}
    for f, (a, b) in enumerate(zip(starts, [*starts[1:], len(weights)], strict=True), start=1):
        name = f"model-{f:05d}-of-{n_files:05d}.safetensors"
        save_safetensors(root / name, weights[a:b])
        weight_map.update({k: name for k, _, _ in weights[a:b]})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return root
