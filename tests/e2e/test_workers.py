"""The serving resources on simulated Macs: a real 2-rank MLX ring, converged like the engine.

Two simulated Macs (real sshd, the launchd stand-in that really supervises jobs) on
127.0.0.51-52, one big and one small. For each, `worker_resources` gives the wheelhouse push,
the venv installed offline from it, the wired limit where the share needs it, the worker's
files and its launchd job; the plan is `diff_host` per host coupled by `couple_ring`, applied
with `apply_host` — the engine's flow, minus the shard sync: each rank's model files are
copied into its model directory by the test. Then:

* `verify_ring` gets a real completion whose greedy tokens equal single-process generation;
  the host declared smaller holds fewer layers; only it gets ``iogpu.wired_limit_mb``;
* a setting changed on one host changes only its plist, and the ring restarts exactly once;
* a killed rank is restarted by launchd; a ring cannot take it back, but the ranks it left see
  their ring connection close and exit, so launchd restarts them too and the ring serves again
  with no converge (the worker's ring watch).

Everything is booted out at the end by converging to empty resource lists.

Two ranks, not three: every claim here holds between a big and a small host, and each more
rank costs a venv install and a rank to start three times over. The same heal on three ranks
(two ranks left behind, on either side of the lost one) is test_daemons' reboot, on the
shared sandbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from orchestrator.config import Cluster, load_cluster
from orchestrator.errors import HostError
from orchestrator.executor import Connection, SSHExecutor, SSHOptions, Target
from orchestrator.facts import HostFacts, JobState
from orchestrator.model.meta import load_local_meta
from orchestrator.placement import plan_placement
from orchestrator.placement.choose import Placement
from orchestrator.placement.policy import PlacementPolicy
from orchestrator.plan import Plan, diff_host
from orchestrator.plan.ring import RESTART_FIELD, couple_ring
from orchestrator.resources.base import Resource
from orchestrator.resources.layout import WorkerLayout
from orchestrator.resources.wheelhouse import Wheelhouse, cluster_platform
from orchestrator.resources.worker import WorkerSettings, worker_resources, worker_services
from orchestrator.run.apply import HostStatus, apply_host
from orchestrator.run.wheelhouse import build_wheelhouse
from orchestrator.simulator.hosts import HostSpec, RunningHost, start_hosts, stop_hosts
from orchestrator.simulator.processes import free_port
from orchestrator.status import ClusterStatus, gather_status, status_text
from orchestrator.verify.ring import RingHealth, verify_ring
from orchestrator.worker.status import parse_status
from tests.e2e.ring import reference
from tests.fixtures import clusters
from tests.fixtures.cli import orch
from tests.fixtures.facts import read_facts
from tests.fixtures.tiny_model import make_tiny_deepseek

CLUSTER = "wtest"
NAMES = ("w1", "w2")
ADDRESSES = ("127.0.0.51", "127.0.0.52")
LAYERS = 6
PROMPT = "Say OK."
MAX_TOKENS = 8
READY_TIMEOUT = 150.0
MIB = 2**20
PACKAGES = ("mlx[cpu]==0.32.4", "mlx-lm==0.32.2")
MODEL_DIR = "~/.orch/models/tiny"
SETTINGS = WorkerSettings(throttle_interval=2)

T = TypeVar("T")

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_deepseek(tmp_path_factory.mktemp("model") / "full", n_layers=LAYERS,
                              n_files=6)


def policy() -> PlacementPolicy:
    # A 4 MiB KV budget per node and a 1 MiB reserve give the tiny model Mac-like proportions:
    # the wired limit (usable // MiB) is below the RAM in MiB, as the sysctl requires.
    return PlacementPolicy(reserve_bytes=MIB, kv_cache_bytes=4 * MIB)


def memories(model: Path) -> tuple[int, int]:
    """A host that could hold the whole model twice over, one that holds only one layer."""
    meta = load_local_meta(model)
    p = policy()
    big = 2 * p.node_bytes(meta.weight_bytes) + MIB
    small = p.node_bytes(meta.shared.total + max(layer.total for layer in meta.layers)) + MIB
    return big, small


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[list[RunningHost]]:
    chips = ("Apple M2 Ultra", "Apple M4 Max")
    specs = [HostSpec(name, memory, chip, address=address)
             for name, memory, chip, address in zip(NAMES, memories(model), chips, ADDRESSES,
                                                    strict=True)]
    running = start_hosts(tmp_path_factory.mktemp("whosts"), specs)
    try:
        yield running
    finally:
        stop_hosts(running)


def write_cluster(directory: Path, hosts: Sequence[RunningHost], model: Path) -> Path:
    """A cluster file and inventory for the hosts, as a user (or `orch sandbox`) writes them."""
    p = policy()
    assert p.reserve_bytes is not None
    return clusters.write_cluster(directory, CLUSTER, f"""\
model:
  path: {model}
placement:
  nodes: [{", ".join(NAMES)}]
  reserve_gb: {p.reserve_bytes / 1e9!r}
  kv_cache_gb: {p.kv_cache_bytes / 1e9!r}
runtime:
  packages: {json.dumps(list(PACKAGES))}
  api_port: {free_port(hosts[0].address)}
  ring_port: {free_port(hosts[0].address)}
""", hosts=hosts, file=f"{CLUSTER}.yml")


def make_placement(cluster: Cluster, model: Path) -> Placement:
    """Placement as orch computes it from the cluster file (`orch status` does the same)."""
    result = plan_placement(cluster, load_local_meta(model))
    assert result.fits, result.problems
    assert result.policy == policy()
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put_model_files(host: RunningHost, model: Path, weights: Sequence[str]) -> dict[str, tuple[
        str, int | None]]:
    """What the shard sync will do: exactly this rank's files in its model directory."""
    dest = host.home / MODEL_DIR.removeprefix("~/")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    files: dict[str, tuple[str, int | None]] = {}
    for path in sorted(model.iterdir()):
        if path.is_file() and (not path.name.endswith(".safetensors") or path.name in weights):
            shutil.copy2(path, dest / path.name)
            files[path.name] = (sha256(path), path.stat().st_size)
    return files


class Lab:
    """The cluster, its placement, and plan/apply/verify over SSH, as the engine runs them."""

    def __init__(self, hosts: Sequence[RunningHost], model: Path, wheelhouse: Wheelhouse,
                 facts: Mapping[str, HostFacts], directory: Path) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.cluster_file = write_cluster(directory, hosts, model)
        self.cluster = load_cluster(self.cluster_file)
        self.placement = make_placement(self.cluster, model)
        self.layout = WorkerLayout.of(self.cluster)
        self.wheelhouse = wheelhouse
        self.facts = dict(facts)  # HOME and OS: what worker_resources needs from each node
        self.files = {n.name: put_model_files(self.hosts[n.name], model, n.files)
                      for n in self.placement.nodes}
        self.options = SSHOptions(known_hosts=hosts[0].known_hosts_file)

    def desired(self, settings: Mapping[str, WorkerSettings] | None = None
                ) -> dict[str, list[Resource]]:
        return {n.name: worker_resources(
            self.cluster, self.placement, n, home=self.facts[n.name].home,
            system=self.facts[n.name].os_system, user=self.facts[n.name].user,
            model_dir=MODEL_DIR, files=self.files[n.name], wheelhouse=self.wheelhouse,
            settings=(settings or {}).get(n.name, SETTINGS)) for n in self.placement.nodes}

    def run(self, fn: Callable[[Mapping[str, Connection | HostError]], Awaitable[T]]) -> T:
        async def go() -> T:
            executor = SSHExecutor(self.options)
            conns = await executor.connect_all(
                Target(h.name, h.address, h.port, h.user, h.identity_file)
                for h in self.hosts.values())
            try:
                return await fn(conns)
            finally:
                for conn in conns.values():
                    if not isinstance(conn, HostError):
                        await conn.close()
        return asyncio.run(go())

    def plan(self, desired: Mapping[str, Sequence[Resource]], *,
             broken: Mapping[str, str] | None = None) -> Plan:
        async def fn(conns: Mapping[str, Connection | HostError]) -> Plan:
            async def one(name: str) -> HostFacts:
                conn = conns[name]
                assert not isinstance(conn, HostError), conn
                return await read_facts(conn, desired[name], CLUSTER)
            facts = await asyncio.gather(*(one(n) for n in desired))
            host_plans = tuple(diff_host(CLUSTER, desired[f.host], f) for f in facts)
            return Plan(CLUSTER, "wtest.yml", host_plans)
        plan = self.run(fn)
        return couple_ring(plan, worker_services(self.cluster, desired), broken=broken)

    def apply(self, plan: Plan) -> None:
        async def fn(conns: Mapping[str, Connection | HostError]) -> None:
            async def one(name: str) -> None:
                conn = conns[name]
                assert not isinstance(conn, HostError), conn
                host_plan = next(h for h in plan.hosts if h.host == name)
                outcome = await apply_host(conn, host_plan)
                assert outcome.status in (HostStatus.OK, HostStatus.CHANGED), outcome.error
            await asyncio.gather(*(one(h.host) for h in plan.hosts))
        self.run(fn)

    def converge(self, desired: Mapping[str, Sequence[Resource]], *,
                 broken: Mapping[str, str] | None = None) -> Plan:
        plan = self.plan(desired, broken=broken)
        self.apply(plan)
        return plan

    def verify(self) -> RingHealth:
        async def fn(conns: Mapping[str, Connection | HostError]) -> RingHealth:
            return await verify_ring(self.cluster, self.placement, conns, timeout=READY_TIMEOUT,
                                     prompt=PROMPT, max_tokens=MAX_TOKENS, watch_interval=3)
        return self.run(fn)

    def status(self) -> ClusterStatus:
        async def fn(conns: Mapping[str, Connection | HostError]) -> ClusterStatus:
            paths = {n.name: {f"{MODEL_DIR}/{rel}": sha for rel, (sha, _) in
                              self.files[n.name].items()} for n in self.placement.nodes}
            return await gather_status(self.cluster, conns, self.placement, model_files=paths,
                                       probe_timeout=15)
        return self.run(fn)

    async def _job(self, conns: Mapping[str, Connection | HostError],
                   name: str) -> tuple[JobState, int | None]:
        conn = conns[name]
        assert not isinstance(conn, HostError)
        job = (await read_facts(conn, self.desired()[name][-1:], CLUSTER)).job(self.layout.job)
        return job.state, job.pid

    def job(self, name: str) -> tuple[JobState, int | None]:
        async def fn(conns: Mapping[str, Connection | HostError]) -> tuple[JobState, int | None]:
            return await self._job(conns, name)
        return self.run(fn)

    def wait_restarted(self, pids: Mapping[str, int | None], timeout: float) -> None:
        """Until launchd runs every rank in ``pids`` again, as a new process. Polled over one
        connection per host held for the whole wait: a new SSH login and agent per poll (twice
        a second) took CPU from the very ranks being restarted."""
        async def fn(conns: Mapping[str, Connection | HostError]) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                jobs = await asyncio.gather(*(self._job(conns, name) for name in pids))
                if all(state is JobState.RUNNING and pid != pids[name]
                       for name, (state, pid) in zip(pids, jobs, strict=True)):
                    return
                assert loop.time() < deadline, f"timed out waiting for launchd to restart " \
                    f"every rank: {dict(zip(pids, jobs, strict=True))}"
                await asyncio.sleep(0.5)
        self.run(fn)

    def log(self, name: str) -> str:
        path = self.hosts[name].home / self.layout.log.removeprefix("~/")
        return path.read_text(errors="replace") if path.exists() else ""

    def starts(self) -> dict[str, int]:
        return {name: self.log(name).count("forming a ring group of") for name in self.hosts}

    def status_file(self, name: str) -> dict[str, object]:
        status = parse_status((self.hosts[name].home
                               / self.layout.status.removeprefix("~/")).read_text())
        return {"layers": status.layers, "param_bytes": status.param_bytes,
                "pid": status.pid, "state": status.state.value}


def base_facts(hosts: Sequence[RunningHost]) -> dict[str, HostFacts]:
    async def go() -> dict[str, HostFacts]:
        executor = SSHExecutor(SSHOptions(known_hosts=hosts[0].known_hosts_file))
        result = {}
        for h in hosts:
            async with executor.connect(Target(h.name, h.address, h.port, h.user,
                                               h.identity_file)) as conn:
                result[h.name] = await read_facts(conn, [], CLUSTER)
        return result
    return asyncio.run(go())


def test_ring_converges_serves_restarts_together_and_recovers(
        hosts: list[RunningHost], model: Path, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    started = time.monotonic()
    facts = base_facts(hosts)
    wheelhouse = build_wheelhouse(PACKAGES, cluster_platform(facts.values()))
    lab = Lab(hosts, model, wheelhouse, facts, tmp_path)
    timings: dict[str, float] = {}
    try:
        # --- first converge: everything is created, the ring serves what one process computes
        desired = lab.desired()
        plan = lab.plan(desired)
        by_host = {h.host: [c.resource for c in h.changes] for h in plan.hosts}
        wired = [h for h, ids in by_host.items() if "sysctl:iogpu.wired_limit_mb" in ids]
        assert wired == ["w2"], by_host  # only the host whose share exceeds the default
        assert all(ids[0].startswith("wheelhouse:") and ids[-1] == lab.layout.service_id
                   for ids in by_host.values()), by_host
        mark = time.monotonic()
        lab.apply(plan)
        timings["first apply"] = time.monotonic() - mark
        mark = time.monotonic()
        health = lab.verify()
        timings["first ready"] = time.monotonic() - mark
        assert health.ok, health.message()
        expected_tokens, _ = reference(model, PROMPT, MAX_TOKENS)
        assert health.ready.completion is not None
        assert list(health.ready.completion.token_ids) == expected_tokens
        held = {n.name: lab.status_file(n.name) for n in lab.placement.nodes}
        for node in lab.placement.nodes:
            assert held[node.name]["layers"] == node.layers
        assert lab.placement.nodes[1].num_layers < lab.placement.nodes[0].num_layers
        # between requests every rank but 0 waits for the ring's next bytes in the kernel,
        # not in mlx's polling collective (the worker's idle wait): and the ring still serves
        idle = {n.name: "idle: waiting for the ring's next bytes" in lab.log(n.name)
                for n in lab.placement.nodes}
        assert idle == {n.name: n.rank > 0 for n in lab.placement.nodes}, idle
        small, big = held["w2"]["param_bytes"], held["w1"]["param_bytes"]
        assert isinstance(small, int) and isinstance(big, int) and small < big
        assert not lab.plan(desired).has_changes

        status = lab.status()
        assert status.healthy and status.ring == "serving", status_text(status)
        assert status.ring_size == status.ranks_serving == len(NAMES)
        for row in status.nodes:
            assert (row.mlx, row.mlx_lm) == ("0.32.4", "0.32.2")
            assert row.files_verified == row.files_total == len(lab.files[row.host])
            assert row.worker == "running" and row.state == "serving"
            assert row.rss_bytes and row.rss_bytes > 10 * MIB and row.uptime_s is not None
        print("\n" + status_text(status))
        cli = orch("status", lab.cluster_file, "--json", known_hosts=hosts[0].known_hosts_file)
        assert cli.returncode == 0, cli.output
        report = json.loads(cli.stdout)
        assert report["healthy"] is True and report["ring"]["size"] == len(NAMES)
        assert [(n["host"], n["rank"], n["layers"]) for n in report["nodes"]] == [
            (n.name, n.rank, list(n.layers)) for n in lab.placement.nodes]

        # --- one host's setting changes: only its plist; the whole ring restarts, once
        before_starts = lab.starts()
        before_pids = {n: lab.job(n)[1] for n in NAMES}
        changed = lab.desired({"w2": WorkerSettings(throttle_interval=2,
                                                    env={"MLX_RING_VERBOSE": "1"})})
        raw = lab.plan(changed)
        own = {h.host: [(c.resource, sorted(f.name for f in c.fields)) for c in h.changes]
               for h in raw.hosts}
        assert own["w2"] == [(lab.layout.service_id, ["config_hash", "plist"])], own
        assert own["w1"] == [(lab.layout.service_id, [RESTART_FIELD])], own
        mark = time.monotonic()
        lab.apply(raw)
        health = lab.verify()
        timings["ring restart ready"] = time.monotonic() - mark
        assert health.ok, health.message()
        after_pids = {n: lab.job(n)[1] for n in NAMES}
        assert all(after_pids[n] != before_pids[n] for n in NAMES), (before_pids, after_pids)
        assert {n: lab.starts()[n] - before_starts[n] for n in NAMES} == dict.fromkeys(NAMES, 1)
        assert not lab.plan(changed).has_changes

        # --- a rank dies: launchd restarts it; the ranks it left exit (their ring is broken)
        # and launchd restarts them too, so the ring heals with no converge
        state, victim = lab.job("w2")
        assert state is JobState.RUNNING and victim
        pids = {n: lab.job(n)[1] for n in NAMES}
        mark = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        lab.wait_restarted(pids, 120)
        health = lab.verify()
        timings["healed ready"] = time.monotonic() - mark
        assert health.ok, health.message()
        healed = lab.status()
        assert healed.healthy and not healed.restart_reasons, status_text(healed)
        assert not lab.plan(changed, broken=healed.restart_reasons).has_changes
    finally:
        lab.converge({n: [] for n in NAMES})  # boot everything out, remove what orch put there
    for name in NAMES:
        assert lab.job(name)[0] is JobState.NOT_LOADED
    assert not (hosts[1].launch_daemons_dir / "com.orch.wired-limit.plist").exists()
    print(f"wheelhouse {len(wheelhouse.wheels)} wheels {wheelhouse.total_bytes / 1e6:.1f} MB; "
          f"timings {timings}; total {time.monotonic() - started:.1f} s")
