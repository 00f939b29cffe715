"""The executor's contract: what a host is, what a command returns, what a connection can do.

Everything above the executor (facts, resources, plan, apply) depends only on these names, so a
resource can be tested against `LocalConnection` and run for real over SSH without change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeAlias, runtime_checkable


@dataclass(frozen=True)
class Target:
    """One host as the inventory names it.

    `address` may be an alias from ``~/.ssh/config``; `port` 22 (the default) leaves the config's
    ``Port`` in force, and `user`/`identity_file` left as None fall back to the config too.
    """

    name: str
    address: str
    port: int = 22
    user: str | None = None
    identity_file: Path | None = None
    # From the inventory's `ssh:` block; SSHOptions (the command line) win when they are set.
    known_hosts: Path | None = None
    connect_timeout: float | None = None
    proxy_jump: str | None = None  # "[user@]host[:port]": reached through this host first


@dataclass(frozen=True)
class CommandResult:
    """A finished command. A signal N is reported as exit status 128+N, as a shell would."""

    exit_status: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class SSHOptions:
    """How the executor connects; defaults are safe (strict host keys) and patient enough for LANs.

    `known_hosts` None means ``~/.ssh/known_hosts`` (or ``UserKnownHostsFile`` from the SSH
    config); `ssh_config` None means ``~/.ssh/config`` when it exists. `accept_new_host_keys`
    records an unknown host's key (OpenSSH's ``StrictHostKeyChecking=accept-new``) but still
    refuses a key that differs from a recorded one. `known_hosts` and `connect_timeout` are the
    command line's: when set they win over the target's (the inventory's `ssh:` block).
    """

    connect_timeout: float | None = None  # None: the target's (inventory's), else 10 s
    command_timeout: float = 600
    connect_retries: int = 2
    known_hosts: Path | None = None
    accept_new_host_keys: bool = False
    concurrency: int = 10
    agent_python: str = "python3"
    ssh_config: Path | None = None
    install_agent: bool = True  # False: never write the agent to hosts (read-only runs)


@dataclass(frozen=True)
class FileStream:
    """A controller file as an agent op's stdin, sent in chunks of `CHUNK` bytes: a multi-GB
    file (a `copy:` task's, a wheel) never sits whole in the controller's memory, and the agent
    reads its payload in chunks too. `size` is fixed when the frame header is sent; a file that
    changes size meanwhile fails the call (the agent would also refuse its sha256)."""

    path: Path
    size: int

    CHUNK: ClassVar[int] = 1 << 20

    @classmethod
    def of(cls, path: Path) -> FileStream:
        return cls(path, path.stat().st_size)

    def read_all(self) -> bytes:
        """The whole file, for the few paths that cannot stream (one-shot agent calls)."""
        return self.path.read_bytes()


Stdin: TypeAlias = bytes | FileStream | None


@dataclass(frozen=True)
class AgentStep:
    """One step of `Connection.agent_batch`: an agent op, its JSON request, and its stdin
    (the bytes ``write`` stores), which travels as raw bytes in the batch's frame."""

    op: str
    request: Mapping[str, Any] = field(default_factory=dict)
    stdin: bytes = b""


class StepState(enum.Enum):
    """What became of one step of a batch."""

    OK = "ok"  # ran and answered; `response` is its answer
    FAILED = "failed"  # ran and failed; `error` is the agent's message. Later steps did not run
    NOT_RUN = "not_run"  # an earlier step failed


@dataclass(frozen=True)
class StepOutcome:
    """A batch step and what became of it (`response` only when OK, `error` only when FAILED)."""

    step: AgentStep
    state: StepState
    response: Mapping[str, Any] | None = None
    error: str | None = None


@runtime_checkable
class Connection(Protocol):
    """A live session with one host. Calls on one connection run in the order they are awaited.

    `round_trips` counts every exec channel opened: one per `run`; the agent session (opened at
    the first `agent` call, reused by every later one); one per `serve`/`fetch`, which run on
    channels of their own; and one per upload of the agent. Tests and benchmarks assert on it.
    """

    name: str
    round_trips: int

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run argv on the host (quoted with shlex.join, never pasted into a shell string).

        A non-zero exit is a result, not an error; a lost connection raises HostUnreachable and a
        timeout raises ActionFailed.
        """
        ...

    async def agent(
        self, op: str, request: Mapping[str, Any], *, stdin: Stdin = None
    ) -> dict[str, Any]:
        """Run one agent op and return its JSON response; an agent error raises ActionFailed.
        A `FileStream` stdin is sent in chunks (see there).

        Every op but ``serve`` and ``fetch`` goes through the connection's agent session: one
        agent process per host per run, so on a converged host a whole run costs one exec
        channel. The agent is uploaded first only when the host lacks this exact version.
        """
        ...

    async def agent_batch(self, steps: Sequence[AgentStep]) -> list[StepOutcome]:
        """Run `steps` in order in one agent request, stopping at the first that fails.

        Returns one outcome per step, in order: OK ones, then (if a step failed) one FAILED and
        the rest NOT_RUN. A failed step is an outcome, not an exception, so the caller can
        account for the steps that did change the host. The connection failing raises, as for
        `agent` (HostUnreachable, or ActionFailed for a timeout or an agent that died).
        """
        ...

    async def close(self) -> None:
        """End the agent session cleanly, then close the connection; safe to call twice."""
        ...
