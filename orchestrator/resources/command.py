"""A user's own command task, idempotent through `creates` / `unless` guards (as in Ansible)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from orchestrator.facts import FactRequest, FileKind, Guard, HostFacts
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import Run, Step


@dataclass(frozen=True)
class Command:
    """Runs `argv` unless a guard says it is done. Unguarded, it runs on every apply."""

    name: str
    argv: tuple[str, ...]
    creates: str | None = None
    unless: tuple[str, ...] | None = None

    @property
    def id(self) -> str:
        return f"command:{self.name}"

    @property
    def _guard(self) -> Guard | None:
        if self.unless is None:
            return None
        digest = hashlib.sha256("\0".join(self.unless).encode()).hexdigest()[:16]
        return Guard(f"unless-{digest}", self.unless)

    def facts_needed(self) -> FactRequest:
        guard = self._guard
        return FactRequest(files=frozenset({self.creates}) if self.creates else frozenset(),
                           guards=frozenset({guard}) if guard else frozenset())

    def diff(self, facts: HostFacts) -> Change | None:
        fields: list[FieldChange] = []
        if self.creates is not None:
            if facts.file(self.creates).kind is not FileKind.MISSING:
                return None
            fields.append(FieldChange("creates", "missing", self.creates))
        guard = self._guard
        if guard is not None:
            status = facts.guards[guard.id]
            if status == 0:
                return None
            fields.append(FieldChange("unless", f"exit {status}", "exit 0"))
        if not fields:
            fields.append(FieldChange("guard", None, "none: runs on every apply"))
        step = Run(self.argv, creates=self.creates, unless=self.unless or None)
        return Change(self.id, Action.CREATE, tuple(fields), (step,))

    def cleanup(self) -> tuple[Step, ...]:
        return ()  # what a command did is the user's to undo; orch only forgets it
