"""Every error orch raises on purpose, in one tree, so the CLI maps them to exit codes in one place.

    OrchError                       base; never raised itself
    ├── ConfigError                 bad cluster/inventory/playbook input (exit 1); holds Diagnostics
    ├── ModelError                  model metadata unreadable or incomplete (exit 1)
    ├── PlacementError              the model does not fit the chosen nodes (exit 1)
    ├── PlanError                   a saved plan cannot be applied (stale, wrong cluster) (exit 1)
    ├── LockHeld                    another run holds the cluster lock (exit 4)
    ├── ServiceError                the ring's API gave no usable answer (exit 1)
    └── HostError(host)             something failed on one host
        ├── HostUnreachable         could not connect / authenticate (exit 3)
        ├── HostKeyRejected         unknown or changed host key (exit 3)
        └── ActionFailed            a command or transfer failed on a reachable host (exit 1)

Backend exceptions (asyncssh, OSError) are translated into this tree at the executor edge;
nothing above the executor catches backend types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """The process exit codes, the same for every command (see DESIGN.md)."""

    OK = 0
    ERROR = 1
    CHANGES_PENDING = 2
    UNREACHABLE = 3
    LOCK_HELD = 4


class OrchError(Exception):
    """Base of every error the CLI reports as a message instead of a traceback."""

    exit_code: ExitCode = ExitCode.ERROR


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem in a file the user wrote, pointing at the key or value that is wrong."""

    file: Path
    line: int  # 1-based
    column: int  # 1-based
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.file}:{self.line}:{self.column}: {prefix}{self.message}"


class ConfigError(OrchError):
    """Invalid input files. Carries every diagnostic found, not just the first."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = sorted(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class ModelError(OrchError):
    """The model's metadata cannot be read, or names files that are not there."""


class ServiceError(OrchError):
    """The serving ring's OpenAI-compatible API did not answer as it should."""


class PlacementError(OrchError):
    """The model does not fit; the message carries the numbers and the smallest fix."""


class PlanError(OrchError):
    """A saved plan cannot be applied as it stands."""


class LockHeld(OrchError):
    """Another run holds the cluster lock."""

    exit_code = ExitCode.LOCK_HELD


class HostError(OrchError):
    """A failure tied to one host; the run records it and carries on with the others."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class HostUnreachable(HostError):
    exit_code = ExitCode.UNREACHABLE


class HostKeyRejected(HostUnreachable):
    """The host's key is unknown or changed; says how to accept it."""


class ActionFailed(HostError):
    """A command or transfer failed on a host that was reachable."""


class NoAgentPython(ActionFailed):
    """The host has no Python to run orch's agent (none on PATH, or the Command Line Tools'
    stub): a refusal to plan (exit 1), not an unreachable host."""
