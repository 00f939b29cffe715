"""`LocalConnection`: the Connection protocol on this machine, for fast tests without SSH.

It runs the same argv, the same agent shipping scripts and the same framed agent session as the
SSH connection, only through local subprocesses with ``HOME`` pointed at a directory of the
test's choosing, so resources, the agent and the session protocol are exercised for real and
round trips are counted the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from orchestrator.errors import ActionFailed

from .agentcall import ONE_SHOT_OPS, call_agent
from .base import AgentStep, CommandResult, FileStream, Stdin, StepOutcome
from .session import AgentSession, ChannelClosed

__all__ = ["LocalConnection"]


class LocalConnection:
    """A "host" that is a local HOME directory; `env` adds or overrides variables (e.g. PATH).

    The directory is created if missing: a real host always has its HOME.
    """

    def __init__(
        self,
        home: Path,
        *,
        name: str = "local",
        env: Mapping[str, str] | None = None,
        agent_python: str = sys.executable,
        command_timeout: float = 600,
        install_agent: bool = True,
    ) -> None:
        self.name = name
        self.round_trips = 0
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.agent_python = agent_python
        self.command_timeout = command_timeout
        self.install_agent = install_agent
        self._env = {**os.environ, "HOME": str(home), **(env or {})}
        self.session = AgentSession(
            name,
            self._spawn,
            self.run,
            python=agent_python,
            command_timeout=command_timeout,
            install=install_agent,
        )

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        if not argv:
            raise ValueError("argv must not be empty")
        self.round_trips += 1
        limit = self.command_timeout if timeout is None else timeout
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                cwd=self.home,
                start_new_session=True,
            )
        except FileNotFoundError:
            if not self.home.is_dir():
                raise ActionFailed(self.name, f"home directory {self.home} is gone") from None
            return CommandResult(127, b"", f"{argv[0]}: command not found\n".encode())
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin or None), limit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise ActionFailed(self.name, f"command timed out after {limit}s: {argv[0]}") from None
        code = proc.returncode
        assert code is not None
        return CommandResult(128 - code if code < 0 else code, out, err)

    async def agent(
        self, op: str, request: Mapping[str, Any], *, stdin: Stdin = None
    ) -> dict[str, Any]:
        if op not in ONE_SHOT_OPS:
            return await self.session.call(op, request, stdin)
        return await call_agent(
            self.name,
            self.run,
            op,
            request,
            stdin=stdin.read_all() if isinstance(stdin, FileStream) else stdin,
            python=self.agent_python,
            command_timeout=self.command_timeout,
            install=self.install_agent,
        )

    async def agent_batch(self, steps: Sequence[AgentStep]) -> list[StepOutcome]:
        return await self.session.batch(steps)

    async def _spawn(self, argv: Sequence[str]) -> _LocalChannel:
        """Start a process for the agent session (counted as a round trip)."""
        self.round_trips += 1
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                cwd=self.home,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise ActionFailed(self.name, f"cannot start {argv[0]} in {self.home}") from None
        return _LocalChannel(proc)

    async def close(self) -> None:
        """End the agent session, if one is open."""
        await self.session.close()


class _LocalChannel:
    """A local subprocess as a session.AgentChannel (its "connection" is never lost).

    Why blocking pipes read in threads instead of asyncio's subprocess transports: tests drive
    one LocalConnection from several ``asyncio.run`` calls and do not always close it, and a
    transport outliving its loop fails when it is collected (at any moment, even inside
    another module's compile). A Popen belongs to no loop.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        self._stdin, self._stdout = proc.stdin, proc.stdout
        self._stderr = b""
        self._drain = threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True)
        self._drain.start()
        # A test that never closes its LocalConnection must not leave agents waiting for
        # stdin until the test process ends: the agent goes when its channel does.
        weakref.finalize(self, _kill_group, proc)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        """Read stderr as it comes: an unread pipe fills and stalls the agent."""
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(stream.fileno(), 65536):
                self._stderr = (self._stderr + chunk)[-4096:]

    async def write(self, data: bytes) -> None:
        def send() -> None:
            self._stdin.write(data)
            self._stdin.flush()

        try:
            await asyncio.to_thread(send)
        except (OSError, ValueError) as exc:  # BrokenPipe, or the pipe closed by kill
            raise ChannelClosed(str(exc) or type(exc).__name__) from exc

    async def read_exactly(self, size: int) -> bytes:
        try:
            data = await asyncio.to_thread(self._stdout.read, size)
        except (OSError, ValueError) as exc:
            raise ChannelClosed(str(exc) or type(exc).__name__) from exc
        if len(data) < size:
            raise ChannelClosed("the agent's output ended")
        return data

    async def finish(self, timeout: float) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            self._stdin.close()
        try:
            code = await asyncio.to_thread(self._proc.wait, timeout)
        except subprocess.TimeoutExpired:
            return None
        await asyncio.to_thread(self._drain.join, 1.0)
        return 128 - code if code < 0 else code

    def kill(self) -> None:
        _kill_group(self._proc)

    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", "replace").strip()

    def connection_lost(self) -> bool:
        return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent's process group (it leads its own session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            if stream is not None:
                stream.close()
