"""Roll a node out of a serving ring and back in: `orch drain` / `orch undrain` end to end."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from orchestrator.simulator import cluster as sandbox
from orchestrator.verify.health import chat_completion
from tests.e2e.test_ring import reference
from tests.fixtures.cli import run_orch as orch

PROMPT = "Say OK."
MAX_TOKENS = 8
REPO = Path(__file__).resolve().parents[2]


def test_drain_and_undrain_keep_serving_the_same_tokens(tmp_path: Path) -> None:
    started = sandbox.up(tmp_path / "sandbox", 3)
    known = ("--known-hosts", str(started.known_hosts))
    inventory = tmp_path / "sandbox" / "inventory.yml"
    original = inventory.read_text()
    model = tmp_path / "sandbox" / "model"
    try:
        assert orch("apply", started.cluster_file, "--yes", *known).returncode == 0
        expected, _ = reference(model, PROMPT, MAX_TOKENS)

        drained = orch("drain", started.cluster_file, "mac3", "--json", *known)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        report = json.loads(drained.stdout)
        assert report["health"]["ok"], report
        assert report["outage_s"] is not None and report["outage_s"] >= 0, report
        print(f"drain outage: {report['outage_s']:.2f} s")
        moved = report["cutover_transfers"]
        assert moved is None or moved["files"] == 0, "shard bytes moved during the outage"
        assert "    drained: true\n" in inventory.read_text()
        completion = asyncio.run(chat_completion(started.api_url, PROMPT,
                                                 max_tokens=MAX_TOKENS, timeout=300))
        assert list(completion.token_ids) == expected
        status = json.loads(orch("status", started.cluster_file, "--json", *known).stdout)
        assert status["ring"]["size"] == 2 and status["ring"]["state"] == "serving", status
        assert orch("plan", started.cluster_file, "--detailed-exitcode",
                    *known).returncode == 0

        undrained = orch("undrain", started.cluster_file, "mac3", "--json", *known)
        assert undrained.returncode == 0, undrained.stdout + undrained.stderr
        assert inventory.read_text() == original, "comments and layout must survive"
        status = json.loads(orch("status", started.cluster_file, "--json", *known).stdout)
        assert status["ring"]["size"] == 3 and status["ring"]["state"] == "serving", status
        assert orch("plan", started.cluster_file, "--detailed-exitcode",
                    *known).returncode == 0
        completion = asyncio.run(chat_completion(started.api_url, PROMPT,
                                                 max_tokens=MAX_TOKENS, timeout=300))
        assert list(completion.token_ids) == expected
    finally:
        sandbox.down(tmp_path / "sandbox")


def test_a_drain_the_others_cannot_hold_changes_nothing(tmp_path: Path) -> None:
    from tests.fixtures.deepseek_like import make_deepseek_like

    model = make_deepseek_like(tmp_path / "r1")
    shutil.copy(REPO / "inventories" / "lab.yml", tmp_path / "lab.yml")
    before = (tmp_path / "lab.yml").read_text()
    cluster = tmp_path / "r1.yml"
    cluster.write_text(f"name: r1\ninventory: lab.yml\nmodel:\n  path: {model}\n"
                       "placement:\n  nodes: [studio-1, studio-2, mbp-m4]\n")
    proc = orch("drain", cluster, "studio-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "GB short" in proc.stderr or "short" in proc.stderr, proc.stderr
    assert (tmp_path / "lab.yml").read_text() == before
