"""Model metadata from a local directory: exact bytes per layer, files per layer range."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from orchestrator.errors import ModelError
from orchestrator.model.meta import (
    ModelMeta,
    files_for_layers,
    layer_of,
    load_local_meta,
    requantized,
)
from tests.fixtures import deepseek_like
from tests.fixtures.deepseek_like import make_deepseek_like, write_sparse_safetensors


def test_deepseek_like_is_measured_exactly(deepseek_meta: ModelMeta, deepseek_dir: Path) -> None:
    meta = deepseek_meta
    assert meta.model_type == "deepseek_v3"
    assert meta.num_layers == 61
    assert len(meta.files) == deepseek_like.NUM_FILES == 88
    assert meta.weight_bytes == deepseek_like.TOTAL_BYTES  # 419.75 GB
    assert meta.total_bytes == sum(p.stat().st_size for p in deepseek_dir.glob("*.safetensors"))
    dense, moe = meta.layers[0].total, meta.layers[3].total
    assert [layer.total for layer in meta.layers] == [dense] * 3 + [moe] * 58
    assert (dense, moe) == (364_699_648, 7_198_270_464)  # 0.36 GB and 7.2 GB
    assert meta.shared.total == 1_158_363_136  # embeddings + norm + lm_head, 1.16 GB
    assert meta.bits == 4 and meta.group_size == 64
    assert round(meta.num_parameters / 1e9) == 671
    assert meta.kv_bytes_per_token_layer == (512 + 64) * 2
    # a decoded token reads 8 of 256 experts, the attention and the shared expert
    assert meta.layers[3].active < moe / 10
    assert meta.layers[0].active == dense


def test_the_sparse_checkpoint_is_small_on_disk(deepseek_dir: Path) -> None:
    used = subprocess.run(["du", "-sk", str(deepseek_dir)], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    assert int(used) < 2048  # KiB


def test_files_for_layers_follow_mlx_lm(deepseek_meta: ModelMeta) -> None:
    every = files_for_layers(deepseek_meta, 0, 61)
    assert len(every) == 88
    first_layer_only = files_for_layers(deepseek_meta, 0, 1)
    assert first_layer_only[0] == "model-00001-of-00088.safetensors"  # embeddings + layer 0
    assert first_layer_only[-1] == "model-00088-of-00088.safetensors"  # norm + lm_head
    for name in files_for_layers(deepseek_meta, 30, 31):
        f = next(f for f in deepseek_meta.files if f.name == name)
        assert f.shared or 30 in f.layers


def test_layer_numbers_use_mlx_lms_rule() -> None:
    assert layer_of("model.layers.12.mlp.gate.weight") == 12
    assert layer_of("layers.3.attention.wq.weight") == 3
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None
    assert layer_of("model.sublayers.2.weight") is None  # "layers." must follow a dot or start


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    # A fresh sparse checkpoint: never copy one (a plain copy writes the holes, 420 GB).
    model = make_deepseek_like(tmp_path / "model")
    (model / "model-00042-of-00088.safetensors").unlink()
    with pytest.raises(ModelError, match=r"missing: model-00042-of-00088\.safetensors"):
        load_local_meta(model)


def test_an_index_tensor_absent_from_its_file(tmp_path: Path) -> None:
    make_deepseek_like(tmp_path, num_layers=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"]["model.layers.0.extra.weight"] = first
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="header has no such tensor"):
        load_local_meta(tmp_path)


def test_a_layer_without_weights_is_refused_like_mlx_lm(tmp_path: Path) -> None:
    make_deepseek_like(tmp_path, num_layers=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no weights for layers 2-3"):
        load_local_meta(tmp_path)


def test_layers_past_the_model_are_loaded_by_no_rank(tmp_path: Path) -> None:
    # DeepSeek's multi-token-prediction layer is numbered 61; mlx-lm drops it.
    make_deepseek_like(tmp_path, num_layers=3)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    meta = load_local_meta(tmp_path)
    assert meta.num_layers == 2
    assert meta.unused_bytes == 364_699_648
    assert meta.weight_bytes + meta.unused_bytes == sum(
        deepseek_like.nbytes(t) for t in deepseek_like.tensors(3))


def test_a_truncated_file_is_incomplete(tmp_path: Path) -> None:
    make_deepseek_like(tmp_path, num_layers=1)
    victim = tmp_path / "model-00001-of-00001.safetensors"
    with victim.open("r+b") as f:
        f.truncate(victim.stat().st_size - 1)
    with pytest.raises(ModelError, match="incomplete"):
        load_local_meta(tmp_path)


def test_no_index_single_file(tmp_path: Path) -> None:
    items = deepseek_like.tensors(1)
    write_sparse_safetensors(tmp_path / "model.safetensors", items)
    (tmp_path / "config.json").write_text(json.dumps(deepseek_like.config(1)))
    meta = load_local_meta(tmp_path)
    assert [f.name for f in meta.files] == ["model.safetensors"]
    assert meta.weight_bytes == sum(deepseek_like.nbytes(t) for t in items)


def test_missing_config_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json is missing"):
        load_local_meta(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_local_meta(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        load_local_meta(tmp_path / "nope")


def test_requantized_scales_only_the_packed_weights(deepseek_meta: ModelMeta) -> None:
    three = requantized(deepseek_meta, 3)
    packed = sum(layer.packed for layer in deepseek_meta.layers) + deepseek_meta.shared.packed
    assert deepseek_meta.weight_bytes - three.weight_bytes == packed // 4 or \
        abs(deepseek_meta.weight_bytes - three.weight_bytes - packed / 4) < 100
    assert three.bits == 3 and "estimate" in three.source
