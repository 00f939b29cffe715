"""`verify_ring` and `gather_status` against fake nodes and a fake API (no SSH, no MLX)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

from orchestrator.config import Cluster
from orchestrator.errors import HostError, HostUnreachable
from orchestrator.executor import Connection
from orchestrator.model.manifest import Entry, LocalOrigin, Manifest
from orchestrator.placement.choose import Placement
from orchestrator.resources.model_files import ModelFiles
from orchestrator.status import ClusterStatus, gather_status, parse_etime, status_json, status_text
from orchestrator.verify.ring import verify_ring
from orchestrator.worker.status import WorkerState
from tests.unit.serving.fakes import FakeAPI, FakeNode
from tests.unit.serving.helpers import cluster, placement, status


def ring() -> tuple[Cluster, Placement, dict[str, FakeNode]]:
    c = cluster(3)
    p = placement(c)
    nodes = {n.name: FakeNode(n.name, status=status(n.rank, pid=100, split=p.split))
             for n in p.nodes}
    return c, p, nodes


def conns_of(nodes: Mapping[str, FakeNode | HostError]) -> dict[str, Connection | HostError]:
    return dict(nodes)  # type: ignore[arg-type,unused-ignore]


def test_verify_ring_ready_when_rank_0_answers_and_every_rank_serves() -> None:
    c, p, nodes = ring()
    api = FakeAPI()
    health = asyncio.run(verify_ring(c, p, conns_of(nodes), timeout=5, transport=api))
    assert health.ok, health.message()
    assert health.api_url == "http://10.0.0.1:8080"
    assert health.ready.completion is not None and health.ready.completion.token_ids == (7, 9)
    assert health.message().startswith("ready: 3 rank(s) serving at http://10.0.0.1:8080")
    assert [v.host for v in health.ranks] == ["mac1", "mac2", "mac3"]
    assert api.requests[0] == "http://10.0.0.1:8080/health"


def test_verify_ring_gives_up_early_on_a_rank_that_refused_and_shows_its_log() -> None:
    c, p, nodes = ring()
    nodes["mac3"].job = {"state": "waiting", "pid": None, "last_exit": 3, "env": {}}
    nodes["mac3"].status = status(2, WorkerState.FAILED, pid=300, split=p.split,
                                  error="sha256 mismatch ~/m/f1.safetensors")
    nodes["mac3"].log = "orch-worker rank 2: refusing to start: sha256 mismatch\n"
    started = time.monotonic()
    health = asyncio.run(verify_ring(c, p, conns_of(nodes), timeout=60, watch_interval=0.05,
                                     transport=FakeAPI(chat=False)))
    assert time.monotonic() - started < 10  # not the whole timeout
    assert not health.ok
    message = health.message()
    assert "stopped waiting: rank 2 (mac3) refused to start (exit 3)" in message
    assert "rank 2 (mac3): not running (last exit 3)" in message
    assert "log lines of rank 2 (mac3)" in message
    assert "| orch-worker rank 2: refusing to start: sha256 mismatch" in message


def test_verify_ring_times_out_naming_the_rank_still_forming() -> None:
    c, p, nodes = ring()
    nodes["mac2"].status = status(1, WorkerState.RING, split=p.split)
    health = asyncio.run(verify_ring(c, p, conns_of(nodes), timeout=0.5, watch_interval=0.1,
                                     transport=FakeAPI(health=503)))
    assert not health.ok
    assert "rank 1 (mac2): still ring" in health.message()


def test_verify_ring_refuses_a_ring_of_the_wrong_size() -> None:
    c, p, nodes = ring()
    for name, node in nodes.items():
        rank = [n.name for n in p.nodes].index(name)
        if rank < 2:
            node.status = status(rank, world_size=2, split=(3, 3))
    health = asyncio.run(verify_ring(c, p, conns_of(nodes), timeout=5, transport=FakeAPI()))
    assert health.ready.ready and not health.ok
    assert "rank 0 (mac1): ring size 2, expected 3" in health.problems


# ----------------------------------------------------------------------------------- status


def gather(nodes: Mapping[str, FakeNode | HostError], api: FakeAPI,
           **kwargs: object) -> ClusterStatus:
    c = cluster(3)
    p = placement(c)
    return asyncio.run(gather_status(c, conns_of(nodes), p, transport=api,
                                     **kwargs))  # type: ignore[arg-type]


def test_status_of_a_healthy_ring() -> None:
    _, p, nodes = ring()
    model = {n.name: {"~/m/a.safetensors": "a" * 64, "~/m/b.safetensors": "b" * 64}
             for n in p.nodes}
    for node in nodes.values():
        node.files = {"~/m/a.safetensors": "a" * 64, "~/m/b.safetensors": "0" * 64}
    result = gather(nodes, FakeAPI(), model_files=model)
    assert result.healthy and result.ring == "serving"
    assert (result.ring_size, result.ranks_serving, result.expected_ranks) == (3, 3, 3)
    assert result.health == 200 and result.probe_latency_s is not None
    first = result.nodes[0]
    assert (first.host, first.rank, first.mlx, first.mlx_lm) == ("mac1", 0, "0.32.4", "0.32.2")
    assert (first.files_verified, first.files_total) == (1, 2)  # b's sha256 differs
    assert (first.worker, first.state, first.pid) == ("running", "serving", 100)
    assert first.rss_bytes == 204800 * 1024 and first.uptime_s == 3723.0
    assert first.layers == p.nodes[0].layers
    text = status_text(result)
    assert "HOST  RANK  REACHABLE  MLX" in text
    assert "ring: serving — 3/3 ranks serving, size 3 of 3 nodes" in text
    assert "api: http://10.0.0.1:8080 — probe completion" in text
    data = status_json(result)
    assert data["healthy"] is True and data["ring"]["state"] == "serving"
    assert data["nodes"][0]["layers"] == list(p.nodes[0].layers)
    assert data["nodes"][0]["rss_bytes"] == 204800 * 1024


def test_status_of_a_broken_ring_says_why() -> None:
    _, p, nodes = ring()
    nodes["mac2"].job = {"state": "running", "pid": 200, "last_exit": None, "env": {}}
    nodes["mac2"].status = status(1, WorkerState.RING, pid=200, started_at=5000.0,
                                  updated_at=5001.0, split=p.split)
    result = gather(nodes, FakeAPI(health=503))
    assert result.ring == "broken" and not result.healthy
    assert list(result.restart_reasons) == ["mac2"]
    assert result.probe_error == "/health answered 503"
    text = status_text(result)
    assert "restart needed (mac2): rank 1 restarted (now ring) after rank 0 on mac1" in text
    assert "api: http://10.0.0.1:8080 — /health answered 503" in text


def test_status_with_an_unreachable_node_and_a_stopped_worker() -> None:
    _, _, nodes = ring()
    gone = HostUnreachable("mac3", "connection refused")
    nodes["mac2"].job = {"state": "not_loaded", "pid": None, "last_exit": None, "env": {}}
    result = gather({"mac1": nodes["mac1"], "mac2": nodes["mac2"], "mac3": gone},
                    FakeAPI(chat=False))
    assert result.unreachable == ["mac3"]
    assert result.ring == "unknown" and not result.healthy
    assert result.nodes[1].worker == "not_loaded" and result.nodes[1].pid is None
    assert result.probe_error is not None and "probe completion failed" in result.probe_error
    assert "mac3: unreachable: connection refused" in status_text(result)
    del nodes["mac3"]
    nodes["mac3"] = FakeNode("mac3", status=None)
    assert gather(nodes, FakeAPI(), probe=False).ring == "down"


def test_ps_elapsed_time() -> None:
    assert parse_etime("05") == 5.0
    assert parse_etime("01:02") == 62.0
    assert parse_etime("01:02:03") == 3723.0
    assert parse_etime("2-01:02:03") == 2 * 86400 + 3723.0
    assert parse_etime("x:01") is None and parse_etime("1:2:3:4") is None


def test_status_shows_each_nodes_preflight_as_the_plan_chooses_its_python() -> None:
    """auto: the newest version every node has (3.11 here, though mac1 has a 3.12 too); a
    node with none shows no Python, and the others keep their own choice."""
    _, p, nodes = ring()
    manifest = Manifest(LocalOrigin(Path("/m")), {"a.safetensors": Entry(10**9, "a" * 64),
                                                  "b.safetensors": Entry(2 * 10**9, "b" * 64)})
    model = ModelFiles("~/m", manifest, frozenset({"a.safetensors", "b.safetensors"}))
    listed = {n.name: {"~/m/a.safetensors": "a" * 64, "~/m/b.safetensors": "b" * 64}
              for n in p.nodes}
    brew = [("/opt/homebrew/bin/python3.11", "3.11.9"), ("/opt/homebrew/bin/python3.12", "3.12.4")]
    nodes["mac1"].pythons = brew
    nodes["mac2"].pythons = brew[:1]
    nodes["mac3"].pythons = brew[:1]
    nodes["mac3"].files = {"~/m/a.safetensors": "a" * 64}  # verified there: 1 GB less to fetch
    nodes["mac3"].file_size = 10**9
    nodes["mac3"].sudo = False
    result = gather(nodes, FakeAPI(), model_files=listed,
                    preflight={n.name: model for n in p.nodes})
    lines = [n.preflight.line() for n in result.nodes if n.preflight]
    assert lines == [
        "mac1: macOS 14.5 · Python 3.11.9 (/opt/homebrew/bin/python3.11) · sudo -n ok · "
        "disk 3.0 GB to fetch (3.0 GB placed), 1000.0 GB free",
        "mac2: macOS 14.5 · Python 3.11.9 (/opt/homebrew/bin/python3.11) · sudo -n ok · "
        "disk 3.0 GB to fetch (3.0 GB placed), 1000.0 GB free",
        "mac3: macOS 14.5 · Python 3.11.9 (/opt/homebrew/bin/python3.11) · sudo -n would "
        "prompt · disk 2.0 GB to fetch (3.0 GB placed), 1000.0 GB free"]
    assert "preflight:\n  mac1: macOS 14.5" in status_text(result)
    nodes["mac2"].pythons = [("/usr/bin/python3", "3.9.6")]
    again = gather(nodes, FakeAPI(), model_files=listed, preflight={n.name: model for n in p.nodes})
    assert [n.preflight.python_version for n in again.nodes if n.preflight] == [
        "3.12.4", None, "3.11.9"]
