"""Model files on the three sshd test hosts: downloaded once, spread over the "LAN", verified.

The real CLI runs in-process (click's runner) so that `engine.desired_state` can be given the
model files of this test's cluster; everything below it is real: SSH, the shipped agent zip,
the peer servers on each host's ring IP (127.0.0.11-13), the test hub (gated: every request
needs the token) with its fault injection, and placement's file lists for a tiny model.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import Cluster
from orchestrator.model.meta import ModelMeta, load_local_meta
from orchestrator.placement import plan_placement
from orchestrator.placement.intent import Intent
from orchestrator.run import engine
from orchestrator.simulator import files_only
from orchestrator.simulator.faults import Faults
from orchestrator.simulator.hosts import RunningHost
from orchestrator.simulator.hub import TestHub
from orchestrator.simulator.tiny_model import make_tiny_deepseek
from tests.fixtures import clusters
from tests.fixtures.cli import Ran
from tests.fixtures.cli import orch as run_orch

REPO = "org/tiny"
TOKEN = "hf_integration_secret_f00dfeed1234"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "tiny", n_layers=6, n_files=6)


@pytest.fixture(scope="module")
def meta(model_dir: Path) -> ModelMeta:
    return load_local_meta(model_dir)  # placement reads the local copy: the hub's counters
    # then count only what the sync itself asked for


@pytest.fixture(scope="module")
def hub(model_dir: Path) -> Iterator[TestHub]:
    with TestHub({REPO: model_dir}, token=TOKEN, cdn_host="127.0.0.2") as running:
        yield running


def free_port(addresses: Sequence[str]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every test host")


@pytest.fixture
def sync_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, meta: ModelMeta,
             test_hosts: list[RunningHost]) -> None:
    """This test's cluster declares only the model files (placement's, for the tiny model);
    a fresh controller cache; HF_TOKEN."""

    def placed(cluster: Cluster) -> dict[str, tuple[str, ...]]:
        return {n.name: n.files for n in plan_placement(cluster, meta).nodes}

    # No workers: this cluster serves nothing, it only holds the model's files.
    monkeypatch.setattr(engine, "resolve_intent", lambda cluster: Intent())
    monkeypatch.setattr(engine, "desired_state", files_only.desired_state(placed))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_cluster(directory: Path, hosts: Sequence[RunningHost], hub: TestHub,
                  nodes: Sequence[str], names: Sequence[str] | None = None) -> Path:
    """The cluster file and its inventory; ``names``: the hosts' inventory names, in order
    (their test host names by default). The peer servers bind each host's ring IP: its own
    address."""
    return clusters.write_cluster(
        directory, "synctest",
        f"model:\n  repo: {REPO}\n  endpoint: {hub.endpoint}\n"
        f"placement:\n  nodes: [{', '.join(nodes)}]\nruntime:\n  packages: []\n"
        f"  sync_port: {free_port([h.address for h in hosts])}\n", hosts=hosts, names=names)


def orch(*args: str | Path, known: Path) -> Ran:
    ran = run_orch(*args, known_hosts=known)
    assert TOKEN not in ran.output
    return ran


def model_root(host: RunningHost) -> Path:
    return host.home / ".orch" / "models" / REPO.replace("/", "--")


def held(host: RunningHost) -> dict[str, bytes]:
    root = model_root(host)
    if not root.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def needed_by(meta: ModelMeta, cluster_file: Path) -> dict[str, set[str]]:
    from orchestrator.config import load_cluster

    cluster = load_cluster(cluster_file)
    metadata = {"config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json"}
    return {n.name: set(n.files) | metadata for n in plan_placement(cluster, meta).nodes}


def wipe(hosts: Sequence[RunningHost]) -> None:
    import shutil

    for host in hosts:
        shutil.rmtree(model_root(host), ignore_errors=True)


def assert_exact(hosts: Sequence[RunningHost], needed: Mapping[str, set[str]],
                 model_dir: Path) -> None:
    for host in hosts:
        files = held(host)
        assert set(files) == needed.get(host.name, set()), host.name
        for name, data in files.items():
            assert data == (model_dir / name).read_bytes(), (host.name, name)


def no_token_on(hosts: Sequence[RunningHost]) -> None:
    for host in hosts:
        for path in host.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert TOKEN.encode() not in path.read_bytes(), path


def transfers_of(stdout: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(stdout)["outcome"]["transfers"]
    return summary


@pytest.mark.usefixtures("sync_env")
def test_each_node_gets_exactly_its_files_and_each_leaves_the_hub_once(
    test_hosts: list[RunningHost], hub: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path
) -> None:
    wipe(test_hosts)
    hub.reset_stats()
    cluster = write_cluster(tmp_path, test_hosts, hub, [h.name for h in test_hosts])
    known = test_hosts[0].known_hosts_file
    ran = orch("apply", cluster, "--yes", "--json", known=known)
    assert ran.returncode == 0, ran.stderr
    needed = needed_by(meta, cluster)
    assert len(needed) == 3 and all(needed.values())
    assert len({frozenset(v) for v in needed.values()}) == 3  # different files per node
    assert_exact(test_hosts, needed, model_dir)
    stats = hub.stats()
    served_files = {p.name for p in model_dir.iterdir()}
    assert stats.complete_serves == {f"{REPO}/{name}": 1 for name in served_files}
    assert stats.total_bytes_served == sum((model_dir / n).stat().st_size for n in served_files)
    assert stats.cdn_requests_with_authorization == 0
    summary = transfers_of(ran.stdout)
    assert summary["failed"] == 0 and summary["bytes"]["lan"] > 0
    assert summary["bytes"]["hub"] + summary["bytes"]["local"] == stats.total_bytes_served
    no_token_on(test_hosts)

    ran = orch("plan", cluster, "--detailed-exitcode", known=known)
    assert ran.returncode == 0 and "No changes." in ran.stdout
    ran = orch("facts", cluster, known=known)
    facts = json.loads(ran.stdout)
    for host in test_hosts:  # planning a converged cluster reads no file data
        counters = facts[host.name]["counters"]
        assert counters["bytes_hashed"] == 0 and counters["files_hashed"] == 0, counters
        assert counters["hash_cache_hits"] >= len(needed[host.name])


@pytest.mark.usefixtures("sync_env")
def test_a_flaky_hub_costs_at_most_a_tenth_more(
    test_hosts: list[RunningHost], hub: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path
) -> None:
    wipe(test_hosts)
    hub.reset_stats()
    hub.set_faults(Faults(cut_fraction=0.3, error_fraction=0.1, seed=5))
    try:
        cluster = write_cluster(tmp_path, test_hosts, hub, [h.name for h in test_hosts])
        ran = orch("apply", cluster, "--yes", "--json", known=test_hosts[0].known_hosts_file)
    finally:
        hub.set_faults(Faults())
    assert ran.returncode == 0, ran.stderr
    assert_exact(test_hosts, needed_by(meta, cluster), model_dir)
    stats = hub.stats()
    model_bytes = sum(p.stat().st_size for p in model_dir.iterdir())
    assert stats.faults["cut"] > 0 and stats.faults["error"] > 0, stats.faults
    assert stats.total_bytes_served <= 1.1 * model_bytes, (stats.total_bytes_served, model_bytes)
    assert transfers_of(ran.stdout)["retries"] > 0


@pytest.mark.usefixtures("sync_env")
def test_a_changed_shard_is_reported_and_repaired_from_a_peer(
    test_hosts: list[RunningHost], hub: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path
) -> None:
    cluster = write_cluster(tmp_path, test_hosts, hub, [h.name for h in test_hosts])
    known = test_hosts[0].known_hosts_file
    assert orch("apply", cluster, "--yes", known=known).returncode == 0
    victim = test_hosts[1]
    shard = sorted(n for n in held(victim) if n.endswith(".safetensors"))[0]
    path = model_root(victim) / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data) + b"\0")  # one byte changed; size and mtime too

    ran = orch("plan", cluster, "--detailed-exitcode", "--json", known=known)
    assert ran.returncode == 2
    changes = [(h["host"], c["resource"], [s["file"] for s in c["steps"]])
               for h in json.loads(ran.stdout)["hosts"] for c in h["changes"]]
    assert changes == [(victim.name, "model_files:~/.orch/models/org--tiny", [shard])]

    hub.reset_stats()
    ran = orch("apply", cluster, "--yes", "--json", known=known)
    assert ran.returncode == 0, ran.stderr
    assert path.read_bytes() == (model_dir / shard).read_bytes()
    [fetch] = transfers_of(ran.stdout)["fetches"]
    assert fetch["kind"] == "lan" and fetch["source"] != victim.name
    assert hub.stats().bytes_served.get(f"{REPO}/{shard}", 0) == 0  # not from the hub
    assert orch("plan", cluster, "--detailed-exitcode", known=known).returncode == 0


@pytest.mark.usefixtures("sync_env")
def test_a_node_added_to_the_placement_gets_its_files_from_peers(
    test_hosts: list[RunningHost], hub: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path
) -> None:
    wipe(test_hosts)
    two = write_cluster(tmp_path / "two", test_hosts, hub, [h.name for h in test_hosts[:2]])
    known = test_hosts[0].known_hosts_file
    assert orch("apply", two, "--yes", known=known).returncode == 0
    assert held(test_hosts[2]) == {}
    three = write_cluster(tmp_path / "three", test_hosts, hub, [h.name for h in test_hosts])

    hub.reset_stats()
    ran = orch("apply", three, "--yes", "--json", known=known)
    assert ran.returncode == 0, ran.stderr
    plan = json.loads(ran.stdout)["plan"]
    assert [h["host"] for h in plan["hosts"] if h["changes"]] == [test_hosts[2].name]
    summary = transfers_of(ran.stdout)
    assert summary["bytes"]["hub"] == 0 and summary["bytes"]["lan"] > 0
    assert {f["source"] for f in summary["fetches"]} <= {h.name for h in test_hosts[:2]}
    assert not any(k.endswith(".safetensors") for k in hub.stats().bytes_served)
    needed = needed_by(meta, three)
    for host in test_hosts[:2]:  # the others keep what they hold (a LAN source; other layers)
        assert needed[host.name] <= set(held(host))
    assert set(held(test_hosts[2])) == needed[test_hosts[2].name]
    assert orch("plan", three, "--detailed-exitcode", known=known).returncode == 0


@pytest.mark.usefixtures("sync_env")
@pytest.mark.parametrize(("holder", "needer"), [("hub", "local"), ("local", "hub")])
def test_hosts_named_hub_and_local_copy_from_each_other_as_peers(
    holder: str, needer: str, test_hosts: list[RunningHost], hub: TestHub, model_dir: Path,
    meta: ModelMeta, tmp_path: Path
) -> None:
    """Validation allows host names ``hub`` and ``local``. A copy planned from such a host
    comes from that host over the LAN: not from the Hub (the peer ``hub``), and not looked up
    among the controller's copies (the peer ``local``, which ended in a KeyError)."""
    wipe(test_hosts)
    names = ["hub", "local"]
    host = dict(zip(names, test_hosts[:2], strict=True))
    known = test_hosts[0].known_hosts_file
    alone = write_cluster(tmp_path / "alone", test_hosts[:2], hub, [holder], names)
    assert orch("apply", alone, "--yes", known=known).returncode == 0
    assert held(host[needer]) == {}
    both = write_cluster(tmp_path / "both", test_hosts[:2], hub, [holder, needer], names)

    hub.reset_stats()
    ran = orch("apply", both, "--yes", "--json", known=known)
    assert ran.returncode == 0, ran.output
    summary = transfers_of(ran.stdout)
    assert summary["files"] > 0 and summary["failed"] == 0
    assert {(f["host"], f["source"], f["kind"]) for f in summary["fetches"]} == {
        (needer, holder, "lan")}
    assert summary["bytes"]["hub"] == summary["bytes"]["local"] == 0
    assert not any(k.endswith(".safetensors") for k in hub.stats().bytes_served)
    needed = needed_by(meta, both)
    assert set(held(host[needer])) == needed[needer]
    assert_exact([host[needer]], {host[needer].name: needed[needer]}, model_dir)
    assert orch("plan", both, "--detailed-exitcode", known=known).returncode == 0
