"""One apply per cluster at a time, enforced on the hosts themselves.

There is no server to hold a lock, so every host holds a copy: a directory created atomically
(`mkdir` either makes it or finds it) with the holder's name, time and a nonce inside. Hosts are
locked in sorted order, so two runs racing for the same cluster cannot each hold half of it:
the one that loses on the first contested host releases what it took and reports the holder.
`orch unlock --force NONCE` removes a lock left by a run that died.
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

from orchestrator.errors import HostError, LockHeld
from orchestrator.executor import Connection


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


class ClusterLock:
    """Acquire on every reachable host in sorted order; release in reverse."""

    def __init__(self, cluster: str, orch_dir: str, holder: Holder) -> None:
        self.path = lock_path(cluster, orch_dir)
        self.holder = holder
        self.held: list[Connection] = []

    async def acquire(self, conns: Mapping[str, Connection | HostError]) -> None:
        for name in sorted(conns):
            conn = conns[name]
            if isinstance(conn, HostError):
                continue
            answer = await conn.agent("lock_acquire", {"path": self.path,
                                                       "holder": self.holder.to_json()})
            if not answer["acquired"]:
                await self.release()
                other = Holder.from_json(answer["holder"])
                raise LockHeld(f"the cluster lock is held by {other.describe()} "
                               f"(on {name}); if that run is gone: "
                               f"orch unlock --force {other.nonce} CLUSTER")
            self.held.append(conn)

    async def release(self) -> None:
        while self.held:
            conn = self.held.pop()
            await conn.agent("lock_release", {"path": self.path, "nonce": self.holder.nonce})


async def force_unlock(conns: Mapping[str, Connection | HostError], cluster: str,
                       orch_dir: str, nonce: str) -> list[str]:
    """Remove the lock with this nonce wherever it is; returns the hosts it was removed from."""
    removed = []
    for name in sorted(conns):
        conn = conns[name]
        if isinstance(conn, HostError):
            continue
        answer = await conn.agent("lock_release", {"path": lock_path(cluster, orch_dir),
                                                   "nonce": nonce})
        if answer["released"]:
            removed.append(name)
    return removed
