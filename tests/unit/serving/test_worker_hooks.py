"""The worker's in-process parts: verified-file stamps and the hooks it installs in mlx-lm.

Pure: mlx-lm's own pipeline code runs in this process, with no ring and no worker process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from orchestrator.model.cache import sha256_file
from orchestrator.worker import mlx_worker


def test_verified_stamp_skips_rehash_until_the_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * 1000)
    old = time.time() - 60  # older than the racy window, so a stamp is written
    os.utime(path, (old, old))
    files = {path.name: sha256_file(path)}
    mlx_worker.verify_files(str(tmp_path), files)
    assert (tmp_path / ".orch-verified" / "weights.safetensors.json").exists()

    def no_hashing(*_: object) -> object:
        raise AssertionError("re-hashed a file whose stamp matches")

    monkeypatch.setattr(mlx_worker.hashlib, "sha256", no_hashing)
    mlx_worker.verify_files(str(tmp_path), files)  # the stamp answers
    monkeypatch.undo()

    path.write_bytes(b"y" * 1000)  # same size, new mtime: the stamp no longer matches
    with pytest.raises(mlx_worker.WorkerError, match="sha256 mismatch") as info:
        mlx_worker.verify_files(str(tmp_path), files)
    assert info.value.code == mlx_worker.EXIT_FILES


def test_hooks_fail_loudly_on_an_mlx_lm_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx_lm.server
    from mlx_lm.models.pipeline import PipelineMixin

    def old_pipeline(self: object, group: object) -> None: ...

    monkeypatch.setattr(PipelineMixin, "pipeline", old_pipeline)
    with pytest.raises(mlx_worker.WorkerError, match="takes no split") as info:
        mlx_worker.install_split_hook([1, 2])
    assert info.value.code == mlx_worker.EXIT_MLX
    monkeypatch.delattr(mlx_lm.server, "sharded_load")
    status = mlx_worker.Status("/nonexistent/status.json", {})
    with pytest.raises(mlx_worker.WorkerError, match="lacks sharded_load"):
        mlx_worker.install_load_guard(status, 0, 1, distributed=True)


def test_split_hook_sets_mlx_lm_layer_ranges() -> None:
    """Rank 0 holds the last layers; undo restores mlx-lm's even split."""
    from mlx_lm.models.pipeline import PipelineMixin

    class Group:
        def __init__(self, rank: int) -> None:
            self._rank = rank

        def rank(self) -> int:
            return self._rank

        def size(self) -> int:
            return 3

    def ranges() -> list[tuple[int, int]]:
        out = []
        for rank in range(3):
            stage = PipelineMixin()
            stage.layers = list(range(6))
            stage.pipeline(Group(rank))
            out.append((stage.start_idx, stage.end_idx))
        return out

    undo = mlx_worker.install_split_hook([2, 3, 1])
    try:
        assert ranges() == [(4, 6), (1, 4), (0, 1)]
    finally:
        undo()
    assert ranges() == [(4, 6), (2, 4), (0, 2)]


def test_config_takes_parallelism_and_backend_and_rejects_others(tmp_path: Path) -> None:
    base = {"model_dir": "/m", "split": [4, 4], "host": "127.0.0.1", "port": 8080,
            "expected_world_size": 2, "files": {"a.safetensors": "a" * 64}}
    path = tmp_path / "w.json"
    path.write_text(json.dumps({**base, "parallelism": "tensor", "backend": "jaccl-ring"}))
    assert mlx_worker.load_config(str(path))["parallelism"] == "tensor"
    path.write_text(json.dumps({**base, "split": [4, 3], "parallelism": "tensor",
                                "backend": "mpi"}))
    with pytest.raises(mlx_worker.WorkerError) as info:
        mlx_worker.load_config(str(path))
    assert "tensor parallelism: split must give every rank every layer" in str(info.value)
    assert "backend must be one of ring, jaccl, jaccl-ring" in str(info.value)
    assert mlx_worker.layer_range([4, 4], 1, "tensor") == (0, 4)
    assert mlx_worker.layer_range([5, 3], 1) == (0, 3)


def test_a_jaccl_rank_reads_its_ranks_from_the_devices_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devices = tmp_path / "ibv_devices.json"
    devices.write_text(json.dumps([[None, "rdma_en2"], ["rdma_en2", None]]))
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.setenv("MLX_IBV_DEVICES", str(devices))
    monkeypatch.delenv("MLX_JACCL_COORDINATOR", raising=False)
    with pytest.raises(mlx_worker.WorkerError, match="MLX_JACCL_COORDINATOR"):
        mlx_worker.rank_from_env(2, "jaccl")
    monkeypatch.setenv("MLX_JACCL_COORDINATOR", "10.0.0.1:47100")
    assert mlx_worker.rank_from_env(2, "jaccl") == 1
    with pytest.raises(mlx_worker.WorkerError, match="does not list 3 ranks"):
        mlx_worker.rank_from_env(3, "jaccl")


def test_config_takes_a_rendezvous_as_ipv4_and_port(tmp_path: Path) -> None:
    base = {"model_dir": "/m", "split": [4, 4], "host": "127.0.0.1", "port": 8080,
            "expected_world_size": 2, "files": {"a.safetensors": "a" * 64}}
    path = tmp_path / "w.json"
    path.write_text(json.dumps({**base, "rendezvous": "10.0.1.1:47200"}))
    assert mlx_worker.parse_endpoint(mlx_worker.load_config(str(path))["rendezvous"]) == \
        ("10.0.1.1", 47200)
    path.write_text(json.dumps({**base, "rendezvous": "rank0.local:47200"}))
    with pytest.raises(mlx_worker.WorkerError) as info:
        mlx_worker.load_config(str(path))
    assert 'rendezvous must be "ipv4:port"' in str(info.value)
