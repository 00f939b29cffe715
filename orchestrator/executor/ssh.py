"""The SSH executor: the only module that imports asyncssh's connection API.

One connection per host, opened once and reused for every command and agent call of a run
(the agent calls share one long-lived agent session on it; see session.py); hosts connect
concurrently under a limit, with retries for transient failures. asyncssh and OS
errors are translated here (``raise HostUnreachable(...) from exc``) into orchestrator.errors,
so nothing above this edge ever sees a backend type.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import stat
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from orchestrator.errors import ActionFailed, HostError, HostUnreachable

from ._asyncssh import asyncssh
from .agentcall import ONE_SHOT_OPS, call_agent
from .base import (
    AgentStep,
    CommandResult,
    Connection,
    FileStream,
    SSHOptions,
    Stdin,
    StepOutcome,
    Target,
)
from .hostkeys import HostKeyPolicy, rejection_error
from .pool import for_each_host
from .session import AgentSession, ChannelClosed

__all__ = ["SSHConnection", "SSHExecutor", "for_each_host"]

log = structlog.get_logger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds, when neither the command line nor the inventory says
RETRY_BACKOFF = 0.5  # seconds before the first retry; doubles each time
STDERR_TAIL = 4096  # bytes of an agent session's stderr kept for error messages


class SSHConnection:
    """A Connection over one asyncssh client connection. Create it with `SSHExecutor`."""

    def __init__(self, name: str, conn: asyncssh.SSHClientConnection, options: SSHOptions,
                 jump: asyncssh.SSHClientConnection | None = None) -> None:
        self.name = name
        self.round_trips = 0
        self._conn = conn
        self._jump = jump  # the ProxyJump connection this one is tunnelled through, if any
        self._options = options
        self.session = AgentSession(
            name,
            self._spawn,
            self.run,
            python=options.agent_python,
            command_timeout=options.command_timeout,
            install=options.install_agent,
        )

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        if not argv:
            raise ValueError("argv must not be empty")
        command = shlex.join(argv)  # the remote shell splits it back into exactly argv
        limit = self._options.command_timeout if timeout is None else timeout
        self.round_trips += 1
        log.debug("ssh_run", host=self.name, program=argv[0], round_trip=self.round_trips)
        process = await self._open(command, input=stdin or None,
                                   stdin=asyncssh.PIPE if stdin else asyncssh.DEVNULL)
        try:
            done = await process.wait(timeout=limit)
        except asyncssh.TimeoutError as exc:
            with contextlib.suppress(asyncssh.Error, OSError):  # honoured by OpenSSH >= 7.9
                process.send_signal("KILL")
            raise ActionFailed(self.name, f"command timed out after {limit}s: {argv[0]}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise HostUnreachable(self.name, f"connection lost: {_describe(exc)}") from exc
        finally:
            process.close()
        if done.exit_status is None and done.exit_signal is None and self._conn.is_closed():
            raise HostUnreachable(self.name, f"connection lost while running {argv[0]}")
        return CommandResult(_exit_status(done), _as_bytes(done.stdout), _as_bytes(done.stderr))

    async def agent(
        self, op: str, request: Mapping[str, Any], *, stdin: Stdin = None
    ) -> dict[str, Any]:
        if op not in ONE_SHOT_OPS:
            return await self.session.call(op, request, stdin)
        if isinstance(stdin, FileStream):
            raise ValueError(f"agent op {op!r} runs one-shot: its stdin cannot be streamed")
        return await call_agent(
            self.name,
            self.run,
            op,
            request,
            stdin=stdin,
            python=self._options.agent_python,
            command_timeout=self._options.command_timeout,
            install=self._options.install_agent,
        )

    async def agent_batch(self, steps: Sequence[AgentStep]) -> list[StepOutcome]:
        return await self.session.batch(steps)

    async def _spawn(self, argv: Sequence[str]) -> _SSHChannel:
        """Open an exec channel for the agent session (counted as a round trip)."""
        self.round_trips += 1
        log.debug("ssh_session", host=self.name, round_trip=self.round_trips)
        return _SSHChannel(self._conn, await self._open(shlex.join(argv)))

    async def _open(self, command: str, **kwargs: Any) -> asyncssh.SSHClientProcess[bytes]:
        """An exec channel for `command`, its failures mapped at this edge: a closed
        connection is HostUnreachable, a refused session on a live one ActionFailed."""
        try:
            process: asyncssh.SSHClientProcess[bytes] = await self._conn.create_process(
                command, encoding=None, **kwargs)
        except asyncssh.ChannelOpenError as exc:
            # A connection asyncssh has just found dead refuses channels at once, but marks
            # itself closed in a callback it schedules: let that run before asking.
            await asyncio.sleep(0)
            if self._conn.is_closed():
                raise HostUnreachable(self.name, f"connection lost: {exc.reason}") from exc
            raise ActionFailed(self.name, f"could not open an SSH session: {exc.reason}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise HostUnreachable(self.name, f"connection lost: {_describe(exc)}") from exc
        return process

    async def close(self) -> None:
        await self.session.close()
        for conn in (self._conn, self._jump):
            if conn is not None:
                conn.close()
                with contextlib.suppress(asyncssh.Error, OSError):
                    await conn.wait_closed()


class _SSHChannel:
    """An asyncssh process as a session.AgentChannel: asyncssh errors become ChannelClosed."""

    def __init__(
        self, conn: asyncssh.SSHClientConnection, process: asyncssh.SSHClientProcess[bytes]
    ) -> None:
        self._conn = conn
        self._process = process
        self._stderr = b""
        self._drain = asyncio.get_running_loop().create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        """Read stderr as it comes: unread, it would fill the channel's window and stall."""
        with contextlib.suppress(asyncssh.Error, OSError):
            while chunk := await self._process.stderr.read(65536):
                self._stderr = (self._stderr + chunk)[-STDERR_TAIL:]

    async def write(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
            await self._process.stdin.drain()
        except (asyncssh.Error, OSError) as exc:
            raise ChannelClosed(_describe(exc)) from exc

    async def read_exactly(self, size: int) -> bytes:
        try:
            return await self._process.stdout.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise ChannelClosed("the agent's output ended") from exc
        except (asyncssh.Error, OSError) as exc:
            raise ChannelClosed(_describe(exc)) from exc

    async def finish(self, timeout: float) -> int | None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._process.stdin.write_eof()
        try:
            await asyncio.wait_for(self._process.wait_closed(), timeout)
        except (TimeoutError, asyncssh.Error, OSError):
            return None
        with contextlib.suppress(asyncio.TimeoutError, asyncssh.Error, OSError):
            await asyncio.wait_for(self._drain, 1.0)
        process = self._process
        if process.exit_signal:
            number = getattr(signal, f"SIG{process.exit_signal[0]}", None)
            return 128 + int(number) if number is not None else 255
        status = process.exit_status
        return status if status is not None and status >= 0 else None

    def kill(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):  # honoured by OpenSSH >= 7.9
            self._process.send_signal("KILL")
        with contextlib.suppress(asyncssh.Error, OSError, RuntimeError):  # RuntimeError: loop gone
            self._process.close()
            self._drain.cancel()

    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", "replace").strip()

    def connection_lost(self) -> bool:
        return self._conn.is_closed()


def _as_bytes(data: object) -> bytes:
    return data if isinstance(data, bytes) else b""


def _exit_status(done: asyncssh.SSHCompletedProcess) -> int:
    """Shell-style status: a remote signal N is 128+N; a vanished status is 255, like ssh(1)."""
    if done.exit_signal:
        name = done.exit_signal[0]
        number = getattr(signal, f"SIG{name}", None)
        return 128 + int(number) if number is not None else 255
    return done.exit_status if done.exit_status is not None and done.exit_status >= 0 else 255


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class SSHExecutor:
    """Opens connections to targets with one set of `SSHOptions`."""

    def __init__(self, options: SSHOptions | None = None) -> None:
        self.options = options or SSHOptions()
        self._parsed: dict[tuple[tuple[str, int, int, int], ...], asyncssh.SSHKnownHosts] = {}

    @contextlib.asynccontextmanager
    async def connect(self, target: Target) -> AsyncIterator[Connection]:
        """``async with executor.connect(target) as conn``: raises HostError if it cannot."""
        conn = await self.open(target)
        try:
            yield conn
        finally:
            await conn.close()

    async def connect_all(self, targets: Iterable[Target], *,
                          start_agents: bool = False) -> dict[str, Connection | HostError]:
        """Connect to every target concurrently (at most `concurrency` at once).

        A host that cannot be reached is recorded as its HostError and never stops the others.
        `start_agents`: start each host's agent session as soon as its connection is up
        (`AgentSession.start`), for a caller whose every host gets an agent call next; a
        host whose agent could not be started stays connected, and its first call says why.
        """
        by_name: dict[str, Target] = {}
        for t in targets:
            if t.name in by_name:
                raise ValueError(f"two targets are named {t.name!r}")
            by_name[t.name] = t

        async def one(target: Target) -> Connection:
            conn = await self.open(target)
            if start_agents:
                with contextlib.suppress(HostError):
                    await conn.session.start()
            return conn

        results = await for_each_host(by_name, one, self.options.concurrency)
        return dict(results)

    async def open(self, target: Target) -> SSHConnection:
        """Connect, retrying transient failures; never retries a refused key or login."""
        attempts = 1 + max(0, self.options.connect_retries)
        last: HostError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF * 2 ** (attempt - 1))
            try:
                return await self._open_once(target)
            except _Transient as exc:
                last = exc.error
                log.debug("ssh_connect_retry", host=target.name, attempt=attempt + 1,
                          error=str(exc.error))  # fmt: skip
        assert last is not None
        log.info("ssh_unreachable", host=target.name, attempts=attempts, error=str(last))
        raise last

    def _timeout(self, target: Target) -> float:
        """The command line's connect timeout, else the inventory's, else the default."""
        for value in (self.options.connect_timeout, target.connect_timeout):
            if value is not None:
                return value
        return DEFAULT_CONNECT_TIMEOUT

    def _settings(self, target: Target) -> asyncssh.SSHClientConnectionOptions:
        """asyncssh options with ~/.ssh/config applied; explicit target values win."""
        kwargs: dict[str, Any] = {
            "connect_timeout": self._timeout(target),
            "login_timeout": self._timeout(target),
            "keepalive_interval": 30,
        }
        if self.options.ssh_config is not None:
            kwargs["config"] = [str(self.options.ssh_config)]
        if target.port != 22:
            kwargs["port"] = target.port
        if target.user is not None:
            kwargs["username"] = target.user
        if target.identity_file is not None:
            kwargs["client_keys"] = [str(target.identity_file)]
        return asyncssh.SSHClientConnectionOptions(host=target.address, **kwargs)

    def _known_hosts(self, target: Target,
                     settings: asyncssh.SSHClientConnectionOptions) -> list[Path]:
        """The known_hosts files in force: the option, else the inventory's, else the SSH
        config's, else the default."""
        if self.options.known_hosts is not None:
            return [self.options.known_hosts]
        if target.known_hosts is not None:
            return [target.known_hosts]
        configured = settings.known_hosts
        if configured is None:  # UserKnownHostsFile none: checking disabled by the user's config
            return []
        if configured == ():
            return [Path("~/.ssh/known_hosts").expanduser()]
        if isinstance(configured, (list, tuple)):
            return [Path(str(p)).expanduser() for p in configured]
        return [Path(str(configured)).expanduser()]

    def _known_hosts_arg(self, files: list[Path]) -> asyncssh.SSHKnownHosts | bytes:
        """The known_hosts files as asyncssh checks them, parsed once per executor while they
        are unchanged. Given paths, asyncssh reads and parses them again for every connection,
        decoding every key in them: N hosts recorded in one file cost N² key decodes per run
        (~3 ms a host at 25). A file that changed (a key accepted with accept-new) is parsed
        again; none existing is empty bytes, an empty known_hosts."""
        stamps = []
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                stamps.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
        if not stamps:
            return b""
        key = tuple(stamps)
        parsed = self._parsed.get(key)
        if parsed is None:
            parsed = self._parsed[key] = asyncssh.read_known_hosts([s[0] for s in stamps])
        return parsed

    async def _open_once(self, target: Target) -> SSHConnection:
        try:
            settings = self._settings(target)
        except (asyncssh.Error, OSError, ValueError) as exc:
            raise HostUnreachable(target.name, f"bad SSH settings: {exc}") from exc
        files = self._known_hosts(target, settings)
        policy = HostKeyPolicy(files, self.options.accept_new_host_keys)
        try:
            known: Any = self._known_hosts_arg(files)
        except (OSError, ValueError) as exc:  # unreadable, or a line asyncssh cannot parse
            raise HostUnreachable(target.name, f"cannot read known_hosts: {exc}") from exc
        if (self.options.known_hosts is None and target.known_hosts is None
                and settings.known_hosts is None):
            known = None
        host, port = settings.host or target.address, settings.port or 22
        log.debug("ssh_connect", host=target.name, address=host, port=port,
                  proxy_jump=target.proxy_jump)
        jump = None
        if target.proxy_jump is not None:
            jump = await self._connect(target, _jump_target(target), known, files)
        try:
            conn = await self._connect(target, target, known, files, policy=policy,
                                       settings=settings, tunnel=jump)
        except BaseException:
            if jump is not None:
                jump.close()
            raise
        log.debug("ssh_connected", host=target.name)
        return SSHConnection(target.name, conn, self.options, jump)

    async def _connect(self, owner: Target, target: Target, known: Any, files: list[Path], *,
                       policy: HostKeyPolicy | None = None,
                       settings: asyncssh.SSHClientConnectionOptions | None = None,
                       tunnel: asyncssh.SSHClientConnection | None = None,
                       ) -> asyncssh.SSHClientConnection:
        """One asyncssh connection (to the host, or to its ProxyJump host, `owner` naming the
        host either way), with asyncssh's failures mapped at this edge."""
        if settings is None:
            try:
                settings = self._settings(target)
            except (asyncssh.Error, OSError, ValueError) as exc:
                raise HostUnreachable(owner.name, f"bad SSH settings: {exc}") from exc
        policy = policy or HostKeyPolicy(files, self.options.accept_new_host_keys)
        host, port = settings.host or target.address, settings.port or 22
        via = (f" (through {owner.proxy_jump})" if tunnel is not None
               else " (the inventory's ssh.proxy_jump)" if target is not owner else "")
        timeout = self._timeout(owner)
        try:
            return await asyncio.wait_for(
                asyncssh.connect(
                    target.address,
                    target.port if target.port != 22 else (),  # 22: let the config decide
                    options=settings,
                    known_hosts=known,
                    client_factory=lambda: policy,
                    tunnel=tunnel if tunnel is not None else (),
                ),
                timeout + 1,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise rejection_error(owner.name, host, port, files, policy.rejection,
                                  exc.reason) from exc  # fmt: skip
        except asyncssh.PermissionDenied as exc:
            who = settings.username or "the default user"
            raise HostUnreachable(
                owner.name,
                f"authentication failed for {who}@{host}:{port}{via} ({exc.reason}); "
                "check the inventory's user and identity_file, or your ssh-agent",
            ) from exc
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            error = HostUnreachable(
                owner.name, f"cannot connect to {host}:{port}{via}: {_describe(exc)}"
            )
            error.__cause__ = exc
            raise _Transient(error) from exc


def _jump_target(target: Target) -> Target:
    """The ProxyJump host as a target of its own: its user and port from `proxy_jump` (else
    the host's user, port 22), the host's key and timeouts (OpenSSH's ProxyJump does the same)."""
    assert target.proxy_jump is not None
    user, _, rest = target.proxy_jump.rpartition("@")
    address, _, port = rest.partition(":")
    return Target(name=f"{target.name} (jump {rest})", address=address,
                  port=int(port) if port else 22, user=user or target.user,
                  identity_file=target.identity_file, known_hosts=target.known_hosts,
                  connect_timeout=target.connect_timeout)


class _Transient(Exception):
    """Internal: a failure worth retrying (refused, timed out, reset), carrying its HostError."""

    def __init__(self, error: HostUnreachable) -> None:
        super().__init__(str(error))
        self.error = error
