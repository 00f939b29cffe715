"""A user's `sysctl:` task: a kernel setting read in the facts call, written only when it differs.

Why not a `command` with an `unless` guard: the guard is a process tree per no-op on every host
(`sh`, `sysctl`), while the agent's facts call already runs `sysctl` once for the hardware
facts; the name joins that run, so a converged setting costs no process of its own.

`persist`: macOS forgets `sysctl -w` at reboot. Left false (the default), the setting lasts
until then, as `sysctl -w` (and pyinfra's `server.sysctl`) does, needs only a sudoers rule for
that one `sysctl -w`, and a rebooted Mac shows the setting as drift in `orch plan`. True adds a
root LaunchDaemon that sets it again at every boot (as orch's own wired limit does,
`resources.sysctl`), installed with the sudo rights orch's LaunchDaemons need. The two are
separate resource ids, so switching `persist` off removes the daemon through the managed
record. Neither resets the value when the task is removed: orch does not know what it was
before (a reboot does).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from orchestrator.facts import FactRequest, FileKind, HostFacts
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import (
    InstallSystem,
    LaunchdBootout,
    Remove,
    RemoveSystem,
    Run,
    Step,
    Text,
    Write,
)
from orchestrator.resources.sysctl import DAEMONS_DIR, boot_plist

LABEL_PREFIX = "com.orch.sysctl."  # com.orch.*: within the sudoers line orch prints


@dataclass(frozen=True)
class SysctlSetting:
    name: str
    value: str  # what `sysctl -n NAME` prints when it is set
    persist: bool = False
    staging_dir: str = "~/.orch/system"  # persist: the daemon's plist is staged here first

    @property
    def id(self) -> str:
        return f"sysctl-persisted:{self.name}" if self.persist else f"sysctl:{self.name}"

    @property
    def label(self) -> str:
        return LABEL_PREFIX + self.name

    @property
    def daemon_path(self) -> str:
        return f"{DAEMONS_DIR}/{self.label}.plist"

    @property
    def plist(self) -> str:
        return boot_plist(self.label, self.name, self.value)

    @property
    def staged(self) -> str:
        return f"{self.staging_dir}/{self.label}.plist"

    def set_step(self) -> Run:
        return Run(("sudo", "-n", "sysctl", "-w", f"{self.name}={self.value}"))

    def facts_needed(self) -> FactRequest:
        if not self.persist:  # the value alone: one more name in the facts call's sysctl run
            return FactRequest(sysctl=frozenset({self.name}))
        return FactRequest(sysctl=frozenset({self.name}), files=frozenset({self.daemon_path}),
                           sudo=True)

    def diff(self, facts: HostFacts) -> Change | None:
        fields: list[FieldChange] = []
        steps: list[Step] = []
        current = facts.sysctl.get(self.name)
        if current != self.value:
            fields.append(FieldChange("value", current, self.value))
            steps.append(self.set_step())
        daemon_missing = False
        if self.persist:
            daemon = facts.file(self.daemon_path)
            daemon_missing = daemon.kind is FileKind.MISSING
            sha = hashlib.sha256(self.plist.encode()).hexdigest()
            if daemon.kind is not FileKind.FILE or daemon.sha256 != sha or daemon.mode != 0o644:
                fields.append(FieldChange("persisted by", daemon.sha256, sha))
                staged = self.staged
                # Not bootstrapped: launchd loads /Library/LaunchDaemons at boot, which is
                # when it is needed; the value itself is set by the step above.
                steps += [Write(staged, 0o644, Text(self.plist)),
                          InstallSystem(staged, self.daemon_path, 0o644)]
        if not fields:
            return None
        # `~`: a kernel setting always exists; `+` only for the daemon a persist adds.
        action = Action.CREATE if daemon_missing else Action.UPDATE
        return Change(self.id, action, tuple(fields), tuple(steps), cleanup=self.cleanup())

    def cleanup(self) -> tuple[Step, ...]:
        if not self.persist:
            return ()  # the value stays until reboot: orch does not know the one before
        return (LaunchdBootout("system", self.label), RemoveSystem(self.daemon_path),
                Remove(self.staged))
