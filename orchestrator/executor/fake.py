"""`LocalConnection`: the Connection protocol on this machine, for fast tests without SSH.

It runs the same argv and the same agent shipping scripts as the SSH connection, only through a
local subprocess with ``HOME`` pointed at a directory of the test's choosing, so resources and the
agent are exercised for real and round trips are counted the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import ActionFailed

from .agentcall import call_agent
from .base import CommandResult

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
    ) -> None:
        self.name = name
        self.round_trips = 0
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.agent_python = agent_python
        self.command_timeout = command_timeout
        self._env = {**os.environ, "HOME": str(home), **(env or {})}

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
        self, op: str, request: Mapping[str, Any], *, stdin: bytes | None = None
    ) -> dict[str, Any]:
        return await call_agent(
            self.name,
            self.run,
            op,
            request,
            stdin=stdin,
            python=self.agent_python,
            command_timeout=self.command_timeout,
        )

    async def close(self) -> None:
        """Nothing to close; present for the protocol."""
