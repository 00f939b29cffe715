"""A real 3-rank ring serving a tiny deepseek_v3 with a memory-weighted split.

The claim under test: orch's worker serves the model across nodes exactly as one process would.
Greedy tokens from rank 0's API equal single-process ``mlx_lm`` generation on the full model,
and the prompt is checked to be one whose output changes when any single layer has random
weights — so equality means every layer ran, once, with its own weights. The split comes from
placement with one host declared smaller, and the running workers report holding it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.placement.split import layer_ranges
from orchestrator.plan.ring import RankSnapshot
from orchestrator.verify.health import (
    chat_completion,
    explain_not_ready,
    rank_problems,
    wait_ready,
)
from orchestrator.worker.status import WorkerState
from tests.e2e.ring import (
    Ring,
    Worker,
    free_port,
    generate,
    make_rank_dir,
    reference,
    start_ring,
    start_worker,
    stop_workers,
    write_config,
)
from tests.fixtures.mlx_lm import declared_split, mlx_lm_rank_files
from tests.fixtures.tiny_model import make_tiny_deepseek

IPS = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
LAYERS = 6
PROMPT = "Say OK."
MAX_TOKENS = 12
READY_TIMEOUT = 150.0  # 3 ranks on 2 cores; ring connect backs off 1, 2, 4, 8 s

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_deepseek(tmp_path_factory.mktemp("model") / "full", n_layers=LAYERS,
                              n_files=6)


def layers_that_change_output(model: Path, prompt: str, max_tokens: int) -> list[int]:
    """The layers whose replacement by random weights (a missing file) changes the tokens."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models import deepseek_v3

    base, _ = reference(model, prompt, max_tokens)
    config = json.loads((model / "config.json").read_text())
    mx.random.seed(12345)
    fresh = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))  # random init
    changed = []
    for layer in range(LAYERS):
        mlx_model, tokenizer = load(str(model))
        mlx_model.model.layers[layer].update(fresh.model.layers[layer].parameters())
        if generate(mlx_model, tokenizer, prompt, max_tokens)[0] != base:
            changed.append(layer)
    return changed


@pytest.fixture
def ring_factory(tmp_path: Path) -> Iterator[list[Ring]]:
    rings: list[Ring] = []
    try:
        yield rings
    finally:
        for ring in rings:
            stop_workers(ring.workers)


def snapshots(workers: list[Worker]) -> list[RankSnapshot]:
    return [RankSnapshot(rank=w.rank, host=IPS[w.rank], running=w.process.poll() is None,
                         status=w.status(), log_tail=w.log(), exit_code=w.process.poll())
            for w in workers]


def test_uneven_ring_serves_what_one_process_computes(model: Path, tmp_path: Path,
                                                      ring_factory: list[Ring]) -> None:
    started = time.monotonic()
    split = declared_split(model)
    assert split[2] < min(split[0], split[1]), split  # the smaller host holds fewer layers
    assert layers_that_change_output(model, PROMPT, MAX_TOKENS) == list(range(LAYERS))
    expected_tokens, expected_logprobs = reference(model, PROMPT, MAX_TOKENS)

    ring = start_ring(model, tmp_path, split, IPS)
    ring_factory.append(ring)
    ready = asyncio.run(wait_ready(ring.api_url, timeout=READY_TIMEOUT))
    assert ready.ready, explain_not_ready(ready, snapshots(ring.workers), len(split))
    completion = asyncio.run(chat_completion(ring.api_url, PROMPT, max_tokens=MAX_TOKENS,
                                             timeout=60))

    assert list(completion.token_ids) == expected_tokens
    assert completion.logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    # Naming another model would make plain mlx-lm reload it on every rank; the worker pins it.
    renamed = asyncio.run(chat_completion(ring.api_url, PROMPT, max_tokens=MAX_TOKENS,
                                          model="mlx-community/DeepSeek-R1-4bit", timeout=60))
    assert renamed.token_ids == completion.token_ids
    ranks = snapshots(ring.workers)
    assert rank_problems(ranks, len(split)) == ()
    held = {}
    for rank, (start, end) in enumerate(layer_ranges(split)):
        status = ring.workers[rank].status()
        assert status is not None and status.state is WorkerState.SERVING
        assert (status.world_size, status.layers) == (3, (start, end))
        assert status.param_bytes is not None
        held[rank] = status.param_bytes
        # the node's directory held only its own weight files
        assert {f for f in ring.rank_files[rank] if f.endswith(".safetensors")} == \
            mlx_lm_rank_files(model, split, rank)
    assert held[2] < min(held[0], held[1])
    print(f"\nsplit {split}: tokens {completion.token_ids}; param bytes by rank {held}; "
          f"ready after {ready.elapsed:.1f} s; test {time.monotonic() - started:.1f} s")


def test_a_rank_with_a_corrupt_file_refuses_and_is_named(model: Path, tmp_path: Path,
                                                          ring_factory: list[Ring]) -> None:
    split = declared_split(model)
    damaged = sorted(mlx_lm_rank_files(model, split, 2) - mlx_lm_rank_files(model, split, 0))[0]
    ring = start_ring(model, tmp_path, split, IPS, corrupt={2: damaged})
    ring_factory.append(ring)
    refusing = ring.workers[2]
    assert refusing.process.wait(timeout=60) == 3
    assert f"sha256 mismatch {tmp_path}/node2/model/{damaged}" in refusing.log()

    ready = asyncio.run(wait_ready(ring.api_url, timeout=3, poll_interval=0.5))
    assert not ready.ready
    message = explain_not_ready(ready, snapshots(ring.workers), len(split))
    assert "rank 2 (127.0.0.23): not running (last exit 3)" in message
    assert "last " in message and "log lines of rank 2 (127.0.0.23)" in message
    assert f"sha256 mismatch {tmp_path}/node2/model/{damaged}" in message.split("log lines")[1]


def test_one_node_serves_without_a_ring(model: Path, tmp_path: Path) -> None:
    """Placement may choose one node: the worker then runs no ring and holds every layer."""
    expected_tokens, _ = reference(model, PROMPT, MAX_TOKENS)
    files = make_rank_dir(model, tmp_path / "model", mlx_lm_rank_files(model, (LAYERS,), 0))
    port = free_port(IPS[0])
    config = write_config(tmp_path / "worker.json", model_dir=tmp_path / "model",
                          split=(LAYERS,), host=IPS[0], port=port, files=files,
                          status_path=tmp_path / "status.json")
    worker = start_worker(0, config, None, tmp_path / "status.json", tmp_path / "worker.log",
                          tmp_path / "hf-cache")
    try:
        api = f"http://{IPS[0]}:{port}"
        ready = asyncio.run(wait_ready(api, timeout=READY_TIMEOUT))
        assert ready.ready, explain_not_ready(ready, snapshots([worker]), 1)
        completion = asyncio.run(chat_completion(api, PROMPT, max_tokens=MAX_TOKENS))
        assert list(completion.token_ids) == expected_tokens
        status = worker.status()
        assert status is not None and status.state is WorkerState.SERVING
        assert (status.world_size, status.layers) == (1, (0, LAYERS))
    finally:
        stop_workers([worker])
