"""The agent's sync ops, run as nodes run them: the shipped zip, a JSON request on stdin."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import agent_source, agent_source_hash
from orchestrator.errors import ActionFailed
from orchestrator.executor.agentcall import call_agent
from orchestrator.executor.fake import LocalConnection
from orchestrator.simulator.faults import Faults
from orchestrator.simulator.hub import TestHub
from tests.unit.test_hub import until

TOKEN = "hf_agent_ops_secret_987654321"
PEER_TOKEN = "peer-token-0123456789abcdef"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agent") / "agent.pyz"
    path.write_bytes(agent_source())
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def start(shipped: Path, home: Path, op: str, request: dict[str, Any]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-I", str(shipped), op], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HOME": str(home)})
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(request).encode() + b"\n")
    proc.stdin.close()
    proc.stdin = None  # sent in full: communicate() has nothing more to write
    return proc


def call(shipped: Path, home: Path, op: str, request: dict[str, Any]) -> tuple[int, Any]:
    proc = start(shipped, home, op, request)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, json.loads(out)


def ok(shipped: Path, home: Path, op: str, request: dict[str, Any]) -> Any:
    status, answer = call(shipped, home, op, request)
    assert status == 0, answer
    return answer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    (root / "model-00001-of-00001.safetensors").write_bytes(os.urandom(300_000))
    return root


@pytest.fixture
def hub(model: Path) -> Iterator[TestHub]:
    with TestHub({"org/m": model}, token=TOKEN) as running:
        yield running


def wanted(model: Path) -> dict[str, Any]:
    data = (model / "model-00001-of-00001.safetensors").read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_fetch_puts_a_verified_file_in_place_and_caches_its_hash(
    shipped: Path, home: Path, hub: TestHub, model: Path
) -> None:
    want = wanted(model)
    request = {"path": "~/m/w.safetensors", **want,
               "url": hub.resolve_url("org/m", "model-00001-of-00001.safetensors"),
               "headers": {"Authorization": f"Bearer {TOKEN}"}}
    answer = ok(shipped, home, "fetch", request)
    assert answer["skipped"] is False and answer["sha256"] == want["sha256"]
    assert answer["bytes_downloaded"] == want["size"]
    assert hashlib.sha256((home / "m" / "w.safetensors").read_bytes()).hexdigest() == \
        want["sha256"]
    facts = ok(shipped, home, "facts", {"files": ["~/m/w.safetensors"]})
    assert facts["files"]["~/m/w.safetensors"]["sha256"] == want["sha256"]
    assert facts["counters"]["bytes_hashed"] == 0  # recorded at fetch: facts reads nothing
    again = ok(shipped, home, "fetch", request)
    assert again["skipped"] is True and again["bytes_downloaded"] == 0
    assert TOKEN not in json.dumps([answer, again])
    assert TOKEN not in "".join(p.read_text(errors="replace")
                                for p in home.rglob("*") if p.is_file())


def test_fetch_failures_are_reported_without_the_token(
    shipped: Path, home: Path, hub: TestHub, model: Path
) -> None:
    url = hub.resolve_url("org/m", "model-00001-of-00001.safetensors")
    wrong = "Bearer hf_wrong_token_1234567890"
    status, answer = call(shipped, home, "fetch", {"path": "~/w", **wanted(model), "url": url,
                                                   "headers": {"Authorization": wrong}})
    assert status == 1 and "HTTP 401" in answer["error"] and "token was refused" in \
        answer["error"]
    assert "hf_wrong_token" not in json.dumps(answer)
    status, answer = call(shipped, home, "fetch", {
        "path": "~/w", "size": wanted(model)["size"], "sha256": "0" * 64, "url": url,
        "headers": {"Authorization": f"Bearer {TOKEN}"}})
    assert status == 1 and "does not match its hash" in answer["error"]
    assert TOKEN not in json.dumps(answer) and not (home / "w").exists()
    assert not (home / "w.partial").exists()  # the refused token left no empty partial


def test_a_404_leaves_no_partial_behind(shipped: Path, home: Path, model: Path) -> None:
    """A failure that kept no byte leaves nothing to resume, so no empty ``.partial``."""
    with TestHub({"org/m": model}, faults=Faults(not_found_fraction=1.0)) as missing:
        url = missing.resolve_url("org/m", "model-00001-of-00001.safetensors")
        status, answer = call(shipped, home, "fetch", {"path": "~/m/w", **wanted(model),
                                                       "url": url})
    assert status == 1 and "HTTP 404" in answer["error"]
    assert sorted(p.name for p in (home / "m").iterdir()) == []


def test_fetch_cuts_a_silent_connection_after_its_read_timeout(
    shipped: Path, home: Path, model: Path
) -> None:
    """``read_timeout`` reaches the transfer: a body that stalls for 30 s is hung up on by
    the agent itself (the hub sees its stalls abandoned) and resumed on a new connection."""
    faults = Faults(stall_fraction=0.5, stall_seconds=30, seed=2)
    retries = 0
    with TestHub({"org/m": model}, faults=faults) as stalling:
        url = stalling.resolve_url("org/m", "model-00001-of-00001.safetensors")
        # The signed CDN URL varies, so which answer stalls does too: fetch (fresh copies)
        # until one has (each fetch stalls at least once with probability >= 1/2).
        for n in range(12):
            answer = ok(shipped, home, "fetch", {"path": f"~/m/w{n}", **wanted(model),
                                                 "url": url, "read_timeout": 0.5})
            assert answer["sha256"] == wanted(model)["sha256"]
            retries += answer["retries"]
            if stalling.stats().faults["stall"]:
                break
        stalls = stalling.stats().faults["stall"]
        assert until(lambda: stalling.stats().stalls_abandoned == stalls)
    assert stalls >= 1 and retries == stalls
    status, bad = call(shipped, home, "fetch", {"path": "~/m/x", **wanted(model), "url": url,
                                                "read_timeout": 0})
    assert status == 1 and "read_timeout must be a positive" in bad["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_until_stopped_then_say_what_was_served(
    shipped: Path, home: Path, tmp_path: Path, model: Path
) -> None:
    (home / "m").mkdir()
    (home / "m" / "w").write_bytes((model / "model-00001-of-00001.safetensors").read_bytes())
    port = free_port()
    server = start(shipped, home, "serve", {
        "files": {"/w": "~/m/w"}, "bind": "127.0.0.1", "port": port, "token": PEER_TOKEN,
        "run_id": "run-0001"})
    peer = tmp_path / "peer"
    peer.mkdir()
    fetched = ok(shipped, peer, "fetch", {"path": "~/w", **wanted(model),
                                          "url": f"http://127.0.0.1:{port}/w",
                                          "headers": {"Authorization": f"Bearer {PEER_TOKEN}"},
                                          "retries": 20, "backoff": 0.05})
    assert fetched["sha256"] == wanted(model)["sha256"]
    assert ok(shipped, home, "serve_stop", {"run_id": "run-0001"}) == {"changed": True}
    out, err = server.communicate(timeout=30)
    answer = json.loads(out)
    assert server.returncode == 0, err
    assert answer["reason"] == "stopped" and answer["port"] == port
    assert answer["bytes_served"] == {"/w": wanted(model)["size"]}
    assert not list((home / ".orch" / "sync").iterdir())  # record and stop request gone


def test_a_server_left_by_a_dead_run_gives_up_its_port(shipped: Path, home: Path) -> None:
    port = free_port()
    request = {"files": {}, "bind": "127.0.0.1", "port": port, "token": PEER_TOKEN}
    old = start(shipped, home, "serve", {**request, "run_id": "old-run-1"})
    deadline = time.monotonic() + 10
    while not (home / ".orch" / "sync" / f"serve-{port}.json").exists():
        assert time.monotonic() < deadline and old.poll() is None
        time.sleep(0.05)
    new = start(shipped, home, "serve", {**request, "run_id": "new-run-1"})
    assert json.loads(old.communicate(timeout=30)[0])["reason"] == "stopped"
    ok(shipped, home, "serve_stop", {"run_id": "new-run-1"})
    assert json.loads(new.communicate(timeout=30)[0])["reason"] == "stopped"


def test_a_server_whose_controller_is_gone_stops(shipped: Path, home: Path) -> None:
    server = start(shipped, home, "serve", {"files": {}, "bind": "127.0.0.1", "port": 0,
                                            "token": PEER_TOKEN, "run_id": "lonely-run"})
    assert server.stdout is not None
    server.stdout.close()  # what a dropped SSH channel does to the agent's stdout
    server.wait(timeout=15)  # the heartbeat failed: it stopped (its answer has nowhere to go)
    assert not list((home / ".orch" / "sync").glob("serve-*.json"))


def test_a_fetch_whose_controller_is_gone_exits_and_its_partial_is_resumed(
    shipped: Path, home: Path, tmp_path: Path
) -> None:
    """A dropped SSH channel (the controller killed) ends a fetch at its next heartbeat,
    however much is left to download: its partial keeps what arrived and is not locked, so
    the next run's fetch continues it instead of finding "another fetch ... is running"."""
    (tmp_path / "big").mkdir()
    data = os.urandom(3 << 20)
    (tmp_path / "big" / "w.safetensors").write_bytes(data)
    want = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with TestHub({"org/big": tmp_path / "big"}, faults=Faults(bytes_per_second=2e6)) as hub:
        request = {"path": "~/m/w", **want, "url": hub.resolve_url("org/big", "w.safetensors")}
        fetch = start(shipped, home, "fetch", request)
        partial = home / "m" / "w.partial"
        assert until(lambda: partial.exists() and partial.stat().st_size >= 1 << 20, 60)
        hub.set_faults(Faults(bytes_per_second=1e4))  # the rest would now take minutes
        assert fetch.stdout is not None
        fetch.stdout.close()  # what a dropped SSH channel does to the agent's stdout
        assert fetch.wait(timeout=30) == 75  # HANGUP_EXIT: it did not wait for the file
        kept = partial.stat().st_size
        assert 1 << 20 <= kept < len(data) and not (home / "m" / "w").exists()
        hub.set_faults(Faults())
        answer = ok(shipped, home, "fetch", request)
    assert answer["bytes_resumed"] == kept and answer["bytes_downloaded"] == len(data) - kept
    assert (home / "m" / "w").read_bytes() == data


def test_serve_refuses_bad_requests(shipped: Path, home: Path) -> None:
    base = {"files": {}, "bind": "127.0.0.1", "port": 0, "token": PEER_TOKEN, "run_id": "r" * 8}
    for change, message in [({"run_id": "../x"}, "run_id"), ({"token": "short"}, "at least 16"),
                            ({"files": {"w": "~/w"}}, "start with '/'"),
                            ({"port": "80"}, "port")]:
        status, answer = call(shipped, home, "serve", {**base, **change})
        assert status == 1 and message in answer["error"], answer


def test_prune_removes_only_undeclared_weights(shipped: Path, home: Path) -> None:
    directory = home / "m"
    directory.mkdir()
    for name in ("model-1.safetensors", "model-old.safetensors", "config.json",
                 "model-1.safetensors.partial", ".model-x.safetensors"):
        (directory / name).write_bytes(b"x")
    (directory / "model-dir.safetensors").mkdir()
    answer = ok(shipped, home, "prune", {"path": "~/m", "keep": ["model-1.safetensors"],
                                         "pattern": "model*.safetensors"})
    assert answer == {"changed": True, "removed": ["model-old.safetensors"]}
    assert sorted(p.name for p in directory.iterdir()) == [
        ".model-x.safetensors", "config.json", "model-1.safetensors",
        "model-1.safetensors.partial", "model-dir.safetensors"]
    assert ok(shipped, home, "prune", {"path": "~/gone", "keep": [], "pattern": "m*"}) == {
        "changed": False, "removed": []}


def test_sizes_reads_no_content(shipped: Path, home: Path) -> None:
    (home / "p.partial").write_bytes(b"12345")
    assert ok(shipped, home, "sizes", {"paths": ["~/p.partial", "~/none"]}) == {
        "sizes": {"~/p.partial": 5, "~/none": None}}


def test_streamed_agent_answers_facts_but_never_transfers(home: Path) -> None:
    """A read-only run streams agent.py alone: facts work (and report the shipped zip's
    version), transfer ops say why they cannot run, and nothing is written to the host."""

    async def scenario() -> None:
        conn = LocalConnection(home, name="ro")

        async def streamed(op: str, request: dict[str, Any]) -> dict[str, Any]:
            return await call_agent("ro", conn.run, op, request, stdin=None,
                                    python=sys.executable, command_timeout=60, install=False)

        facts = await streamed("facts", {"files": ["~/x"], "read_only": True})
        assert facts["agent"]["version"] == agent_source_hash()
        with pytest.raises(ActionFailed, match="needs the installed agent"):
            await streamed("fetch", {"path": "~/x", "size": 1, "sha256": "0" * 64,
                                     "url": "http://127.0.0.1:9/x"})

    asyncio.run(scenario())
    assert list(home.iterdir()) == []


def test_concurrent_agents_keep_each_others_hash_cache_entries(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetches run in parallel on a node, each agent saving the cache: none may drop another's
    entry (or the next facts would re-read those files)."""
    from orchestrator.agent import hashcache

    monkeypatch.setenv("HOME", str(home))
    for name in ("x", "y", "z"):
        (home / name).write_bytes(name.encode())
    first, second = hashcache.HashCache(), hashcache.HashCache()
    first.record(str(home / "x"), os.stat(home / "x"), "1" * 64)
    second.record(str(home / "y"), os.stat(home / "y"), "2" * 64)
    first.save()
    second.save()
    third = hashcache.HashCache()
    assert set(third.entries) == {str(home / "x"), str(home / "y")}
    third.forget(str(home / "x"))
    third.save()
    assert set(hashcache.HashCache().entries) == {str(home / "y")}
