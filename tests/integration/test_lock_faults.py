"""The cluster lock when things go wrong, on real sshd hosts: a host that cannot lock, a host
lost mid-apply, no host reachable at all, and two runs racing for the same cluster.

The rule every test checks on the hosts' own filesystems: a run that has exited never leaves
a healthy host locked, and whatever it could not release it names, with the command to do so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from orchestrator.errors import HostError, HostUnreachable, LockHeld
from orchestrator.executor import Connection, SSHExecutor, SSHOptions, Target
from orchestrator.run.lock import ClusterLock, new_holder
from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, reboot, start_hosts, stop_hosts
from tests.fixtures.cli import orch

CLUSTER = "lockfaults"  # its own name and files: test_engine's cluster state is left alone


def write_cluster(directory: Path, hosts: Sequence[RunningHost], extra_tasks: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "inventory.yml").write_text(inventory_yaml(hosts))
    (directory / "cluster.yml").write_text(
        f"name: {CLUSTER}\ninventory: inventory.yml\nruntime:\n  packages: []\ntasks:\n"
        f"  - name: a directory\n    directory: {{path: ~/{CLUSTER}}}\n{extra_tasks}")
    return directory / "cluster.yml"


def lock_dir(host: RunningHost, cluster: str = CLUSTER) -> Path:
    return host.home / ".orch" / "locks" / cluster


def assert_unlocked(hosts: Sequence[RunningHost], cluster: str = CLUSTER) -> None:
    held = [h.name for h in hosts if lock_dir(h, cluster).exists()]
    assert not held, f"still locked after the run exited: {held}"


@pytest.fixture
def known(test_hosts: list[RunningHost]) -> Path:
    return test_hosts[0].known_hosts_file


def test_a_host_that_cannot_lock_is_named_and_leaves_no_host_locked(
    test_hosts: list[RunningHost], known: Path, tmp_path: Path
) -> None:
    cluster = write_cluster(tmp_path, test_hosts)
    victim = test_hosts[1]  # in the middle: the gate before it and a host after it are taken
    locks = victim.home / ".orch" / "locks"
    shutil.rmtree(locks, ignore_errors=True)
    locks.parent.mkdir(parents=True, exist_ok=True)
    locks.write_text("not a directory\n")
    try:
        proc = orch("apply", cluster, "--yes", known_hosts=known)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"{victim.name}: could not take the cluster lock" in proc.stderr
        assert f"{locks}: it exists and is not a directory" in proc.stderr
        assert "Errno" not in proc.stderr and "FileExistsError" not in proc.stderr
        assert "no host holds this run's lock" in proc.stderr
        assert_unlocked(test_hosts)
    finally:
        locks.unlink()
    again = orch("apply", cluster, "--yes", known_hosts=known)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_unlocked(test_hosts)


@pytest.fixture
def lost_host(tmp_path: Path) -> Iterator[RunningHost]:
    [host] = start_hosts(tmp_path / "lost", [HostSpec("mini-lost", 64 * GIB, "Apple M4 Pro",
                                                      address="127.0.0.29")])
    try:
        yield host
    finally:
        stop_hosts([host])


def vanish(host: RunningHost) -> None:
    """The host drops off the network: its sshd processes (listener and sessions) are killed
    first, so connections end without an exit status, as when a Mac loses power; then the
    rest of it is stopped. (Stopping it politely could let a session report the killed
    step's exit status first: a failed step, not a lost host.)"""
    for pid in host.processes():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().startswith("sshd"):
                os.kill(pid, signal.SIGKILL)
    host.stop()


def test_a_host_lost_mid_apply_keeps_the_report_and_frees_the_others(
    test_hosts: list[RunningHost], lost_host: RunningHost, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(h.known_hosts_line for h in [*test_hosts, lost_host]) + "\n")
    cluster = write_cluster(tmp_path / "c", [*test_hosts, lost_host], extra_tasks=(
        "  - name: slow\n    command: [sh, -c, 'touch ~/slow-started; exec sleep 60']\n"
        f"    hosts: [{lost_host.name}]\n"))
    started = lost_host.home / "slow-started"
    argv = [sys.executable, "-m", "orchestrator", "apply", str(cluster), "--yes",
            "--known-hosts", str(known)]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert time.monotonic() < deadline, "the slow step never started"
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        assert all(lock_dir(h).is_dir() for h in [*test_hosts, lost_host])
        vanish(lost_host)
    finally:
        out, err = run.communicate(timeout=120)
    assert "Traceback" not in out + err, err
    assert run.returncode == 3, out + err
    for host in test_hosts:  # the report survived: every host's outcome is printed
        assert re.search(rf"^{host.name}: (ok|changed)", out, re.M), out
    assert re.search(rf"^{lost_host.name}: unreachable: .*connection lost", out, re.M), out
    assert "Apply: " in out and " 1 unreachable." in out
    assert f"Lock: NOT released on {lost_host.name}" in out
    assert_unlocked(test_hosts)
    assert lock_dir(lost_host).is_dir(), "the lost host keeps its lock on disk, as reported"

    nonce = re.search(r"orch unlock --force ([0-9a-f]+) ", out)
    assert nonce, out
    early = orch("unlock", cluster, "--force", nonce.group(1), "--connect-timeout", "2",
                 known_hosts=known)  # while it is down: not "no lock anywhere", but exit 3
    assert early.returncode == 3, early.stdout + early.stderr
    assert f"error: {lost_host.name}: could not check for lock {nonce.group(1)}" in early.stderr
    assert "Run the same command again once every host is reachable." in early.stderr
    reboot(lost_host)  # it comes back: the printed command removes exactly what was left
    unlock = orch("unlock", cluster, "--force", nonce.group(1), known_hosts=known)
    assert unlock.returncode == 0, unlock.stdout + unlock.stderr
    assert f"removed lock {nonce.group(1)} on: {lost_host.name}" in unlock.stdout
    assert_unlocked([*test_hosts, lost_host])


def test_a_host_lost_while_locking_unlocks_the_others_and_names_it(
    test_hosts: list[RunningHost], lost_host: RunningHost, tmp_path: Path
) -> None:
    # holds each lock call 2 s, long enough to lose the host
    python = proxy(tmp_path / "python", delay="2", touch="locking")
    hosts = [*test_hosts, lost_host]  # mini-lost sorts last: locked with mac2 and mac3
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(h.known_hosts_line for h in hosts) + "\n")

    def kill_when_locking() -> None:
        deadline = time.monotonic() + 60
        while not (lost_host.home / "locking").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        vanish(lost_host)

    async def acquire() -> BaseException | None:
        executor = SSHExecutor(SSHOptions(known_hosts=known, agent_python=str(python)))
        conns = await executor.connect_all(targets(hosts))
        killer = threading.Thread(target=kill_when_locking)
        killer.start()
        try:
            await ClusterLock(CLUSTER, ".orch", new_holder("test")).acquire(conns)
        except HostError as exc:
            return exc
        finally:
            await asyncio.to_thread(killer.join)
            for conn in conns.values():
                if isinstance(conn, Connection):
                    await conn.close()
        return None

    error = asyncio.run(acquire())
    assert_unlocked(test_hosts)
    assert isinstance(error, HostUnreachable), error  # exit 3
    assert str(error).startswith(f"{lost_host.name}: could not take the cluster lock"), error
    assert f"perhaps on {lost_host.name} (lost while taking it)" in str(error)
    assert "orch unlock --force " in str(error)


def test_with_no_host_reachable_plan_says_so_and_exits_3(
    test_hosts: list[RunningHost], tmp_path: Path
) -> None:
    gone: dict[str, tuple[str, int]] = {}
    for i in (1, 2):
        with socket.socket() as s:  # a port nothing listens on (closed before orch runs)
            s.bind((f"127.0.0.{10 + i}", 0))
            gone[f"gone{i}"] = s.getsockname()
    identity = test_hosts[0].identity_file
    (tmp_path / "inventory.yml").write_text("hosts:\n" + "".join(
        f"  {name}:\n    address: {address}\n    port: {port}\n    ring_ip: 10.8.0.{i + 1}\n"
        f"    identity_file: {identity}\n    memory_gb: 64\n"
        for i, (name, (address, port)) in enumerate(gone.items())))
    (tmp_path / "cluster.yml").write_text(
        "name: nowhere\ninventory: inventory.yml\nruntime:\n  packages: []\n"
        "tasks:\n  - name: d\n    directory: {path: ~/d}\n")
    for argv in (["plan", "--detailed-exitcode"], ["apply", "--yes"]):
        proc = orch(*argv[:1], tmp_path / "cluster.yml", *argv[1:], "--connect-timeout", "2",
                    known_hosts=test_hosts[0].known_hosts_file)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "No changes" not in proc.stdout and "0 hosts match" not in proc.stdout
        assert "No host could be reached (2 unreachable: gone1, gone2)" in proc.stdout
        for name, (address, port) in gone.items():
            where = re.escape(f"{address}:{port}")
            assert re.search(rf"^{name}: UNREACHABLE: cannot connect to {where}", proc.stdout,
                             re.M), proc.stdout


# -- the lock in parallel (issue #14) --------------------------------------------------------

def proxy(path: Path, *, delay: str, log: Path | None = None, touch: str = "") -> Path:
    """An `agent_python` that waits `delay` seconds (or `random`: 0-0.25 s) before each lock
    op reaches the agent and logs `HOME op start end` for it (see agent_proxy.py): how the
    tests see, from the hosts' side, which lock calls overlapped."""
    options = [f"--delay={delay}", f"--touch={touch}"] + ([f"--log={log}"] if log else [])
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {PROXY} {' '.join(options)} -- "
                    '"$0" "$@"\n')
    path.chmod(0o755)
    return path


PROXY = Path(__file__).with_name("agent_proxy.py")


def targets(hosts: Sequence[RunningHost]) -> list[Target]:
    return [Target(h.name, h.address, h.port, h.user, h.identity_file) for h in hosts]


async def connect(hosts: Sequence[RunningHost], python: Path) -> dict[str, Connection]:
    executor = SSHExecutor(SSHOptions(known_hosts=hosts[0].known_hosts_file,
                                      agent_python=str(python)))
    conns = await executor.connect_all(targets(hosts))
    live = {n: c for n, c in conns.items() if isinstance(c, Connection)}
    assert len(live) == len(hosts), conns
    return live


FACTS = {"files": ["~/.orch"], "read_only": False}  # a facts request that rides with a lock


@pytest.mark.parametrize("with_facts", [False, True], ids=["lock", "lock-and-facts"])
def test_lock_takes_the_first_host_alone_then_the_others_at_once(
    test_hosts: list[RunningHost], tmp_path: Path, with_facts: bool
) -> None:
    log = tmp_path / "calls.log"
    python = proxy(tmp_path / "slow-python", delay="1", log=log)

    async def lock_and_release() -> float:
        conns = await connect(test_hosts, python)
        try:
            lock = ClusterLock("parallel", ".orch", new_holder("test"))
            began = time.monotonic()
            facts = dict.fromkeys(conns, FACTS) if with_facts else None
            answers = await lock.acquire(conns, facts=facts)
            assert all(lock_dir(h, "parallel").is_dir() for h in test_hosts)
            if with_facts:  # every host's facts came back with its lock, in the same message
                assert sorted(answers) == sorted(conns), answers
                assert all(a["files"]["~/.orch"]["kind"] == "dir" for a in answers.values()
                           if isinstance(a, dict)), answers
            else:
                assert answers == {}
            assert not await lock.release()  # nothing left behind
            return time.monotonic() - began
        finally:
            for conn in conns.values():
                await conn.close()

    elapsed = asyncio.run(lock_and_release())
    assert_unlocked(test_hosts, "parallel")
    home = {str(h.home): h.name for h in test_hosts}
    calls: dict[tuple[str, str], tuple[float, float]] = {}
    for line in log.read_text().splitlines():
        where, op, start, end = line.split()
        calls[home[where], op] = (float(start), float(end))
    first, *others = sorted(h.name for h in test_hosts)
    acquire = {n: calls[n, "lock_acquire"] for n in [first, *others]}
    release = [calls[n, "lock_release"] for n in [first, *others]]
    assert all(acquire[n][0] >= acquire[first][1] for n in others), \
        f"a host was locked before the first one was held: {acquire}"
    rest = [acquire[n] for n in others]
    assert max(s for s, _ in rest) < min(e for _, e in rest), f"not concurrent: {acquire}"
    assert max(s for s, _ in release) < min(e for _, e in release), f"not concurrent: {release}"
    print(f"acquire + release with 1 s per lock call on {len(test_hosts)} hosts: {elapsed:.2f} s")


@pytest.mark.parametrize("with_facts", [False, True], ids=["lock", "lock-and-facts"])
def test_of_two_racing_runs_exactly_one_wins(
    test_hosts: list[RunningHost], tmp_path: Path, with_facts: bool
) -> None:
    # Each agent call waits 0-0.25 s at random: racing runs reach the hosts in random order,
    # which is what would let two runs each win some hosts without the first-host gate.
    python = proxy(tmp_path / "jittery-python", delay="random")

    async def race() -> list[str]:
        a, b = await connect(test_hosts, python), await connect(test_hosts, python)
        outcomes = []
        try:
            for _ in range(8):
                runs = [ClusterLock("race", ".orch", new_holder(f"run {i}")) for i in (0, 1)]
                facts = dict.fromkeys(a, FACTS) if with_facts else None
                results = await asyncio.gather(runs[0].acquire(a, facts=facts),
                                               runs[1].acquire(b, facts=facts),
                                               return_exceptions=True)
                won = [r for r, res in zip(runs, results, strict=True)
                       if not isinstance(res, BaseException)]
                lost = [res for res in results if isinstance(res, BaseException)]
                outcomes.append(f"{len(won)} won")
                assert len(won) == 1 and len(lost) == 1, results
                assert isinstance(lost[0], LockHeld), lost[0]
                assert won[0].holder.nonce in str(lost[0])
                assert all(lock_dir(h, "race").is_dir() for h in test_hosts)
                assert not await won[0].release()
                assert_unlocked(test_hosts, "race")
        finally:
            for conn in [*a.values(), *b.values()]:
                await conn.close()
        return outcomes

    assert asyncio.run(race()) == ["1 won"] * 8
