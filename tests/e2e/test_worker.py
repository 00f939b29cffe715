"""The worker's refusals — no ring needed, so these run in seconds.

A worker refuses before importing mlx: the checks below run the real script as launchd would.
Its in-process parts (verified-file stamps, mlx-lm hooks) and the controller-side hostfile and
readiness code are unit tests: tests/unit/serving/test_worker_hooks.py, test_hostfile_health.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.worker import mlx_worker
from orchestrator.worker.hostfile import render_hostfile
from orchestrator.worker.status import WorkerState, parse_status
from tests.e2e.ring import (
    make_rank_dir,
    sha256_file,
    start_worker,
    stop_workers,
    write_config,
)
from tests.fixtures.mlx_lm import mlx_lm_rank_files
from tests.fixtures.tiny_model import make_tiny_deepseek

SPLIT = (2, 3, 1)
HOSTFILE = render_hostfile([("127.0.0.21", 47101), ("127.0.0.22", 47102), ("127.0.0.23", 47103)])

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_deepseek(tmp_path_factory.mktemp("model") / "full", n_layers=6, n_files=6)


@pytest.fixture
def node(model: Path, tmp_path: Path) -> Iterator[tuple[Path, dict[str, object]]]:
    """Rank 2's directory and the files entry of its config."""
    files: dict[str, object] = dict(make_rank_dir(model, tmp_path / "model",
                                                  mlx_lm_rank_files(model, SPLIT, 2)))
    (tmp_path / "hostfile.json").write_text(HOSTFILE)
    yield tmp_path, files


def run_worker(root: Path, files: dict[str, object], rank: int = 2,
               **overrides: object) -> tuple[int, str, Path]:
    """Run the real worker script; return its exit code, its log and its status path."""
    status = root / "status.json"
    config = write_config(root / "worker.json", model_dir=root / "model", split=SPLIT,
                          host="127.0.0.21", port=8080, files=files, status_path=status)
    if overrides:
        config.write_text(json.dumps({**json.loads(config.read_text()), **overrides}))
    worker = start_worker(rank, config, root / "hostfile.json", status, root / "worker.log",
                          root / "hf-cache")
    try:
        code = worker.process.wait(timeout=60)
    finally:
        stop_workers([worker])
    return code, worker.log(), status


def test_missing_file_refuses(node: tuple[Path, dict[str, object]]) -> None:
    root, files = node
    (root / "model" / "model-00002-of-00006.safetensors").unlink()
    code, log, status_path = run_worker(root, files)
    assert code == mlx_worker.EXIT_FILES
    assert f"missing file {root}/model/model-00002-of-00006.safetensors" in log
    assert "random weights" in log
    status = parse_status(status_path.read_text())
    assert status.state is WorkerState.FAILED and status.error is not None
    assert "model-00002-of-00006.safetensors" in status.error
    assert (status.rank, status.layers) == (2, (0, 1))


def test_corrupt_file_refuses(node: tuple[Path, dict[str, object]]) -> None:
    root, files = node
    path = root / "model" / "model-00006-of-00006.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    code, log, _ = run_worker(root, files)
    assert code == mlx_worker.EXIT_FILES
    assert f"sha256 mismatch {path}: got {sha256_file(path)}" in log


def test_truncated_file_refuses_on_size(node: tuple[Path, dict[str, object]]) -> None:
    root, files = node
    path = root / "model" / "model-00001-of-00006.safetensors"
    size = path.stat().st_size
    files[path.name] = {"sha256": files[path.name], "size": size}
    path.write_bytes(path.read_bytes()[:100])
    code, log, _ = run_worker(root, files)
    assert code == mlx_worker.EXIT_FILES
    assert f"wrong size {path}: 100 bytes, expected {size}" in log


def test_a_needed_file_missing_from_the_config_refuses(
        node: tuple[Path, dict[str, object]]) -> None:
    """Verifying the listed files is not enough: the list must cover what mlx-lm will read."""
    root, files = node
    del files["model-00002-of-00006.safetensors"]
    code, log, _ = run_worker(root, files)
    assert code == mlx_worker.EXIT_FILES
    assert "layers 0..0 need model-00002-of-00006.safetensors, which the config does not list" \
        in log


@pytest.mark.parametrize(("rank", "overrides", "message"), [
    (2, {"color": "blue"}, "unknown key 'color'"),
    (2, {"split": [3, 3]}, "split has 2 entries for expected_world_size 3"),
    (3, {}, "MLX_RANK='3' is not a rank in 0..2"),
    (1, {"expected_world_size": 2, "split": [3, 3]}, "does not list 2 ranks"),
])
def test_bad_config_or_environment_refuses(node: tuple[Path, dict[str, object]], rank: int,
                                           overrides: dict[str, object], message: str) -> None:
    root, files = node
    code, log, _ = run_worker(root, files, rank=rank, **overrides)
    assert code == mlx_worker.EXIT_CONFIG
    assert message in log
