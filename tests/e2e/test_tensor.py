"""Tensor parallelism served on the shared sandbox (see conftest): `placement.parallelism:
tensor` on 3 and then 2 ranks, and back to the pipeline, each one `orch apply`.

What must hold each time: the greedy tokens equal one process generating with the whole model
(mlx-lm in this process, temperature 0: every rank's slice ran with the right weights); in
tensor mode every rank holds and has verified every weight file; and changing the parallelism
restarts the ring exactly once (each rank's worker starts once, counted in its own log). The
test leaves the sandbox as it found it: pipeline on three nodes, converged.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from orchestrator.verify.health import chat_completion
from tests.e2e.conftest import MAX_TOKENS, PROMPT, Serving

FORMED = "group of {size} formed"  # the worker's log line once its group formed (one a start)


def homes(serving: Serving) -> dict[str, Path]:
    return {n["name"]: Path(n["root"]) / "home" for n in serving.sandbox.nodes}


def serve_dir(home: Path) -> Path:
    return home / ".orch" / "serve" / "sandbox"


def starts(serving: Serving, size: int) -> dict[str, int]:
    """How many times each node's worker formed a group of ``size`` (its log is appended)."""
    counts = {}
    for name, home in homes(serving).items():
        log = serve_dir(home) / "worker.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        counts[name] = text.count(FORMED.format(size=size))
    return counts


def apply(serving: Serving, cluster_text: str) -> None:
    serving.cluster_file.write_text(cluster_text)
    applied = serving.orch("apply", "--yes")
    assert applied.returncode == 0, applied.output
    completion = asyncio.run(chat_completion(serving.api_url, PROMPT,
                                             max_tokens=MAX_TOKENS, timeout=300))
    assert completion.token_ids == serving.expected
    again = serving.orch("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.output


def worker_config(home: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((serve_dir(home) / "worker.json").read_text())
    return loaded


def test_tensor_on_three_then_two_ranks_serves_the_single_process_tokens(
        serving: Serving) -> None:
    original = serving.cluster_file.read_text()
    assert "placement:\n  nodes: [mac1, mac2, mac3]" in original
    index = json.loads((serving.directory / "model" / "model.safetensors.index.json")
                       .read_text())
    weights = set(index["weight_map"].values())
    tensor3 = original.replace("placement:\n", "placement:\n  parallelism: tensor\n")
    try:
        # --- pipeline → tensor on 3 ranks: one planned ring restart
        serving.cluster_file.write_text(tensor3)
        planned = serving.orch("plan", "--detailed-exitcode", "--json")
        assert planned.returncode == 2, planned.output
        plan = json.loads(planned.stdout)
        restarts = {h["host"]: [c for c in h["changes"]
                                if c["resource"] == "launchd:system/com.orch.sandbox.worker"]
                    for h in plan["hosts"]}
        assert {h: len(c) for h, c in restarts.items()} == {"mac1": 1, "mac2": 1, "mac3": 1}
        before = starts(serving, 3)
        apply(serving, tensor3)
        assert {h: n - before[h] for h, n in starts(serving, 3).items()} == \
            {"mac1": 1, "mac2": 1, "mac3": 1}, "each rank starts exactly once"
        for name, home in homes(serving).items():
            config = worker_config(home)
            assert config["parallelism"] == "tensor" and config["split"] == [6, 6, 6], name
            assert weights <= set(config["files"]), f"{name} does not verify every weight"
            model_dir = Path(config["model_dir"])
            on_disk = {p.name for p in model_dir.iterdir() if p.suffix == ".safetensors"}
            assert on_disk == weights, f"{name} holds {sorted(on_disk)}"
        status = json.loads(serving.orch("status", "--json").stdout)
        assert status["ring"]["size"] == 3 and status["ring"]["state"] == "serving", status

        # --- tensor on 2 ranks
        two = tensor3.replace("nodes: [mac1, mac2, mac3]", "nodes: [mac1, mac2]")
        apply(serving, two)
        assert [worker_config(h)["split"] for n, h in homes(serving).items()
                if n != "mac3"] == [[6, 6], [6, 6]]
        status = json.loads(serving.orch("status", "--json").stdout)
        assert status["ring"]["size"] == 2 and status["ring"]["state"] == "serving", status
    finally:
        apply(serving, original)  # the sandbox's contract: pipeline on three, converged
    assert "parallelism" not in worker_config(homes(serving)["mac1"])
