"""Roll a node out of a serving ring and back in: `orch drain` / `orch undrain` end to end, on
the shared ``serving`` sandbox (see conftest), which it leaves converged with all three nodes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from orchestrator.verify.health import chat_completion
from tests.e2e.conftest import MAX_TOKENS, PROMPT, Serving


def test_drain_and_undrain_keep_serving_the_same_tokens(serving: Serving) -> None:
    inventory = serving.directory / "inventory.yml"
    original = inventory.read_text()
    try:
        roll_out_and_back(serving, inventory, original)
    finally:  # a failure half way must not leave the shared ring on two nodes for the rest
        if inventory.read_text() != original:
            inventory.write_text(original)
            restored = serving.orch("apply", "--yes")
            assert restored.returncode == 0, restored.output


def roll_out_and_back(serving: Serving, inventory: Path, original: str) -> None:
    drained = serving.orch("drain", "mac3", "--json")
    assert drained.returncode == 0, drained.output
    report = json.loads(drained.stdout)
    assert report["health"]["ok"], report
    assert report["outage_s"] is not None and report["outage_s"] >= 0, report
    print(f"drain outage: {report['outage_s']:.2f} s")
    moved = report["cutover_transfers"]
    assert moved is None or moved["files"] == 0, "shard bytes moved during the outage"
    assert "    drained: true\n" in inventory.read_text()
    completion = asyncio.run(chat_completion(serving.api_url, PROMPT,
                                             max_tokens=MAX_TOKENS, timeout=300))
    assert completion.token_ids == serving.expected
    status = json.loads(serving.orch("status", "--json").stdout)
    assert status["ring"]["size"] == 2 and status["ring"]["state"] == "serving", status
    assert serving.orch("plan", "--detailed-exitcode").returncode == 0

    undrained = serving.orch("undrain", "mac3", "--json")
    assert undrained.returncode == 0, undrained.output
    back = json.loads(undrained.stdout)
    assert back["outage_s"] is not None and back["outage_s"] >= 0, back
    print(f"undrain outage: {back['outage_s']:.2f} s")
    # Not a speed check: a rank stuck at the rendezvous or a ring that formed only on a retry
    # (tens of seconds) would still pass the rest. Typical here: 3-5 s.
    assert back["outage_s"] < 30, back
    # The returning node's environment, wheelhouse and files were staged while the old ring
    # served (issue #13 item 12): the cut-over only restarts ranks, as a drain's does. Said by
    # what the outage was spent on, not by its length, which a busy machine stretches.
    worker = "launchd:system/com.orch.sandbox.worker"
    configs = [f"file:~/.orch/serve/sandbox/{name}" for name in ("hostfile.json", "worker.json")]
    restarts = [f"{host} {r} update" for host in ("mac1", "mac2") for r in (*configs, worker)]
    assert sorted(back["cutover_changes"]) == sorted([*restarts, f"mac3 {worker} create"]), back
    assert back["cutover_transfers"] is None or back["cutover_transfers"]["files"] == 0, back
    assert inventory.read_text() == original, "comments and layout must survive"
    status = json.loads(serving.orch("status", "--json").stdout)
    assert status["ring"]["size"] == 3 and status["ring"]["state"] == "serving", status
    assert serving.orch("plan", "--detailed-exitcode").returncode == 0
    completion = asyncio.run(chat_completion(serving.api_url, PROMPT,
                                             max_tokens=MAX_TOKENS, timeout=300))
    assert completion.token_ids == serving.expected
