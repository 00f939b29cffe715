"""The executor: the only code that talks to hosts.

`SSHExecutor` opens one asyncssh connection per host (`Connection`), `LocalConnection` runs the
same protocol on this machine for tests, and `for_each_host` runs per-host work concurrently
with failures recorded per host. Backend errors leave this package as orchestrator.errors types.
"""

from __future__ import annotations

from .base import CommandResult, Connection, SSHOptions, Target
from .fake import LocalConnection
from .pool import for_each_host
from .ssh import SSHConnection, SSHExecutor

__all__ = [
    "CommandResult",
    "Connection",
    "LocalConnection",
    "SSHConnection",
    "SSHExecutor",
    "SSHOptions",
    "Target",
    "for_each_host",
]
