"""The facts call's probes (sysctl, guards, sudo -l) run with ``os.posix_spawn``, not subprocess.

Why: a no-op run's agent session starts one interpreter per host, and ``import subprocess``
(signal, threading, selectors, locale, contextlib, warnings) was ~3 ms of its CPU for three
short commands. `run` keeps what ``subprocess.run`` does for them: stdin from /dev/null,
stdout captured or discarded, stderr discarded, the signals Python ignores (SIGPIPE, SIGXFSZ)
back to their defaults in the child (``restore_signals``), no other descriptor inherited
(Python opens every descriptor non-inheritable; one this process inherited open, such as a
``flock`` holder's lock, is closed in the child: ``close_fds``), and a timeout after which
the child is killed. What it does not do (a working directory, an environment of its own) stays with
subprocess, in its callers.
"""

from __future__ import annotations

import os
import select
import time

# Their numbers on Linux and macOS alike; the signal module (its enums) costs ~0.5 ms.
SIGPIPE, SIGXFSZ, SIGKILL = 13, 25, 9


class TimedOut(Exception):
    """The command ran past its timeout; it was killed and reaped."""


def run(argv: list[str], timeout: float | None, *, capture: bool = False) -> tuple[int, bytes]:
    """(return code as subprocess reports it: -N for signal N, stdout or b"").

    argv[0] without a slash is looked up on this process's PATH, as subprocess does when it
    is given no env. Raises OSError (FileNotFoundError, PermissionError, ...) when it cannot
    be started, TimedOut after `timeout` seconds (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    actions: list[tuple[object, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                         (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
    read_end = write_end = -1
    if capture:
        read_end, write_end = os.pipe()
        actions.append((os.POSIX_SPAWN_DUP2, write_end, 1))
    else:
        actions.append((os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0))
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited()]
    spawn = os.posix_spawn if os.sep in argv[0] else os.posix_spawnp
    try:
        pid = spawn(argv[0], argv, os.environ, file_actions=actions,
                    setsigdef=(SIGPIPE, SIGXFSZ))
    except BaseException:
        if capture:
            os.close(read_end)
        raise
    finally:
        if capture:
            os.close(write_end)
    chunks = []
    try:
        if capture:
            while True:
                ready, _, _ = select.select([read_end], [], [], _left(deadline))
                chunk = os.read(read_end, 1 << 16) if ready else None
                if chunk is None:
                    raise TimedOut
                if not chunk:
                    break
                chunks.append(chunk)
        return _wait(pid, deadline), b"".join(chunks)
    except BaseException:
        _kill(pid)
        raise
    finally:
        if capture:
            os.close(read_end)


def _inherited() -> list[int]:
    """This process's descriptors above stderr that a child would inherit (``/dev/fd`` lists
    them on macOS and Linux alike; the one the listing itself uses is gone by the check)."""
    found = []
    for name in os.listdir("/dev/fd"):  # noqa: PTH208 (no pathlib: its import costs)
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _wait(pid: int, deadline: float | None) -> int:
    """Reap pid; polled as subprocess polls a wait with a timeout (0.5 ms, doubling to 50)."""
    if deadline is None:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    delay = 0.0005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        left = _left(deadline)
        if not left:
            raise TimedOut
        delay = min(delay * 2, left, 0.05)
        time.sleep(delay)


def _kill(pid: int) -> None:
    """Kill and reap the child (a timeout, or an interruption while it ran)."""
    try:
        os.kill(pid, SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):  # already reaped
        pass
