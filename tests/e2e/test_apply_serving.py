"""`orch apply` from bare hosts to a serving ring, through the real CLI and engine.

The simulated Macs, hub and cluster file come from the sandbox library (the same as `orch
sandbox up`); everything after that is the command a user runs: placement, wheelhouse, shard
sync from the hub, workers under launchd, readiness. The ring's greedy tokens must equal what
one process holding the whole model generates: every layer ran, with the right weights.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from orchestrator.simulator import cluster as sandbox
from orchestrator.verify.health import chat_completion
from tests.e2e.test_ring import reference
from tests.fixtures.cli import run_orch as orch

PROMPT = "Say OK."
MAX_TOKENS = 8


def status_of(cluster_file: Path, known: tuple[str, str]) -> dict[str, Any]:
    status = orch("status", cluster_file, "--json", *known)
    assert status.returncode == 0, status.stdout + status.stderr
    report: dict[str, Any] = json.loads(status.stdout)
    return report


def test_apply_from_bare_hosts_serves_what_one_process_computes(tmp_path: Path) -> None:
    started = sandbox.up(tmp_path / "sandbox", 3)
    known = ("--known-hosts", str(started.known_hosts))
    try:
        applied = orch("apply", started.cluster_file, "--yes", *known)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "Apply: 0 ok, 3 changed, 0 failed, 0 unreachable." in applied.stdout

        completion = asyncio.run(chat_completion(started.api_url, PROMPT,
                                                 max_tokens=MAX_TOKENS, timeout=300))
        expected, _ = reference(tmp_path / "sandbox" / "model", PROMPT, MAX_TOKENS)
        assert list(completion.token_ids) == expected

        again = orch("plan", started.cluster_file, "--detailed-exitcode", *known)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "No changes." in again.stdout

        before = status_of(started.cluster_file, known)
        assert before["ring"]["state"] == "serving", before
        assert before["ring"]["size"] == 3 and before["ring"]["serving"] == 3, before

        # One runtime setting changes: only the worker's plist, on every rank, one restart.
        text = started.cluster_file.read_text()
        started.cluster_file.write_text(text.replace(
            "runtime:\n", "runtime:\n  env: {MLX_RING_VERBOSE: '1'}\n", 1))
        drift = orch("plan", started.cluster_file, "--detailed-exitcode", "--json", *known)
        assert drift.returncode == 2, drift.stdout + drift.stderr
        changes = [(h["host"], c["resource"], sorted(f["name"] for f in c["fields"]))
                   for h in json.loads(drift.stdout)["hosts"] for c in h["changes"]]
        assert changes == [(h, "launchd:system/com.orch.sandbox.worker",
                            ["config_hash", "plist"]) for h in ("mac1", "mac2", "mac3")]
        assert orch("apply", started.cluster_file, "--yes", *known).returncode == 0
        after = status_of(started.cluster_file, known)
        old_pids = {n["host"]: n["pid"] for n in before["nodes"]}
        assert all(n["pid"] and n["pid"] != old_pids[n["host"]] for n in after["nodes"]), after
        assert after["ring"]["state"] == "serving", after
        assert orch("plan", started.cluster_file, "--detailed-exitcode",
                    *known).returncode == 0
        completion = asyncio.run(chat_completion(started.api_url, PROMPT,
                                                 max_tokens=MAX_TOKENS, timeout=300))
        assert list(completion.token_ids) == expected
    finally:
        sandbox.down(tmp_path / "sandbox")
