"""A kernel setting, applied now and persisted across reboots by a root LaunchDaemon.

macOS forgets `sysctl -w` at reboot (iogpu.wired_limit_mb among them), so the value is also
written into a LaunchDaemon that sets it at load. Both halves are read from facts and repaired
independently: a reboot without the daemon, or a daemon whose value is stale, is drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from orchestrator.facts import FactRequest, FileKind, HostFacts
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.launchd import render_plist
from orchestrator.resources.steps import (
    InstallSystem,
    LaunchdBootout,
    LaunchdBootstrap,
    RemoveSystem,
    Run,
    Step,
    Text,
    Write,
)

DAEMONS_DIR = "/Library/LaunchDaemons"


def boot_plist(label: str, name: str, value: str) -> str:
    """A LaunchDaemon that runs `sysctl -w NAME=VALUE` once at load (no KeepAlive): what makes
    a setting outlive a reboot."""
    return render_plist(label, ["/usr/sbin/sysctl", "-w", f"{name}={value}"],
                        env={}, keep_alive=False, background=False)


@dataclass(frozen=True)
class Sysctl:
    name: str
    value: int
    label: str  # the persisting LaunchDaemon's label
    reset_value: int = 0  # what removing the resource sets (0: the kernel's default limit)
    staging_dir: str = "~/.orch/system"

    @property
    def id(self) -> str:
        return f"sysctl:{self.name}"

    @property
    def daemon_path(self) -> str:
        return f"{DAEMONS_DIR}/{self.label}.plist"

    @property
    def plist(self) -> str:
        return boot_plist(self.label, self.name, str(self.value))

    def facts_needed(self) -> FactRequest:
        # The daemon's plist, not its launchd state: it runs once at boot and exits, so
        # whether it is loaded now says nothing about the value (read with sysctl).
        return FactRequest(files=frozenset({self.daemon_path}), sysctl=frozenset({self.name}),
                           sudo=True)

    def diff(self, facts: HostFacts) -> Change | None:
        fields: list[FieldChange] = []
        steps: list[Step] = []
        current = facts.sysctl.get(self.name)
        if current != str(self.value):
            fields.append(FieldChange("value", current, str(self.value)))
            steps.append(Run(("sudo", "-n", "sysctl", "-w", f"{self.name}={self.value}")))
        daemon = facts.file(self.daemon_path)
        sha = hashlib.sha256(self.plist.encode()).hexdigest()
        if daemon.kind is not FileKind.FILE or daemon.sha256 != sha or daemon.mode != 0o644:
            fields.append(FieldChange("persisted by", daemon.sha256, sha))
            staged = f"{self.staging_dir}/{self.label}.plist"
            steps += [
                Write(staged, 0o644, Text(self.plist)),
                InstallSystem(staged, self.daemon_path, 0o644),
                LaunchdBootstrap("system", self.label, self.daemon_path),
            ]
        if not fields:
            return None
        action = Action.CREATE if daemon.kind is FileKind.MISSING else Action.UPDATE
        return Change(self.id, action, tuple(fields), tuple(steps), cleanup=self.cleanup())

    def cleanup(self) -> tuple[Step, ...]:
        return (
            LaunchdBootout("system", self.label),
            RemoveSystem(self.daemon_path),
            Run(("sudo", "-n", "sysctl", "-w", f"{self.name}={self.reset_value}")),
        )
