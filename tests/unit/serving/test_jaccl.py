"""MLX's RDMA backends on stand-ins: the rendered MLX_IBV_DEVICES file and environment, the
facts they rest on, and the exact refusals (no Mac with Thunderbolt 5 is available to CI)."""

from __future__ import annotations

import json
import plistlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent.facts import rdma_devices
from orchestrator.config import Cluster, Host, ModelSpec, PlacementSpec, Runtime, load_cluster
from orchestrator.errors import ActionFailed, ConfigError, PlanError
from orchestrator.facts import FactRequest, HostFacts, parse_facts
from orchestrator.placement.choose import Placement
from orchestrator.plan.backend import backend_problems, check_backend
from orchestrator.resources.files import File
from orchestrator.resources.launchd import LaunchdService
from orchestrator.resources.worker import WorkerSettings, worker_config, worker_resources
from orchestrator.simulator.hosts import MACOS_DIR, STANDIN_SUPPORT
from tests.fixtures.facts import HOME, host_facts
from tests.unit.serving.helpers import files, placement

LAB = ("studio-1", "studio-2", "mbp-m4")
# The guide's three Macs, each cabled to the other two (a full mesh of Thunderbolt 5).
MESH = {
    "studio-1": {"studio-2": "rdma_en2", "mbp-m4": "rdma_en3"},
    "studio-2": {"studio-1": "rdma_en2", "mbp-m4": "rdma_en4"},
    "mbp-m4": {"studio-1": "rdma_en3", "studio-2": "rdma_en1"},
}


def lab(backend: str = "jaccl", rdma: dict[str, dict[str, str]] | None = None) -> Cluster:
    rdma = MESH if rdma is None else rdma
    hosts = {name: Host(name, f"{name}.local", f"10.0.0.{i + 1}", (192, 192, 128)[i],
                        rdma=tuple(sorted(rdma.get(name, {}).items())))
             for i, name in enumerate(LAB)}
    return Cluster(name="r1", file=Path("/cluster.yml"), inventory_file=None, hosts=hosts,
                   model=ModelSpec(None, None, Path("/model")),
                   placement=PlacementSpec(nodes=LAB),
                   runtime=Runtime(backend=backend))  # type: ignore[arg-type]


def ranks(c: Cluster) -> Placement:
    p = placement(c)
    assert [n.name for n in p.nodes] == list(LAB)
    return p


def rendered(c: Cluster, rank: int) -> tuple[dict[str, str], dict[str, str]]:
    """Rank ``rank``'s files by path and its job's environment."""
    p = ranks(c)
    items = worker_resources(c, p, p.nodes[rank], home=HOME, system="Darwin", user="orch",
                             model_dir="~/.orch/models/r1", files=files())
    written = {r.path: r.content for r in items if isinstance(r, File)}
    service = next(r for r in items if isinstance(r, LaunchdService))
    env: dict[str, str] = plistlib.loads(service.plist.encode())["EnvironmentVariables"]
    return written, env


def test_jaccl_full_mesh_renders_mlx_launch_devices_file_and_environment() -> None:
    c = lab("jaccl")
    for rank in range(3):
        written, env = rendered(c, rank)
        devices = written["~/.orch/serve/r1/ibv_devices.json"]
        assert json.loads(devices) == [[None, "rdma_en2", "rdma_en3"],
                                       ["rdma_en2", None, "rdma_en4"],
                                       ["rdma_en3", "rdma_en1", None]]
        assert devices == json.dumps(json.loads(devices)) + "\n"  # as mlx.launch writes it
        assert "~/.orch/serve/r1/hostfile.json" not in written
        assert env["MLX_RANK"] == str(rank)
        assert env["MLX_IBV_DEVICES"] == f"{HOME}/.orch/serve/r1/ibv_devices.json"
        assert env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:47100"  # rank 0's ring_ip:ring_port
        assert "MLX_JACCL_RING" not in env and "MLX_HOSTFILE" not in env
        config = json.loads(written["~/.orch/serve/r1/worker.json"])
        assert config["backend"] == "jaccl"


def test_jaccl_ring_keeps_only_ring_neighbours_and_sets_the_ring_flag() -> None:
    ring4 = ("a", "b", "c", "d")
    rdma = {"a": {"b": "rdma_en1", "d": "rdma_en2", "c": "rdma_en3"},
            "b": {"a": "rdma_en1", "c": "rdma_en2"},
            "c": {"b": "rdma_en1", "d": "rdma_en2"},
            "d": {"c": "rdma_en1", "a": "rdma_en2"}}
    hosts = {n: Host(n, f"{n}.local", f"10.0.0.{i + 1}", 192, rdma=tuple(sorted(rdma[n].items())))
             for i, n in enumerate(ring4)}
    c = Cluster(name="r1", file=Path("/c.yml"), inventory_file=None, hosts=hosts,
                model=ModelSpec(None, None, Path("/model")), placement=PlacementSpec(nodes=ring4),
                runtime=Runtime(backend="jaccl-ring"))
    p = placement(c, layer_bytes=(10**6,) * 8)
    assert [n.name for n in p.nodes] == list(ring4)
    items = worker_resources(c, p, p.nodes[2], home=HOME, system="Darwin", user="orch",
                             model_dir="~/m", files=files())
    devices = next(r.content for r in items
                   if isinstance(r, File) and r.path.endswith("ibv_devices.json"))
    # a's cable to c is declared but not a ring edge: null, as mlx.distributed_config writes.
    assert json.loads(devices) == [[None, "rdma_en1", None, "rdma_en2"],
                                   ["rdma_en1", None, "rdma_en2", None],
                                   [None, "rdma_en1", None, "rdma_en2"],
                                   ["rdma_en2", None, "rdma_en1", None]]
    env = plistlib.loads(next(r for r in items if isinstance(r, LaunchdService)).plist.encode())
    assert env["EnvironmentVariables"]["MLX_JACCL_RING"] == "1"
    assert backend_problems(c, p, {n: rdma_facts(n, "26.2", ("rdma_en1", "rdma_en2"))
                                   for n in ring4}) == []


def test_ring_backend_renders_what_it_did_before() -> None:
    c = lab("ring")
    written, env = rendered(c, 1)
    assert "~/.orch/serve/r1/ibv_devices.json" not in written
    assert env["MLX_HOSTFILE"] == f"{HOME}/.orch/serve/r1/hostfile.json"
    assert not {"MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR"} & set(env)
    p = ranks(c)
    config = worker_config(c, p, home=HOME, model_dir="~/m", files=files(),
                           settings=WorkerSettings())
    assert "backend" not in json.loads(config)  # a converged ring cluster restarts nothing


def rdma_facts(host: str, version: str | None, devices: tuple[str, ...]) -> HostFacts:
    return host_facts(host, macos_version=version, rdma_devices=devices)


def lab_facts(**override: tuple[str | None, tuple[str, ...]]) -> dict[str, Any]:
    given = {"studio-1": ("26.2", ("rdma_en2", "rdma_en3")),
             "studio-2": ("26.3", ("rdma_en2", "rdma_en4")),
             "mbp-m4": ("26.2.1", ("rdma_en1", "rdma_en3"))} | override
    return {h: rdma_facts(h, v, d) for h, (v, d) in given.items()}


def test_a_cabled_mesh_on_macos_26_2_with_rdma_enabled_passes() -> None:
    c = lab()
    check_backend(c, ranks(c), lab_facts())


def test_refusals_are_exact_and_all_at_once() -> None:
    del_cable = {h: {p: d for p, d in peers.items() if {h, p} != {"mbp-m4", "studio-1"}}
                 for h, peers in MESH.items()}
    c = lab(rdma=del_cable)
    facts = lab_facts(**{"studio-2": ("26.2", ()), "mbp-m4": ("26.1", ())})
    assert backend_problems(c, ranks(c), facts) == [
        "studio-2: RDMA disabled — run `rdma_ctl enable` from Recovery",
        "mbp-m4: macOS 26.1 — jaccl needs macOS ≥ 26.2",
        "no cable between mbp-m4 and studio-1",
    ]
    with pytest.raises(PlanError, match=r"nothing was changed: runtime\.backend jaccl cannot"):
        check_backend(c, ranks(c), facts)


def test_one_declared_end_is_not_a_cable_and_a_device_must_exist() -> None:
    one_sided = {**MESH, "studio-1": {"studio-2": "rdma_en2"}}  # studio-1 names no mbp-m4 port
    c = lab(rdma=one_sided)
    assert backend_problems(c, ranks(c), lab_facts()) == ["no cable between mbp-m4 and studio-1"]
    c = lab()
    facts = lab_facts(**{"studio-2": ("26.2", ("rdma_en2",))})
    assert backend_problems(c, ranks(c), facts) == [
        "studio-2: rdma_en4 (to mbp-m4) is not an RDMA device there; ibv_devices lists rdma_en2"]


def test_jaccl_ring_needs_only_the_ring_of_cables() -> None:
    no_diagonal = {h: {p: d for p, d in peers.items() if {h, p} != {"mbp-m4", "studio-1"}}
                   for h, peers in MESH.items()}
    # three ranks: every pair is a ring edge, so the missing cable still refuses
    c = lab("jaccl-ring", no_diagonal)
    assert backend_problems(c, ranks(c), lab_facts()) == ["no cable between mbp-m4 and studio-1"]


def test_a_non_mac_is_refused_and_the_ring_backend_asks_nothing() -> None:
    c = lab()
    facts = lab_facts(**{"studio-1": (None, ())})
    assert backend_problems(c, ranks(c), facts)[0] == \
        "studio-1: not macOS — jaccl needs macOS ≥ 26.2"
    ring = lab("ring")
    assert backend_problems(ring, ranks(ring), {}) == []


BASE_FACTS: dict[str, Any] = {
    "agent": {"version": "x"}, "os": {"system": "Darwin", "product_version": "26.2"},
    "user": "orch", "uid": 501, "home": HOME,
    "python": {"executable": "/usr/bin/python3", "version": "3.9.6"},
    "memory_bytes": 1, "chip": "Apple M4 Max", "files": {}, "venvs": {}, "launchd": {},
    "sysctl": {}, "guards": {}, "trees": {}, "texts": {}, "managed": {},
    "counters": {"files_hashed": 0, "bytes_hashed": 0, "hash_cache_hits": 0},
}


def test_rdma_facts_are_answered_only_when_asked_and_parsed_strictly() -> None:
    asked = FactRequest(rdma=True, managed=False)
    assert asked.to_json()["rdma"] is True and "rdma" not in FactRequest().to_json()
    facts = parse_facts("mbp-m4", {**BASE_FACTS, "rdma": ["rdma_en1", "rdma_en3"]}, asked)
    assert facts.rdma_devices == ("rdma_en1", "rdma_en3")
    assert parse_facts("mbp-m4", {**BASE_FACTS, "rdma": []}, asked).rdma_devices == ()
    assert parse_facts("mbp-m4", BASE_FACTS, FactRequest(managed=False)).rdma_devices is None
    with pytest.raises(ActionFailed, match="rdma requested, not answered"):
        parse_facts("mbp-m4", BASE_FACTS, asked)
    with pytest.raises(ActionFailed, match="rdma should be a list of device names"):
        parse_facts("mbp-m4", {**BASE_FACTS, "rdma": [3]}, asked)
    assert FactRequest().merge(asked).rdma and not asked.minus(asked).rdma


def test_the_cluster_file_declares_backend_and_devices(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(
        "name: r1\nruntime: {backend: jaccl-ring}\nhosts:\n"
        "  a: {address: a.local, ring_ip: 10.0.0.1, memory_gb: 192,"
        " rdma: {b: rdma_en2}}\n"
        "  b: {address: b.local, ring_ip: 10.0.0.2, memory_gb: 192, rdma: {a: rdma_en2}}\n")
    c = load_cluster(tmp_path / "cluster.yml")
    assert c.runtime.backend == "jaccl-ring"
    assert c.hosts["a"].rdma == (("b", "rdma_en2"),)
    (tmp_path / "bad.yml").write_text(
        "name: r1\nruntime: {backend: rdma}\nhosts:\n"
        "  a: {address: a.local, ring_ip: 10.0.0.1, memory_gb: 192, rdma: {c: rdma_en2}}\n")
    with pytest.raises(ConfigError) as caught:
        load_cluster(tmp_path / "bad.yml")
    message = str(caught.value)
    assert "bad.yml:2:20: input should be 'ring', 'jaccl' or 'jaccl-ring'" in message
    (tmp_path / "peer.yml").write_text(
        "name: r1\nhosts:\n"
        "  a: {address: a.local, ring_ip: 10.0.0.1, memory_gb: 192, rdma: {c: rdma_en2}}\n"
        "  b: {address: b.local, ring_ip: 10.0.0.2, memory_gb: 192, rdma: {b: rdma_en2}}\n")
    with pytest.raises(ConfigError) as caught:
        load_cluster(tmp_path / "peer.yml")
    message = str(caught.value)
    assert "peer.yml:3:" in message and "rdma peer 'c' is not another host" in message
    assert "peer.yml:4:" in message and "rdma peer 'b' is not another host in this " \
        "inventory; expected one of: a" in message


def test_the_agent_reads_the_ibv_devices_stand_in_as_mlx_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ibv_devices", *STANDIN_SUPPORT):  # installed as a simulated host has it
        shutil.copy(MACOS_DIR / name, bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("ORCH_HOST_ROOT", str(tmp_path))
    for devices, expected in ((["rdma_en2", "rdma_en3"], ["rdma_en2", "rdma_en3"]),
                              ([], []), (None, [])):
        (tmp_path / "host.json").write_text(json.dumps({"name": "m", "rdma_devices": devices}))
        assert rdma_devices() == expected
    (tmp_path / "host.json").write_text(json.dumps({"name": "m", "rdma_devices": ["rdma_en2"]}))
    out = subprocess.run(["ibv_devices"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[:2] == ["    device          \t   node GUID",
                         "    ------          \t----------------"]
    assert lines[2].startswith("    rdma_en2        \t") and len(lines[2].split("\t")[1]) == 16
