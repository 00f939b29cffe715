"""Processes and ports of the simulated Macs: waiting for daemons, finding every process a
host started, and killing them all.

A host's processes are found two ways, because neither alone is enough: by the marker
``ORCH_HOST_ROOT=<root>`` in their environment (everything the login wrapper and launchd
start inherits it, even after leaving its process group or session), and as descendants of
the host's daemons (sshd rewrites its own environment block for its process titles, so its
connection processes carry no readable marker). Linux only: it reads ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.errors import OrchError


class SandboxError(OrchError):
    """A simulated host could not be started, stopped or rebooted; the message says why."""


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


def previous_port(root: Path, address: str) -> int | None:
    """The port this host used last time, if still free: a restarted sandbox keeps its
    ports, so known_hosts entries and inventories written for it stay valid."""
    with contextlib.suppress(OSError, ValueError):
        for line in (root / "etc" / "sshd_config").read_text().splitlines():
            if line.startswith(f"ListenAddress {address}:"):
                port = int(line.rpartition(":")[2])
                with socket.socket() as s:
                    s.bind((address, port))
                return port
    return None


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    deadline: float,
    what: str,
    log: Path,
) -> None:
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise SandboxError(f"{what}: exited with {proc.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            raise SandboxError(f"{what} in time\n{tail(log)}")
        time.sleep(0.02)


def tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {log})"
    return f"last lines of {log}:\n" + "\n".join(text)


def host_pids(root: Path, daemons: Sequence[int] = ()) -> list[int]:
    """Live processes of the host at ``root``: those whose environment carries its marker,
    plus every descendant of its daemons (sshd rewrites its own environment block for its
    process titles, so its connection processes carry no readable marker)."""
    marker = b"\0ORCH_HOST_ROOT=" + os.fsencode(str(root)) + b"\0"
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            stat = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
            environ = b"\0" + Path(entry.path, "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if stat[0] in ("Z", "X"):
            continue
        children.setdefault(int(stat[1]), []).append(pid)
        if marker in environ:
            found.add(pid)
    seen: set[int] = set()
    todo = [d for d in daemons if alive(d)]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(p for p in found | seen if alive(p))


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def kill_all(
    root: Path, launchd: subprocess.Popen[bytes] | None, sshd: subprocess.Popen[bytes] | None
) -> None:
    """Stop a host: launchd first (it stops its jobs like at shutdown), then sshd's listener
    (frozen while its connection processes are collected, so none slips through), then
    SIGTERM and, after a grace period, SIGKILL whatever of the host is left."""
    if launchd is not None:
        terminate(launchd, timeout=10)
    stragglers: list[int] = []
    if sshd is not None:
        with contextlib.suppress(ProcessLookupError):
            sshd.send_signal(signal.SIGSTOP)
        stragglers = host_pids(root, [sshd.pid])
        with contextlib.suppress(ProcessLookupError):
            sshd.send_signal(signal.SIGCONT)
        terminate(sshd, timeout=5)
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        pids = [p for p in stragglers if alive(p)] + host_pids(root)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (any(alive(p) for p in pids) or host_pids(root)):
            time.sleep(0.05)


def kill_stale(root: Path) -> None:
    """Kill what a crashed earlier run left of this host (found by its pid files and
    marker), so that starting a host again is a clean power cycle, not a port clash."""
    daemons = []
    for name in ("sshd.pid", "launchd.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int((root / "run" / name).read_text())
            if str(root) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                daemons.append(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = host_pids(root, daemons)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
