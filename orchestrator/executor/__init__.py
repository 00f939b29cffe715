"""The executor: the only code that talks to hosts.

`SSHExecutor` opens one asyncssh connection per host (`Connection`), and `for_each_host` runs
per-host work concurrently with failures recorded per host. Agent calls on a connection share
one agent process (see session.py); `Connection.agent_batch` runs `AgentStep`s in one request.
Backend errors leave this package as orchestrator.errors types. Tests run the same protocol on
this machine with `fake.LocalConnection`, which orch itself never imports.
"""

from __future__ import annotations

from .base import (
    AgentStep,
    CommandResult,
    Connection,
    FileStream,
    SSHOptions,
    Stdin,
    StepOutcome,
    StepState,
    Target,
)
from .pool import for_each_host
from .ssh import SSHConnection, SSHExecutor

__all__ = [
    "AgentStep",
    "CommandResult",
    "Connection",
    "FileStream",
    "SSHConnection",
    "SSHExecutor",
    "SSHOptions",
    "Stdin",
    "StepOutcome",
    "StepState",
    "Target",
    "for_each_host",
]
