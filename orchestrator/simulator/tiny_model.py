"""A tiny real deepseek_v3 model that mlx-lm loads, pipelines and serves — generated offline.

`make_tiny_deepseek(dir)` writes what a Hub snapshot of an MLX model holds: ``config.json``,
weights in several ``model-0000i-of-0000n.safetensors`` files with a
``model.safetensors.index.json``, and a tokenizer (``tokenizer.json`` + ``tokenizer_config.json``
with a chat template) that loads with no network. Weights are random (seeded) and float32,
because the CPU backend's MoE kernel (GatherMM) supports float32 only; the architecture is
DeepSeek-V3's in miniature — MLA attention, the first layer dense, the rest MoE with a shared
expert — so layers are uneven in size like the real model's.

Files are cut by bytes, in model order, so they straddle layer boundaries: a rank's file set is
not just "its layers' files", which is what makes file selection worth testing.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from itertools import accumulate
from pathlib import Path
from typing import Any

# Byte-level BPE with no merges: every byte is a token. Tiny, lossless, offline.
BOS = "<|begin▁of▁sentence|>"
EOS = "<|end▁of▁sentence|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_config(n_layers: int, vocab_size: int) -> dict[str, Any]:
    """A deepseek_v3 config.json at toy scale (hidden 64, 4 experts of which 2 active)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "qk_nope_head_dim": 16,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


# Heads and MLP widths that tensor-parallel serving can split into 2 or 3 ranks (mlx's
# shard needs every split axis divisible by N, and mlx-lm's MLA divides the heads).
TENSOR_3_OVERRIDES: dict[str, Any] = {"num_attention_heads": 6, "num_key_value_heads": 6,
                                      "intermediate_size": 96, "moe_intermediate_size": 48}


def write_tokenizer(root: Path) -> int:
    """A byte-level BPE tokenizer.json + tokenizer_config.json; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return len(vocab)


def make_tiny_deepseek(root: Path, n_layers: int = 4, n_files: int = 3, seed: int = 0,
                       overrides: dict[str, Any] | None = None) -> Path:
    """Write a loadable tiny deepseek_v3 model into ``root`` and return ``root``.

    ``n_files`` weight files are cut by bytes in model order (embeddings, layers, norm, head).
    ``overrides`` replace config keys: the default's 2 heads split into 2 tensor-parallel
    ranks only; ``TENSOR_3_OVERRIDES`` makes every split axis divisible by 2 and 3.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import deepseek_v3

    if n_layers < 1 or n_files < 1:
        raise ValueError("need at least one layer and one file")
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(root)
    config = {**tiny_config(n_layers, vocab_size), **(overrides or {})}
    (root / "config.json").write_text(json.dumps(config, indent=2))

    mx.random.seed(seed)
    args_cls: Any = deepseek_v3.ModelArgs  # mlx-lm is untyped
    model = deepseek_v3.Model(args_cls.from_dict(config))
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    weights = [(k, v.astype(mx.float32)) for k, v in flat]
    mx.eval([v for _, v in weights])
    if n_files > len(weights):
        raise ValueError(f"{n_files} files for {len(weights)} tensors")

    total = sum(v.nbytes for _, v in weights)
    before = [0, *accumulate(v.nbytes for _, v in weights)]  # bytes before tensor i
    starts = [0]
    for f in range(1, n_files):  # file f starts at the first tensor past f/n of the bytes
        first = bisect_left(before, total * f // n_files)
        starts.append(min(max(first, starts[-1] + 1), len(weights) - (n_files - f)))
    groups = [weights[a:b] for a, b in zip(starts, [*starts[1:], len(weights)], strict=True)]
    weight_map = {}
    for f, group in enumerate(groups, start=1):
        name = f"model-{f:05d}-of-{n_files:05d}.safetensors"
        mx.save_safetensors(str(root / name), dict(group), metadata={"format": "mlx"})
        weight_map.update({k: name for k, _ in group})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return root
