"""The agent's facts and launchd ops on real sshd hosts with the macOS stand-ins.

What the planner will see, end to end: per-host memory and chip from `sysctl`, the macOS version
from `sw_vers`, launchd job states parsed from the stand-in's `launchctl print`, venv packages
from METADATA, and file hashes from the node's cache (a second facts call hashes 0 bytes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import plistlib
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from orchestrator.errors import HostError
from orchestrator.executor import Connection, SSHExecutor, SSHOptions, Target, for_each_host
from orchestrator.facts import (
    FactRequest,
    FileKind,
    Guard,
    HostFacts,
    JobState,
    LaunchdRef,
)
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, start_hosts, stop_hosts
from tests.fixtures.facts import read_facts

T = TypeVar("T")
OLD = time.time() - 3600


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def target(host: RunningHost) -> Target:
    return Target(host.name, host.address, host.port, host.user, host.identity_file)


async def open_conn(host: RunningHost) -> Connection:
    return await SSHExecutor(SSHOptions(known_hosts=host.known_hosts_file)).open(target(host))


def plist(label: str, arguments: list[str], **keys: Any) -> bytes:
    return plistlib.dumps({"Label": label, "ProgramArguments": arguments, **keys})


async def write(conn: Connection, path: str, data: bytes, mode: int = 0o644) -> dict[str, Any]:
    request = {"path": path, "mode": mode, "sha256": hashlib.sha256(data).hexdigest()}
    return await conn.agent("write", request, stdin=data)


def test_facts_per_host_from_the_standins(test_hosts: list[RunningHost]) -> None:
    request = FactRequest(sysctl=frozenset({"iogpu.wired_limit_mb", "hw.ncpu", "no.such.oid"}))

    async def scenario() -> dict[str, HostFacts | HostError]:
        executor = SSHExecutor(SSHOptions(known_hosts=test_hosts[0].known_hosts_file))
        conns = await executor.connect_all(target(h) for h in test_hosts)
        try:
            return await for_each_host(conns, lambda c: read_facts(c, request), limit=3)
        finally:
            for conn in conns.values():
                if not isinstance(conn, HostError):
                    await conn.close()

    results = run(scenario())
    for host in test_hosts:
        facts = results[host.name]
        assert isinstance(facts, HostFacts), facts
        assert facts.memory_bytes == host.spec.memory_bytes
        assert facts.chip == host.spec.chip
        assert facts.macos_version == "14.5"
        assert facts.home == str(host.home)
        assert facts.sysctl["iogpu.wired_limit_mb"] == "0"
        assert facts.sysctl["no.such.oid"] is None
        assert facts.python_version.startswith("3.")
    memory = [r.memory_bytes for r in results.values() if isinstance(r, HostFacts)]
    assert memory == [192 * GIB, 192 * GIB, 128 * GIB]


def test_hash_cache_second_call_hashes_nothing(test_hosts: list[RunningHost]) -> None:
    host = test_hosts[1]
    model = host.home / "models" / "tiny"
    model.mkdir(parents=True, exist_ok=True)
    shards = {f"model-{i:05d}-of-00003.safetensors": os.urandom(1_500_000 + i) for i in range(3)}
    for name, data in shards.items():
        (model / name).write_bytes(data)
        os.utime(model / name, (OLD, OLD))
    paths = {f"~/models/tiny/{name}": data for name, data in shards.items()}
    request = FactRequest(files=frozenset(paths))

    async def scenario() -> tuple[HostFacts, HostFacts, int]:
        conn = await open_conn(host)
        try:
            await conn.agent("facts", {})  # the agent is cached: what follows is converged
            before = conn.round_trips
            first = await read_facts(conn, request)
            second = await read_facts(conn, request)
            return first, second, conn.round_trips - before
        finally:
            await conn.close()

    first, second, trips = run(scenario())
    assert trips == 0  # both facts calls went over the session opened before them
    total = sum(len(d) for d in shards.values())
    assert first.counters == {"files_hashed": 3, "bytes_hashed": total, "hash_cache_hits": 0}
    assert second.counters == {"files_hashed": 0, "bytes_hashed": 0, "hash_cache_hits": 3}
    for path, data in paths.items():
        assert second.file(path).sha256 == hashlib.sha256(data).hexdigest()
        assert second.file(path).size == len(data)
    assert second.files == first.files


def test_written_files_are_known_without_rehashing(test_hosts: list[RunningHost]) -> None:
    host = test_hosts[2]

    async def scenario() -> HostFacts:
        conn = await open_conn(host)
        try:
            assert (await write(conn, "~/.orch/ring.json", b'[["10.0.0.1:47100"]]'))["changed"]
            assert not (await write(conn, "~/.orch/ring.json", b'[["10.0.0.1:47100"]]'))["changed"]
            return await read_facts(
                conn, FactRequest(files=frozenset({"~/.orch/ring.json", "~/.orch"}))
            )
        finally:
            await conn.close()

    facts = run(scenario())
    assert facts.file("~/.orch/ring.json").kind is FileKind.FILE
    assert facts.file("~/.orch").kind is FileKind.DIR
    assert facts.counters["bytes_hashed"] == 0


def test_venv_packages_and_guards(test_hosts: list[RunningHost]) -> None:
    host = test_hosts[0]

    async def scenario() -> HostFacts:
        conn = await open_conn(host)
        try:
            made = await conn.agent(
                "run", {"argv": ["python3", "-m", "venv", "--without-pip", "venv"], "cwd": "~"}
            )
            assert made["exit_status"] == 0, made
            probe = await conn.run(
                ["venv/bin/python", "-c", "import sys; print(sys.version_info[1])"]
            )
            minor = probe.stdout.decode().strip()
            meta = b"Metadata-Version: 2.1\nName: MLX_LM\nVersion: 0.32.2\n\n"
            site = f"~/venv/lib/python3.{minor}/site-packages/mlx_lm-0.32.2.dist-info/METADATA"
            await write(conn, site, meta)
            request = FactRequest(
                venvs=frozenset({"~/venv", "~/no-venv"}),
                guards=frozenset(
                    {
                        Guard("venv-python", ("venv/bin/python", "-c", "pass")),
                        Guard("mlx-importable", ("venv/bin/python", "-c", "import mlx")),
                    }
                ),
            )
            return await read_facts(conn, request)
        finally:
            await conn.close()

    facts = run(scenario())
    venv = facts.venvs["~/venv"]
    assert venv.exists and venv.python_version and venv.python_version.startswith("3.")
    assert venv.packages == {"mlx-lm": "0.32.2"}
    assert not facts.venvs["~/no-venv"].exists
    assert facts.guards == {"venv-python": 0, "mlx-importable": 1}


@pytest.fixture
def label(test_hosts: list[RunningHost]) -> Iterator[str]:
    name = f"com.orch.agenttest.{os.getpid()}.{time.monotonic_ns()}"
    yield name

    async def cleanup() -> None:
        conn = await open_conn(test_hosts[0])
        try:
            await conn.agent("launchd_bootout", {"domain": "user", "label": name})
            await conn.agent("remove", {"path": f"~/Library/LaunchAgents/{name}.plist"})
        finally:
            await conn.close()

    run(cleanup())


def test_launchd_lifecycle_through_the_agent(test_hosts: list[RunningHost], label: str) -> None:
    host = test_hosts[0]
    ref = LaunchdRef("user", label)
    request = FactRequest(launchd=frozenset({ref}))
    path = f"~/Library/LaunchAgents/{label}.plist"
    job = {"domain": "user", "label": label}
    sleeper = [str(host.python3), "-c", "import time; time.sleep(600)"]

    async def scenario() -> list[Any]:
        conn = await open_conn(host)
        seen: list[Any] = []
        try:
            seen.append((await read_facts(conn, request)).job(ref))
            await write(conn, path, plist(label, sleeper, RunAtLoad=True, KeepAlive=True,
                                          EnvironmentVariables={"MLX_RANK": "0"}))  # fmt: skip
            seen.append(await conn.agent("launchd_bootstrap", {**job, "plist": path}))
            seen.append((await read_facts(conn, request)).job(ref))
            # Reloading a running job: the agent boots it out, waits for the asynchronous
            # bootout to finish, then bootstraps (no "5: Input/output error").
            seen.append(await conn.agent("launchd_bootstrap", {**job, "plist": path}))
            seen.append((await read_facts(conn, request)).job(ref))
            seen.append(await conn.agent("launchd_kickstart", job))
            seen.append((await read_facts(conn, request)).job(ref))
            seen.append(await conn.agent("launchd_bootout", job))
            seen.append((await read_facts(conn, request)).job(ref))
            seen.append(await conn.agent("launchd_bootout", job))
        finally:
            await conn.close()
        return seen

    absent, boot1, up1, boot2, up2, kick, up3, out1, gone, out2 = run(scenario())
    assert absent.state is JobState.NOT_LOADED
    assert boot1 == {"changed": True, "was_loaded": False}
    assert up1.state is JobState.RUNNING and up1.pid is not None
    assert up1.env["MLX_RANK"] == "0"
    assert boot2 == {"changed": True, "was_loaded": True}
    assert up2.state is JobState.RUNNING and up2.pid not in (None, up1.pid)
    assert kick == {"changed": True}
    assert up3.state is JobState.RUNNING and up3.pid not in (None, up2.pid)
    assert out1 == {"changed": True} and out2 == {"changed": False}
    assert gone.state is JobState.NOT_LOADED
    for pid in (up1.pid, up2.pid, up3.pid):
        assert pid is not None and not Path(f"/proc/{pid}").exists()


@pytest.fixture
def wired_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHost]:
    """A host of its own: this test changes a sysctl and installs a LaunchDaemon."""
    hosts = start_hosts(
        tmp_path_factory.mktemp("wired"),
        [HostSpec("wired", 64 * GIB, "Apple M4 Pro", address="127.0.0.44")],
    )
    try:
        yield hosts[0]
    finally:
        stop_hosts(hosts)


def test_system_daemon_goes_through_sudo(wired_host: RunningHost) -> None:
    """The wired-memory LaunchDaemon: system domain, so the agent uses `sudo -n launchctl`."""
    label = "com.orch.wired-limit"
    path = str(wired_host.launch_daemons_dir / f"{label}.plist")
    ref = LaunchdRef("system", label)
    request = FactRequest(launchd=frozenset({ref}), sysctl=frozenset({"iogpu.wired_limit_mb"}))

    async def scenario() -> HostFacts:
        conn = await open_conn(wired_host)
        try:
            daemon = plist(
                label, ["/usr/sbin/sysctl", "iogpu.wired_limit_mb=50000"], RunAtLoad=True
            )
            await write(conn, path, daemon)
            answer = await conn.agent(
                "launchd_bootstrap", {"domain": "system", "label": label, "plist": path}
            )
            assert answer == {"changed": True, "was_loaded": False}
            for _ in range(100):
                facts = await read_facts(conn, request)
                if facts.job(ref).last_exit is not None:
                    return facts
                await asyncio.sleep(0.1)
            raise AssertionError("the daemon never ran")
        finally:
            await conn.close()

    facts = run(scenario())
    assert facts.job(ref).last_exit == 0
    assert facts.job(ref).state is JobState.WAITING  # ran once, loaded, not running
    assert facts.sysctl["iogpu.wired_limit_mb"] == "50000"
