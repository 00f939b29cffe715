"""Each serving node's preflight facts, one line per node, for `orch plan` and `orch status`.

The refusals in `orchestrator.plan.preflight` judge these facts and stop a plan that cannot
work; this is what they saw when they let it through (or, in `orch status`, what a node looks
like now): the macOS version, the Python chosen for the venv, whether ``sudo -n`` runs orch's
root commands, and the free disk on the model directory's volume beside the bytes that node's
placement still needs there. All of it comes from the one facts call the plan makes anyway.

Plain data with its own JSON and text forms, so the plan's two renderers and the status views
show the same thing. It is not part of what makes a saved plan stale (`Plan.comparable`): free
disk changes by the minute without changing what apply would do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.facts import HostFacts, Interpreter
from orchestrator.resources.model_files import ModelFiles

__all__ = ["NodePreflight", "node_preflight"]


@dataclass(frozen=True)
class NodePreflight:
    """What one serving node is, as preflight sees it; None: not known or not asked."""

    host: str
    macos: str | None = None  # `sw_vers -productVersion`
    python: str | None = None  # the venv's interpreter's path
    python_version: str | None = None
    sudo: bool | None = None  # `sudo -n` runs orch's root commands; None: not needed here
    disk_needed: int | None = None  # bytes of this node's model files it does not hold yet
    disk_placed: int | None = None  # bytes of every model file this node's placement needs
    disk_free: int | None = None  # free bytes on the volume holding the model directory
    volume: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "host"}

    @classmethod
    def from_json(cls, host: str, raw: Mapping[str, Any]) -> NodePreflight:
        return cls(host, **raw)

    def line(self) -> str:
        """``mac1: macOS 15.3 · Python 3.12.4 (/opt/homebrew/bin/python3.12) · sudo -n ok ·
        disk 1.2 GB to fetch (4.5 GB placed), 300.0 GB free``."""
        python = "Python -"
        if self.python is not None:
            python = f"Python {self.python_version or '?'} ({self.python})"
        sudo = {None: "sudo -n not needed", True: "sudo -n ok",
                False: "sudo -n would prompt"}[self.sudo]
        parts = [f"macOS {self.macos or '-'}", python, sudo]
        if self.disk_needed is not None and self.disk_free is not None:
            placed = f" ({size(self.disk_placed)} placed)" if self.disk_placed is not None else ""
            parts.append(f"disk {size(self.disk_needed)} to fetch{placed}, "
                         f"{size(self.disk_free)} free")
        return f"{self.host}: " + " · ".join(parts)


def size(n: int | None) -> str:
    """Decimal units, as Finder and ``df -H`` show disks (MB below a gigabyte)."""
    if n is None:
        return "-"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def node_preflight(facts: HostFacts, python: Interpreter | None,
                   model_files: ModelFiles | None) -> NodePreflight:
    """A serving node's preflight from its facts, its chosen interpreter and its model files."""
    needed = placed = free = None
    volume = None
    if model_files is not None and model_files.directory in facts.disk:
        disk = facts.disk[model_files.directory]
        needed = model_files.bytes_to_fetch(facts)
        placed = model_files.manifest.bytes_of(model_files.needed)
        free, volume = disk.free_bytes, disk.volume
    return NodePreflight(
        host=facts.host, macos=facts.macos_version,
        python=python.path if python is not None else None,
        python_version=python.version if python is not None else None,
        sudo=facts.sudo, disk_needed=needed, disk_placed=placed, disk_free=free,
        volume=volume)
