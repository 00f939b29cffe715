"""`orch apply` from bare hosts to a serving ring, through the real CLI and engine.

The simulated Macs, hub and cluster file come from the sandbox library (the same as `orch
sandbox up`); everything after that is the command a user runs: placement, wheelhouse, shard
sync from the hub, workers under launchd, readiness. The ring's greedy tokens must equal what
one process holding the whole model generates: every layer ran, with the right weights.

The first apply is the shared ``serving`` fixture's (see conftest): this test checks its output.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from orchestrator.verify.health import chat_completion
from tests.e2e.conftest import MAX_TOKENS, PROMPT, Serving


def status_of(serving: Serving) -> dict[str, Any]:
    status = serving.orch("status", "--json")
    assert status.returncode == 0, status.output
    report: dict[str, Any] = json.loads(status.stdout)
    return report


def test_apply_from_bare_hosts_serves_what_one_process_computes(serving: Serving) -> None:
    applied = serving.first_apply
    assert applied.returncode == 0, applied.output
    assert "Apply: 0 ok, 3 changed, 0 failed, 0 unreachable." in applied.stdout

    completion = asyncio.run(chat_completion(serving.api_url, PROMPT,
                                             max_tokens=MAX_TOKENS, timeout=300))
    assert completion.token_ids == serving.expected

    again = serving.orch("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.output
    assert "No changes." in again.stdout

    before = status_of(serving)
    assert before["ring"]["state"] == "serving", before
    assert before["ring"]["size"] == 3 and before["ring"]["serving"] == 3, before

    # One runtime setting changes: only the worker's plist, on every rank, one restart.
    text = serving.cluster_file.read_text()
    serving.cluster_file.write_text(text.replace(
        "runtime:\n", "runtime:\n  env: {MLX_RING_VERBOSE: '1'}\n", 1))
    drift = serving.orch("plan", "--detailed-exitcode", "--json")
    assert drift.returncode == 2, drift.output
    changes = [(h["host"], c["resource"], sorted(f["name"] for f in c["fields"]))
               for h in json.loads(drift.stdout)["hosts"] for c in h["changes"]]
    assert changes == [(h, "launchd:system/com.orch.sandbox.worker",
                        ["config_hash", "plist"]) for h in ("mac1", "mac2", "mac3")]
    assert serving.orch("apply", "--yes").returncode == 0
    after = status_of(serving)
    old_pids = {n["host"]: n["pid"] for n in before["nodes"]}
    assert all(n["pid"] and n["pid"] != old_pids[n["host"]] for n in after["nodes"]), after
    assert after["ring"]["state"] == "serving", after
    assert serving.orch("plan", "--detailed-exitcode").returncode == 0
    completion = asyncio.run(chat_completion(serving.api_url, PROMPT,
                                             max_tokens=MAX_TOKENS, timeout=300))
    assert completion.token_ids == serving.expected
