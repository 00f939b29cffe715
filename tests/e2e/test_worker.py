"""The worker's refusals, its verified-file stamps, and the controller-side hostfile, status and
readiness code — no ring needed, so these run in seconds.

A worker refuses before importing mlx: the checks below run the real script as launchd would.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.plan.ring import RankSnapshot
from orchestrator.verify.health import (
    ReadyStage,
    Transport,
    explain_not_ready,
    rank_problems,
    wait_ready,
)
from orchestrator.worker import mlx_worker
from orchestrator.worker.hostfile import parse_hostfile, render_hostfile
from orchestrator.worker.status import WorkerState, parse_status
from tests.e2e.ring import (
    make_rank_dir,
    mlx_lm_rank_files,
    sha256_file,
    start_worker,
    stop_workers,
    write_config,
)
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


# -------------------------------------------------------------------------------- hostfile


def test_hostfile_is_mlx_ring_format_in_rank_order() -> None:
    text = render_hostfile([("10.0.0.1", 47100), ("10.0.0.2", 47101)])
    assert text == '[["10.0.0.1:47100"], ["10.0.0.2:47101"]]\n'
    assert parse_hostfile(text) == (("10.0.0.1", 47100), ("10.0.0.2", 47101))


@pytest.mark.parametrize(("endpoints", "message"), [
    ([], "at least two ranks, got 0"),
    ([("10.0.0.1", 47100)], "at least two ranks, got 1"),
    ([("studio-1.local", 47100), ("10.0.0.2", 47101)], "not an IP address"),
    ([("10.0.0.1", 47100), ("fe80::1", 47101)], "IPv6"),
    ([("10.0.0.1", 0), ("10.0.0.2", 47101)], "not in 1..65535"),
    ([("10.0.0.1", 47100), ("10.0.0.1", 47100)], "rank 1 repeats ring address 10.0.0.1:47100"),
])
def test_hostfile_refuses_what_mlx_would_misread(endpoints: list[tuple[str, int]],
                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_hostfile(endpoints)


# ------------------------------------------------------------------------------- readiness


def scripted(answers: list[object]) -> tuple[Transport, list[str]]:
    """A transport that plays ``answers`` in order (an exception is raised) and logs URLs."""
    seen: list[str] = []

    def transport(url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        seen.append(url.rsplit("/", 1)[-1])
        answer = answers.pop(0) if answers else OSError("connection refused")
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    return transport, seen


COMPLETION = json.dumps({"choices": [{
    "message": {"role": "assistant", "content": "OK"}, "finish_reason": "length",
    "logprobs": {"content": [{"id": 46, "logprob": -0.5}, {"id": 74, "logprob": -1.25}]}}]})


def test_wait_ready_retries_until_a_real_completion() -> None:
    transport, seen = scripted([
        ConnectionRefusedError("refused"),  # HTTP not up yet
        (503, b'{"status": "unhealthy"}'),
        (200, b"{}"), (404, b'{"error": "generation failed"}'),
        (200, b"{}"), (200, COMPLETION.encode()),
    ])
    result = asyncio.run(wait_ready("http://127.0.0.21:8080", timeout=30, poll_interval=0.01,
                                    transport=transport))
    assert result.ready and result.attempts == 4
    assert result.completion is not None
    assert result.completion.token_ids == (46, 74)
    assert result.completion.logprobs == (-0.5, -1.25)
    assert seen == ["health", "health", "health", "completions", "health", "completions"]


def test_wait_ready_times_out_with_the_last_failure() -> None:
    transport, _ = scripted([(200, b"{}"), (404, b'{"error": "boom"}')])
    result = asyncio.run(wait_ready("http://127.0.0.21:8080", timeout=0.3, poll_interval=0.05,
                                    transport=transport))
    assert not result.ready and result.stage is ReadyStage.UNREACHABLE
    assert result.detail.startswith("not ready after 0.3 s: ")
    assert "connection refused" in result.detail


def test_not_ready_names_the_failed_rank_and_shows_its_log() -> None:
    def status(rank: int, state: str, error: str | None = None) -> str:
        return json.dumps({"rank": rank, "world_size": 3, "split": [2, 3, 1],
                           "layers": [[4, 6], [1, 4], [0, 1]][rank], "state": state,
                           "pid": 100 + rank, "started_at": 1.0, "updated_at": 2.0,
                           "error": error})

    log = "\n".join(f"line {i}" for i in range(50)) + "\nsha256 mismatch /m/model-2.safetensors\n"
    ranks = [
        RankSnapshot(0, "10.0.0.1", True, parse_status(status(0, "ring")), "waiting"),
        RankSnapshot(1, "10.0.0.2", True, parse_status(status(1, "ring")), "waiting"),
        RankSnapshot(2, "10.0.0.3", False, parse_status(status(2, "failed", "sha256 mismatch")),
                     log, exit_code=3),
    ]
    assert rank_problems(ranks, 3) == (
        "rank 0 (10.0.0.1): still ring",
        "rank 1 (10.0.0.2): still ring",
        "rank 2 (10.0.0.3): not running (last exit 3)",
        "rank 2 (10.0.0.3): failed: sha256 mismatch",
    )
    transport, _ = scripted([])
    result = asyncio.run(wait_ready("http://10.0.0.1:8080", timeout=0.1, transport=transport))
    message = explain_not_ready(result, ranks, 3, tail_lines=5)
    assert "last 5 log lines of rank 2 (10.0.0.3):" in message
    assert message.endswith("  | sha256 mismatch /m/model-2.safetensors")
    assert "line 45" not in message and "line 46" in message
