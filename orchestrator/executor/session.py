"""One agent process per host per run, spoken to in frames (Mitogen's model, for orch).

Why: starting the agent is a new exec channel (on a test host, also a login shell) and a
fresh Python interpreter, tens of milliseconds of CPU on the node each time, and a no-op
apply makes several calls per host. An `AgentSession` opens one channel running
``agent.py session`` at the first call and sends every later call of the run over it (the
frame format is in orchestrator/agent/protocol.py; payload bytes such as ``write``'s travel
raw, never in argv and never base64). The channel is opened lazily so a connection that never
calls the agent never starts one, and it starts exactly as a one-shot call would: the cached
zip is tried first, uploaded when missing (`install`), or its sources streamed when the run
must write nothing (read-only runs).

Concurrency: several asyncio tasks may call the agent on one connection (the engine does).
The session answers requests strictly in order, so an `asyncio.Lock` serializes whole
exchanges (frame out, frame back): one request in flight, which keeps responses matched to
callers without request ids and costs nothing measurable, since every op is short. The ops
that are not short — ``serve`` runs for a whole apply and heartbeats, ``fetch`` downloads for
minutes — never enter the session; they run one-shot on channels of their own (as before),
so they never hold the lock and can run side by side with the session and with each other.

Failures: a call that exceeds its timeout kills the agent and raises ActionFailed; a channel
that ends mid-call raises HostUnreachable when the connection is gone and ActionFailed when
only the agent died. Either way the session is dropped (its stream may be mid-frame), and the
next call opens a new one. A call is never retried: the op may have changed the host.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from orchestrator.agent import agent_file_id, agent_stream
from orchestrator.errors import ActionFailed, HostUnreachable

from .agentcall import (
    AGENT_GRACE,
    AGENT_MISSING,
    ONE_SHOT_OPS,
    RUN_SCRIPT,
    Runner,
    agent_timeout,
    decode_answer,
    python_failure,
    stream_argv,
    upload_agent,
)
from .base import AgentStep, FileStream, StepOutcome, StepState

__all__ = ["AgentChannel", "AgentSession", "ChannelClosed", "Spawner"]

log = structlog.get_logger(__name__)

HEADER = struct.Struct(">II")  # request frame: header length, payload length
BODY = struct.Struct(">I")  # response frame: body length
MAX_BODY = 256 << 20  # a larger "response" is a corrupt stream, not an answer
CLOSE_WAIT = 5.0  # seconds a closing agent gets to exit before it is killed
LOSS_WAIT = 2.0  # seconds to wait for the exit status of a channel that ended mid-call


class ChannelClosed(Exception):
    """The agent's channel ended (EOF, reset, or the connection went away)."""


class AgentChannel(Protocol):
    """One exec channel running the agent, as a session needs it; each connection adapts its
    backend (asyncssh, a local subprocess) to this and translates the backend's errors into
    ChannelClosed, so this module never sees a backend type."""

    async def write(self, data: bytes) -> None:
        """Send bytes to the agent's stdin (waiting for flow control)."""
        ...

    async def read_exactly(self, size: int) -> bytes:
        """The next `size` bytes of the agent's stdout; ChannelClosed if it ends first."""
        ...

    async def finish(self, timeout: float) -> int | None:
        """Close stdin and wait up to `timeout` for the exit status (None: unknown)."""
        ...

    def kill(self) -> None:
        """Kill the agent now and drop the channel; never raises."""
        ...

    def stderr_tail(self) -> str:
        """The last of what the agent wrote on stderr (read continuously, so it never blocks)."""
        ...

    def connection_lost(self) -> bool:
        """True when the whole connection, not just this channel, is gone."""
        ...


Spawner = Callable[[Sequence[str]], Awaitable[AgentChannel]]


class AgentSession:
    """The agent session of one connection. `spawn` opens an exec channel (and counts it as a
    round trip); `run` is the connection's `run`, used only to upload the agent."""

    def __init__(
        self,
        host: str,
        spawn: Spawner,
        run: Runner,
        *,
        python: str,
        command_timeout: float,
        install: bool,
    ) -> None:
        self.host = host
        self._spawn = spawn
        self._run = run
        self._python = python
        self._command_timeout = command_timeout
        self._install = install
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # where the channel and lock live
        self._channel: AgentChannel | None = None
        self._started: AgentChannel | None = None  # spawned by `start`, its hello not yet read
        self.pid: int | None = None  # the agent's pid on the host, from its hello

    async def start(self) -> None:
        """Start the agent now, without waiting for it: open its exec channel, and leave its
        hello to the first call. Why: the engine starts every host's agent as that host's
        connection comes up, so the interpreter starts while other hosts are still dialled,
        and the first call (the lock, on the first host alone) does not wait for it.

        Raises what opening a channel raises (HostUnreachable, ActionFailed, also after the
        command timeout: a host that stalls the exec); a failure to start is otherwise the
        first call's to report, as without `start`."""
        self._bind_loop()
        async with self._lock:
            if self._channel is None and self._started is None:
                try:
                    async with asyncio.timeout(self._command_timeout):
                        self._started = await self._spawn(self._run_argv())
                except TimeoutError:
                    raise ActionFailed(self.host, "the orch agent's channel did not open in "
                                                  f"{self._command_timeout:g}s") from None

    async def call(
        self, op: str, request: Mapping[str, Any], stdin: bytes | FileStream | None
    ) -> dict[str, Any]:
        """Run one op in the session; ActionFailed with the agent's message if it fails."""
        if op in ONE_SHOT_OPS or op == "batch":
            raise ValueError(f"agent op {op!r} does not run through AgentSession.call")
        timeout = agent_timeout(request, self._command_timeout)
        answer = await self._exchange(op, request, stdin or b"", timeout)
        return decode_answer(self.host, op, answer)

    async def batch(self, steps: Sequence[AgentStep]) -> list[StepOutcome]:
        """Run `steps` as one ``batch`` request (see `Connection.agent_batch`)."""
        for step in steps:
            if step.op in ONE_SHOT_OPS or step.op == "batch":
                raise ValueError(f"agent op {step.op!r} cannot run in a batch")
        if not steps:
            return []
        request = {
            "steps": [
                {"op": s.op, "request": dict(s.request), "stdin": len(s.stdin)} for s in steps
            ]
        }
        own = sum(agent_timeout(s.request, 0) - AGENT_GRACE for s in steps)
        timeout = max(self._command_timeout, own) + AGENT_GRACE
        answer = decode_answer(
            self.host,
            "batch",
            await self._exchange("batch", request, b"".join(s.stdin for s in steps), timeout),
        )
        return _outcomes(self.host, steps, answer)

    async def close(self) -> None:
        """End the session: close the agent's stdin (it exits at the frame boundary), wait
        briefly, kill it if it lingers. Safe when no session is open."""
        channel = self._channel or self._started
        self._channel, self._started, self.pid = None, None, None
        if channel is None:
            return
        if self._loop is not asyncio.get_running_loop():  # opened under a loop now gone
            channel.kill()
            return
        try:
            await channel.finish(CLOSE_WAIT)
        except ChannelClosed:
            pass
        finally:
            channel.kill()

    # -- internals -------------------------------------------------------------------------

    async def _exchange(
        self, op: str, request: Mapping[str, Any], payload: bytes | FileStream, timeout: float
    ) -> dict[str, Any]:
        header = json.dumps({"op": op, "request": dict(request)}, separators=(",", ":")).encode()
        self._bind_loop()
        async with self._lock:
            channel: AgentChannel | None = None
            try:
                async with asyncio.timeout(timeout):
                    channel = self._channel or await self._open()
                    self._channel = channel
                    size = payload.size if isinstance(payload, FileStream) else len(payload)
                    await channel.write(HEADER.pack(len(header), size) + header)
                    if isinstance(payload, FileStream):
                        await _send_file(self.host, channel, payload)
                    elif payload:
                        await channel.write(payload)
                    return await _read_frame(channel)
            except TimeoutError:
                self._drop(channel)
                raise ActionFailed(self.host, f"agent {op} timed out after {timeout:g}s") from None
            except ChannelClosed as exc:
                status = await self._wind_down(channel)
                raise self._ended(op, channel, exc, status) from exc
            except BaseException:  # cancelled mid-frame: the stream can no longer be trusted
                self._drop(channel)
                raise

    def _bind_loop(self) -> None:
        """A connection used from a new event loop (a second ``asyncio.run``, as tests do with
        LocalConnection) cannot use a channel or lock of the old one: kill that agent, start
        over. Only the first loop's channel is lost; nothing on the host depends on it."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        for channel in (self._channel, self._started):
            if channel is not None:
                channel.kill()
        self._channel, self._started, self.pid = None, None, None
        self._lock = asyncio.Lock()
        self._loop = loop

    def _drop(self, channel: AgentChannel | None) -> None:
        if channel is not None:
            channel.kill()
        if self._channel is channel:
            self._channel = None
            self.pid = None

    async def _wind_down(self, channel: AgentChannel | None) -> int | None:
        """After a channel ended mid-call: wait briefly for its exit status (which arrives after
        the end of its output, and tells a dead agent from a dead connection), then drop it."""
        try:
            return None if channel is None else await channel.finish(LOSS_WAIT)
        except ChannelClosed:
            return None
        finally:
            self._drop(channel)

    def _ended(
        self, op: str, channel: AgentChannel | None, exc: ChannelClosed, status: int | None
    ) -> Exception:
        if channel is None or channel.connection_lost():
            return HostUnreachable(self.host, f"connection lost during agent {op}: {exc}")
        tail = channel.stderr_tail()
        how = f"exit {status}" if status is not None else str(exc)
        return ActionFailed(
            self.host,
            f"agent {op}: the agent session ended unexpectedly ({how})"
            + (f": {tail}" if tail else ""),
        )

    async def _open(self) -> AgentChannel:
        """Start ``agent.py session``: the cached zip, else upload it (or stream the sources)."""
        argv = self._run_argv()
        channel, self._started = self._started or await self._spawn(argv), None
        status = await self._hello(channel)
        if status == AGENT_MISSING and self._install:
            await upload_agent(self.host, self._run, self._python)
            channel = await self._spawn(argv)
            status = await self._hello(channel)
        elif status == AGENT_MISSING:
            channel = await self._spawn(stream_argv(self._python, "session"))
            await channel.write(agent_stream())
            status = await self._hello(channel)
        if status is None:
            return channel
        tail = channel.stderr_tail()
        missing = python_failure(self.host, self._python, status, tail.encode())
        if missing is not None:
            raise missing
        raise ActionFailed(
            self.host,
            f"the orch agent did not start (exit {status})" + (f": {tail}" if tail else ""),
        )

    def _run_argv(self) -> list[str]:
        """The cached agent's session, run by `sh` (AGENT_MISSING when it is not cached)."""
        return ["sh", "-c", RUN_SCRIPT, "sh", agent_file_id(), "session", self._python]

    async def _hello(self, channel: AgentChannel) -> int | None:
        """None once the agent said hello; else the exit status of what ran instead."""
        try:
            hello = await _read_frame(channel)
        except ChannelClosed:
            if channel.connection_lost():
                raise
            status = await channel.finish(CLOSE_WAIT)
            channel.kill()
            return -1 if status is None else status
        except BaseException:  # timed out or cancelled waiting: nothing else holds the channel
            channel.kill()
            raise
        if hello.get("hello") != "orch-agent":
            channel.kill()
            raise ActionFailed(self.host, f"the orch agent greeted with {hello!r}")
        pid = hello.get("pid")
        self.pid = pid if isinstance(pid, int) else None
        log.debug("agent_session", host=self.host, pid=self.pid)
        return None


async def _send_file(host: str, channel: AgentChannel, stream: FileStream) -> None:
    """Exactly ``stream.size`` bytes of the file, in chunks, each written (and so waiting for
    the channel's flow control) before the next is read: the controller holds about one chunk
    however large the file. A file that shrank or grew since its size went into the frame
    header cannot be framed: the call fails, and, being mid-frame, the caller drops the session
    (the agent would refuse the bytes' sha256 anyway)."""
    left = stream.size
    try:
        with stream.path.open("rb") as f:
            while left:
                chunk = await asyncio.to_thread(f.read, min(FileStream.CHUNK, left))
                if not chunk:
                    break
                await channel.write(chunk)
                left -= len(chunk)
            longer = bool(await asyncio.to_thread(f.read, 1))
    except OSError as exc:
        raise ActionFailed(host, f"cannot read {stream.path}: {exc.strerror or exc}") from None
    if left or longer:
        raise ActionFailed(host, f"{stream.path} changed while it was being sent "
                                 f"(expected {stream.size} bytes)")


async def _read_frame(channel: AgentChannel) -> dict[str, Any]:
    (size,) = BODY.unpack(await channel.read_exactly(BODY.size))
    if size > MAX_BODY:
        raise ChannelClosed(f"a frame of {size} bytes: the stream is corrupt")
    body = await channel.read_exactly(size)
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ChannelClosed(f"a frame that is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ChannelClosed("a frame that is not a JSON object")
    return value


def _outcomes(
    host: str, steps: Sequence[AgentStep], answer: Mapping[str, Any]
) -> list[StepOutcome]:
    """The agent's batch answer as one outcome per step (checked, since it crossed the wire)."""
    ran, failed = answer.get("steps"), answer.get("failed")
    valid = (
        isinstance(ran, list)
        and all(isinstance(r, dict) for r in ran)
        and len(ran) <= len(steps)
        and ((failed is None and len(ran) == len(steps)) or failed == len(ran) - 1)
    )
    if not valid:
        raise ActionFailed(host, f"agent batch answered {answer!r}")
    assert isinstance(ran, list)
    outcomes = []
    for i, step in enumerate(steps):
        if i >= len(ran):
            outcomes.append(StepOutcome(step, StepState.NOT_RUN))
        elif i == failed:
            outcomes.append(StepOutcome(step, StepState.FAILED, error=str(ran[i].get("error"))))
        else:
            outcomes.append(StepOutcome(step, StepState.OK, response=ran[i]))
    return outcomes
