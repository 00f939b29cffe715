"""One apply per cluster at a time, enforced on the hosts themselves.

There is no server to hold a lock, so every host holds a copy: a directory created atomically
(`mkdir` either makes it or finds it) with the holder's name, time and a nonce inside. A run
holds the cluster only when it holds every reachable host's copy.

Why the first host alone, then the rest at once. Locking hosts one after another costs a round
trip per host each way (about 2 s at 25 hosts), so all but one are locked concurrently. Taking
*every* host concurrently would be wrong: two racing runs could each win some hosts and both
be refused (no run proceeds, both exit 4). So the first host in sorted order is taken alone
first, as a gate: two runs over the same hosts both start there, `mkdir` lets exactly one of
them in, and the other is refused before it has taken anything — so it cannot block the winner
anywhere else. The winner then takes the remaining hosts concurrently; what can still refuse
it there is a lock the gate does not order: one left by a run that died, or one held by a run
over a different set of hosts (below). On any refusal or error the run releases everything it
took, concurrently, and reports who holds the lock (or what failed where), so a failed
acquisition never leaves a host locked by a run that has exited.

What this does not promise: two runs whose host sets start at different hosts (different
`--limit`s, or a first host one run cannot reach) have different gates, and may then both be
refused (never both admitted: a host they share is held by at most one). Rerunning settles it.

Why facts ride with the lock. A run reads every host's facts right after locking it, so the
lock request and the facts request travel as one agent batch (`acquire(conns, facts=...)`): one
round trip per host instead of two, and no host waits for the slowest one's lock before its
facts are read. Facts are read-only, so reading them on a host that then refuses the lock costs
only that host's time; a facts failure is that host's own error (as a facts call's would be)
and does not refuse the lock.

Release is concurrent too, and never raises: a host that cannot be reached (or whose agent
fails) is returned with the reason, so the caller can still report what the run did and print
`orch unlock --force NONCE CLUSTER` for the lock left behind.
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from orchestrator.errors import ActionFailed, HostError, HostUnreachable, LockHeld
from orchestrator.executor import AgentStep, Connection, StepState, for_each_host

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Holder:
    who: str
    pid: int
    since: float
    nonce: str
    command: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"{self.who} (pid {self.pid}, `{self.command}`) since {when}, nonce {self.nonce}"

    def to_json(self) -> dict[str, Any]:
        return {"who": self.who, "pid": self.pid, "since": self.since, "nonce": self.nonce,
                "command": self.command}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Holder:
        return cls(str(raw.get("who", "?")), int(raw.get("pid", 0)),
                   float(raw.get("since", 0)), str(raw.get("nonce", "?")),
                   str(raw.get("command", "?")))


def new_holder(command: str) -> Holder:
    return Holder(f"{getpass.getuser()}@{socket.gethostname()}", os.getpid(), time.time(),
                  secrets.token_hex(8), command)


def lock_path(cluster: str, orch_dir: str) -> str:
    return f"~/{orch_dir.strip('/')}/locks/{cluster}"


def unlock_command(nonce: str, cluster_file: str) -> str:
    return f"orch unlock --force {nonce} {cluster_file}"


class ClusterLock:
    """Acquire on every reachable host (the first in sorted order alone, then the rest
    concurrently); release concurrently. See the module docstring for why that is safe."""

    def __init__(self, cluster: str, orch_dir: str, holder: Holder, *,
                 cluster_file: str = "CLUSTER", concurrency: int = 10) -> None:
        self.path = lock_path(cluster, orch_dir)
        self.holder = holder
        self.cluster_file = cluster_file
        self.concurrency = concurrency
        self.held: dict[str, Connection] = {}

    @property
    def unlock_hint(self) -> str:
        """The command that removes this run's lock wherever it was left."""
        return unlock_command(self.holder.nonce, self.cluster_file)

    async def acquire(
        self, conns: Mapping[str, Connection | HostError], *,
        facts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, dict[str, Any] | HostError]:
        """Hold the lock on every reachable host, or raise having released all of it.

        `facts`, each host's `facts` request, goes in the same message as that host's lock;
        the answers are returned (a failed one as that host's ActionFailed).

        Raises LockHeld (another run holds it somewhere), HostUnreachable (a host was lost
        while locking: it may hold this run's lock) or ActionFailed (a host could not create
        its lock directory). Nothing is locked after a raise, except on a host that could not
        be reached to release it, which the message names with the command that removes it.
        """
        live = sorted(((n, c) for n, c in conns.items() if not isinstance(c, HostError)),
                      key=lambda item: item[0])
        gathered: dict[str, dict[str, Any] | HostError] = {}
        if not live:
            return gathered

        async def take(conn: Connection) -> Holder | None:
            if facts is None:
                return await self._take(conn)
            holder, gathered[conn.name] = await self._take_with_facts(conn, facts[conn.name])
            return holder

        try:
            (first, gate), rest = live[0], dict(live[1:])
            answers: dict[str, Holder | HostError | None] = {}
            try:
                answers[first] = await take(gate)
            except HostError as exc:
                answers[first] = exc
            if answers[first] is None:  # through the gate: a race over these hosts is won
                answers.update(await for_each_host(rest, take, self.concurrency))
        except BaseException:  # a bug or an interrupt: never leave what we took behind
            await self.release()
            raise
        refused = {n: a for n, a in answers.items() if isinstance(a, Holder)}
        failed = {n: a for n, a in answers.items() if isinstance(a, HostError)}
        if not refused and not failed:
            log.info("lock_acquired", path=self.path, hosts=len(self.held),
                     nonce=self.holder.nonce)
            return gathered
        left = await self.release()
        raise self._refusal(refused, failed, left)

    async def _take(self, conn: Connection) -> Holder | None:
        """None when taken; the holder when another run holds this host's copy."""
        return self._taken(conn, await conn.agent("lock_acquire", self._request()))

    async def _take_with_facts(
        self, conn: Connection, facts: Mapping[str, Any]
    ) -> tuple[Holder | None, dict[str, Any] | HostError]:
        """`_take`, and the facts answer from the same message (its failure as a value)."""
        lock, read = await conn.agent_batch([AgentStep("lock_acquire", self._request()),
                                             AgentStep("facts", facts)])
        if lock.state is not StepState.OK or lock.response is None:
            raise ActionFailed(conn.name, f"agent lock_acquire failed: {lock.error}")
        holder = self._taken(conn, lock.response)
        if read.state is StepState.OK and read.response is not None:
            return holder, dict(read.response)
        return holder, ActionFailed(conn.name, f"agent facts failed: {read.error}")

    def _request(self) -> dict[str, Any]:
        return {"path": self.path, "holder": self.holder.to_json()}

    def _taken(self, conn: Connection, answer: Mapping[str, Any]) -> Holder | None:
        if answer["acquired"]:
            self.held[conn.name] = conn
            return None
        return Holder.from_json(answer["holder"])

    async def release(self) -> dict[str, HostError]:
        """Release every copy this run holds, concurrently; never raises a host's failure.

        Returns the hosts whose copy could not be released, with why (logged too, with the
        command that removes it). A copy already gone (removed by `orch unlock`) is no failure.
        """
        held, self.held = self.held, {}
        if not held:
            return {}

        async def release_one(conn: Connection) -> bool:
            answer = await conn.agent("lock_release", {"path": self.path,
                                                       "nonce": self.holder.nonce})
            return bool(answer["released"])

        results = await for_each_host(held, release_one, self.concurrency)
        failures = {n: r for n, r in results.items() if isinstance(r, HostError)}
        for name, error in sorted(failures.items()):
            log.warning("lock_not_released", host=name, path=self.path, error=str(error),
                        remove_with=self.unlock_hint)
        return failures

    def _refusal(self, refused: Mapping[str, Holder], failed: Mapping[str, HostError],
                 left: Mapping[str, HostError]) -> HostError | LockHeld:
        """One error for a failed acquisition: who holds it, or what failed where."""
        lost = {n: e for n, e in failed.items() if isinstance(e, HostUnreachable)}
        tail = " Nothing was changed on any host"
        if not left and not lost:
            tail += ", and no host holds this run's lock."
        else:
            maybe = [f"still on {', '.join(sorted(left))} (the release failed: "
                     f"{_reasons(left)})"] if left else []
            maybe += [f"perhaps on {', '.join(sorted(lost))} (lost while taking it)"] \
                if lost else []
            tail += (f"; this run's lock is {' and '.join(maybe)}: once reachable, "
                     f"{self.unlock_hint}.")
        if refused:
            by_run: dict[str, list[str]] = {}
            holders: dict[str, Holder] = {}
            for name in sorted(refused):
                by_run.setdefault(refused[name].nonce, []).append(name)
                holders[refused[name].nonce] = refused[name]
            held = "; and by ".join(
                f"{holders[n].describe()} (on {', '.join(hosts)}); if that run is gone: "
                f"{unlock_command(n, self.cluster_file)}" for n, hosts in by_run.items())
            also = f" Also: {_reasons(failed)}." if failed else ""
            return LockHeld(f"the cluster lock is held by {held}.{also}{tail}")
        host = sorted(lost or failed)[0]
        why = _reasons(failed).removeprefix(f"{host}: ") if len(failed) == 1 else \
            _reasons(failed)
        fix = "Once it is reachable, run again." if lost else f"Fix that on {host}, then run again."
        if len(failed) > 1:
            fix = "Fix those hosts, then run again."
        what = f"could not take the cluster lock {self.path}: {why}.{tail} {fix}"
        return HostUnreachable(host, what) if lost else ActionFailed(host, what)


def _reasons(errors: Mapping[str, HostError]) -> str:
    """'mac2: why; mac3: why', without the executor's generic 'agent <op> failed:' prefix."""
    return "; ".join(f"{n}: " + str(e).removeprefix(f"{n}: ").removeprefix(
        "agent lock_acquire failed: ").removeprefix("agent lock_release failed: ")
        for n, e in sorted(errors.items()))


async def force_unlock(conns: Mapping[str, Connection | HostError], cluster: str,
                       orch_dir: str, nonce: str, *, concurrency: int = 10) -> list[str]:
    """Remove the lock with this nonce wherever it is; returns the hosts it was removed from.

    Hosts are asked concurrently. A host that cannot be reached (or whose agent fails) is
    not skipped silently: after every other host was asked, the first such failure is raised
    naming the hosts that were cleared, so the user knows to run it again.
    """
    path = lock_path(cluster, orch_dir)

    async def release_one(conn: Connection) -> bool:
        answer = await conn.agent("lock_release", {"path": path, "nonce": nonce})
        return bool(answer["released"])

    results = await for_each_host(conns, release_one, concurrency)
    removed = sorted(n for n, r in results.items() if r is True)
    failures = {n: r for n, r in results.items() if isinstance(r, HostError)}
    if failures:
        host = sorted(failures)[0]
        done = f"removed it on {', '.join(removed)}" if removed else "removed it nowhere"
        what = (f"could not check for lock {nonce}: {_reasons(failures)}; {done}. "
                "Run the same command again once every host is reachable.")
        error_type = HostUnreachable if any(isinstance(e, HostUnreachable)
                                            for e in failures.values()) else ActionFailed
        raise error_type(host, what)
    return removed
