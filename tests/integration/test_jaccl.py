"""runtime.backend jaccl on simulated Macs: facts through real sshd and the agent (the
``ibv_devices`` and ``sw_vers`` stand-ins), the exact refusals, then the rendered RDMA setup.

MLX's Linux build has no jaccl, so nothing here forms an RDMA group: what is real is
everything up to the worker's start — SSH, the agent's facts, the planner's refusal before
any change, and the files and environment the plan would install.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.executor import SSHExecutor, SSHOptions, Target
from orchestrator.facts import FactRequest
from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import HostSpec, RunningHost, start_hosts, stop_hosts
from tests.fixtures.cli import orch
from tests.fixtures.facts import read_facts
from tests.fixtures.tiny_model import make_tiny_deepseek
from tests.integration.conftest import TreeHash

GIB = 1024**3
NAMES = ("studio-1", "studio-2", "mbp-m4")
MESH = {"studio-1": "{studio-2: rdma_en2, mbp-m4: rdma_en3}",
        "studio-2": "{studio-1: rdma_en2, mbp-m4: rdma_en4}",
        "mbp-m4": "{studio-2: rdma_en1}"}  # its cable to studio-1 is not declared


@pytest.fixture(scope="module")
def macs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningHost]]:
    """studio-1 ready for RDMA; studio-2 on 26.2 with RDMA disabled; mbp-m4 on macOS 26.1
    (no ibv_devices at all)."""
    specs = [
        HostSpec("studio-1", 192 * GIB, address="127.0.0.81", macos_version="26.2",
                 build_version="25C56", rdma_devices=("rdma_en2", "rdma_en3")),
        HostSpec("studio-2", 192 * GIB, address="127.0.0.82", macos_version="26.2",
                 build_version="25C56", rdma_devices=()),
        HostSpec("mbp-m4", 128 * GIB, "Apple M4 Max", address="127.0.0.83",
                 macos_version="26.1", build_version="25B78"),
    ]
    hosts = start_hosts(tmp_path_factory.mktemp("jaccl-hosts"), specs)
    try:
        yield hosts
    finally:
        stop_hosts(hosts)


def write_cluster(directory: Path, hosts: list[RunningHost], model: Path) -> Path:
    inventory = inventory_yaml(hosts, [f"10.7.0.{i + 1}" for i in range(3)])
    for name, devices in MESH.items():
        inventory = inventory.replace(f"  {name}:\n", f"  {name}:\n    rdma: {devices}\n")
    (directory / "inventory.yml").write_text(inventory)
    path = directory / "cluster.yml"
    path.write_text(f"name: rdma\ninventory: inventory.yml\nmodel:\n  path: {model}\n"
                    f"placement:\n  nodes: [{', '.join(NAMES)}]\n"
                    "runtime:\n  backend: jaccl\n  packages: []\n")
    return path


def set_identity(host: RunningHost, **fields: object) -> None:
    path = host.root / "host.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_plan_refuses_with_every_reason_then_renders_the_devices_file(
        macs: list[RunningHost], tmp_path: Path, tree_hash: TreeHash) -> None:
    model = make_tiny_deepseek(tmp_path / "model", n_layers=6, n_files=3)
    cluster = write_cluster(tmp_path, macs, model)
    known = macs[0].known_hosts_file
    before = [tree_hash(h, "home") for h in macs]

    refused = orch("plan", cluster, "--detailed-exitcode", known_hosts=known)
    assert refused.returncode == 1, refused.output
    assert "nothing was changed: runtime.backend jaccl cannot form:\n" \
           "  studio-2: RDMA disabled — run `rdma_ctl enable` from Recovery\n" \
           "  mbp-m4: macOS 26.1 — jaccl needs macOS ≥ 26.2\n" \
           "  no cable between mbp-m4 and studio-1" in refused.stderr
    assert "Traceback" not in refused.output
    assert [tree_hash(h, "home") for h in macs] == before

    # The user updates the MacBook, enables RDMA on studio-2 (Recovery) and declares the cable.
    set_identity(macs[1], rdma_devices=["rdma_en2", "rdma_en4"])
    set_identity(macs[2], macos_version="26.2", build_version="25C56",
                 rdma_devices=["rdma_en1", "rdma_en3"])
    fixed = {**MESH, "mbp-m4": "{studio-1: rdma_en3, studio-2: rdma_en1}"}
    inventory = (tmp_path / "inventory.yml").read_text().replace(
        f"rdma: {MESH['mbp-m4']}", f"rdma: {fixed['mbp-m4']}")
    (tmp_path / "inventory.yml").write_text(inventory)

    # Nothing refuses now: the plan is the changes to make (a read-only plan stops at the
    # wheelhouse this controller has not downloaded; the rendered files are unit-tested).
    planned = orch("plan", cluster, "--detailed-exitcode", "--json", known_hosts=known)
    assert planned.returncode == 2, planned.output
    assert {h["host"] for h in json.loads(planned.stdout)["hosts"]} == set(NAMES)
    assert "cannot form" not in planned.stderr
    assert [tree_hash(h, "home") for h in macs] == before  # a plan writes nothing


def test_the_agent_answers_rdma_through_ssh(macs: list[RunningHost]) -> None:
    """`orch facts` is what the planner sees; the RDMA answer is asked only for jaccl."""
    async def ask() -> list[tuple[str | None, tuple[str, ...] | None]]:
        executor = SSHExecutor(SSHOptions(known_hosts=macs[0].known_hosts_file))
        conns = await executor.connect_all(
            Target(h.name, h.address, h.port, h.user, h.identity_file) for h in macs)
        try:
            got = []
            for host in macs:
                conn = conns[host.name]
                assert not isinstance(conn, Exception), conn
                facts = await read_facts(conn, FactRequest(rdma=True, managed=False))
                got.append((facts.macos_version, facts.rdma_devices))
            return got
        finally:
            for conn in conns.values():
                await conn.close()

    set_identity(macs[0], rdma_devices=["rdma_en2", "rdma_en3"])
    set_identity(macs[1], rdma_devices=[])
    set_identity(macs[2], macos_version="26.1", rdma_devices=None)
    assert asyncio.run(ask()) == [("26.2", ("rdma_en2", "rdma_en3")), ("26.2", ()),
                                  ("26.1", ())]
