"""Header parsing, checked against files the safetensors library itself writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.errors import ModelError
from orchestrator.model.safetensors import header_length, parse_header, read_header


def test_reads_what_the_safetensors_library_writes(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray[Any, Any]] = {
        "model.layers.0.mlp.weight": np.zeros((3, 5), dtype=np.uint32),
        "model.embed_tokens.scales": np.zeros((7,), dtype=np.float16),
        "lm_head.weight": np.zeros((2, 2, 2), dtype=np.float32),
        "scalar": np.zeros((), dtype=np.int64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "mlx"})
    header = read_header(path)
    assert header.file_bytes == path.stat().st_size
    by_name = {t.name: t for t in header.tensors}
    assert set(by_name) == set(tensors)
    with safe_open(str(path), "numpy") as f:
        for name, array in tensors.items():
            assert list(by_name[name].shape) == f.get_slice(name).get_shape()
            assert by_name[name].shape == array.shape
            assert by_name[name].nbytes == array.nbytes
    assert by_name["model.embed_tokens.scales"].dtype == "F16"


def _file(tmp_path: Path, header: object, data: int = 0) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return path


def test_corrupt_headers_name_the_file(tmp_path: Path) -> None:
    bad_size = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    with pytest.raises(ModelError, match=r"x\.safetensors: tensor 'a' is 4 bytes but F32"):
        read_header(_file(tmp_path, bad_size, 4))
    gap = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}
    with pytest.raises(ModelError, match="contiguous"):
        read_header(_file(tmp_path, gap, 2))
    with pytest.raises(ModelError, match="unknown dtype"):
        read_header(_file(tmp_path, {"a": {"dtype": "Q4", "shape": [1],
                                            "data_offsets": [0, 1]}}, 1))
    with pytest.raises(ModelError, match="not valid JSON"):
        parse_header(b"{nope", "f")
    with pytest.raises(ModelError, match="implausible"):
        header_length(struct.pack("<Q", 10**12), "f")
    with pytest.raises(ModelError, match="too short"):
        header_length(b"abc", "f")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="too short"):
        read_header(tmp_path / "empty.safetensors")


def test_an_incomplete_file_is_caught(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(ModelError, match="incomplete"):
        read_header(_file(tmp_path, header, 15))
    assert read_header(_file(tmp_path, header, 16)).data_bytes == 16
