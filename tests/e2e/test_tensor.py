"""Tensor parallelism served on the shared sandbox (see conftest): `placement.parallelism:
tensor` on 3 and then 2 ranks, and back to the pipeline, each one `orch apply`.

What must hold each time: the greedy tokens equal one process generating with the whole model
(mlx-lm in this process, temperature 0: every rank's slice ran with the right weights); in
tensor mode every rank holds and has verified every weight file, and what each rank's mlx-lm
loaded (its status file's ``param_bytes``, summed over the sharded model's parameters) is the
placement's tensor bytes for that rank count, exactly — so the ranks really served a tensor
split (a pipeline rank holds whole layers, other bytes); and changing the parallelism
(pipeline → tensor, and back) restarts the ring exactly once: the plan has one worker change
per node, each rank's group forms once (counted in its own log), and launchd's own count says
the same — after the apply each worker is a new process (another pid) and ``launchctl
print`` shows ``runs = 1`` (the restart reloads the job, so a crashed start that never formed
a group would show as a second run). The test leaves the sandbox as it found it: pipeline on
three nodes, converged.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from orchestrator.model.meta import load_local_meta
from orchestrator.placement.shard import tensor_split
from orchestrator.verify.health import chat_completion
from tests.e2e.conftest import MAX_TOKENS, PROMPT, Serving

FORMED = "group of {size} formed"  # the worker's log line once its group formed (one a start)
WORKER = "system/com.orch.sandbox.worker"


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


def launchd_jobs(serving: Serving) -> dict[str, dict[str, str]]:
    """Each node's worker as ``launchctl print`` shows it (pid, runs, state; {} if unloaded)."""
    jobs = {}
    for host in serving.hosts:
        done = subprocess.run(host.ssh_argv("launchctl", "print", WORKER), capture_output=True,
                              text=True, timeout=60, check=False)
        jobs[host.name] = {} if done.returncode else dict(
            line.strip().split(" = ", 1) for line in done.stdout.splitlines()
            if line.startswith("\t") and not line.startswith("\t\t") and " = " in line
            and not line.rstrip().endswith("{"))
    return jobs


def assert_restarted_once(serving: Serving, before: dict[str, dict[str, str]],
                          nodes: list[str]) -> None:
    """Every node in ``nodes`` runs a new worker process, started once since its reload."""
    after = launchd_jobs(serving)
    for name in nodes:
        job = after[name]
        assert job.get("state") == "running" and job.get("runs") == "1", (name, job)
        assert job["pid"] != before[name].get("pid"), f"{name}: the worker was not restarted"


def served_bytes(serving: Serving, names: list[str]) -> list[int]:
    """Each node's loaded parameter bytes, as its worker reported them once loaded."""
    held = []
    for name in names:
        status = json.loads(Path(worker_config(homes(serving)[name])["status_path"])
                            .read_text())
        assert status["state"] == "serving", (name, status)
        held.append(status["param_bytes"])
    return held


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
    restored = False
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
        before, jobs = starts(serving, 3), launchd_jobs(serving)
        apply(serving, tensor3)
        assert {h: n - before[h] for h, n in starts(serving, 3).items()} == \
            {"mac1": 1, "mac2": 1, "mac3": 1}, "each rank starts exactly once"
        assert_restarted_once(serving, jobs, ["mac1", "mac2", "mac3"])
        for name, home in homes(serving).items():
            config = worker_config(home)
            assert config["parallelism"] == "tensor" and config["split"] == [6, 6, 6], name
            assert weights <= set(config["files"]), f"{name} does not verify every weight"
            model_dir = Path(config["model_dir"])
            on_disk = {p.name for p in model_dir.iterdir() if p.suffix == ".safetensors"}
            assert on_disk == weights, f"{name} holds {sorted(on_disk)}"
        status = json.loads(serving.orch("status", "--json").stdout)
        assert status["ring"]["size"] == 3 and status["ring"]["state"] == "serving", status
        meta = load_local_meta(serving.directory / "model")
        assert served_bytes(serving, ["mac1", "mac2", "mac3"]) == \
            list(tensor_split(meta, 3).rank_bytes)

        # --- tensor on 2 ranks
        two = tensor3.replace("nodes: [mac1, mac2, mac3]", "nodes: [mac1, mac2]")
        apply(serving, two)
        assert [worker_config(h)["split"] for n, h in homes(serving).items()
                if n != "mac3"] == [[6, 6], [6, 6]]
        status = json.loads(serving.orch("status", "--json").stdout)
        assert status["ring"]["size"] == 2 and status["ring"]["state"] == "serving", status
        assert served_bytes(serving, ["mac1", "mac2"]) == list(tensor_split(meta, 2).rank_bytes)

        # --- tensor on 2 → the pipeline on 3 (the sandbox's own file): again one restart
        before, jobs = starts(serving, 3), launchd_jobs(serving)
        apply(serving, original)
        restored = True
        assert {h: n - before[h] for h, n in starts(serving, 3).items()} == \
            {"mac1": 1, "mac2": 1, "mac3": 1}, "each rank starts exactly once"
        assert_restarted_once(serving, jobs, ["mac1", "mac2", "mac3"])
    finally:
        if not restored:
            apply(serving, original)  # the sandbox's contract: pipeline on three, converged
    assert "parallelism" not in worker_config(homes(serving)["mac1"])
