"""Directories and files with exact content and mode, written atomically by the agent."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from orchestrator.facts import FactRequest, FileKind, HostFacts
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import Mkdir, Remove, Rmdir, Step, Text, Write


@dataclass(frozen=True)
class Directory:
    path: str
    mode: int = 0o755

    @property
    def id(self) -> str:
        return f"directory:{self.path}"

    def facts_needed(self) -> FactRequest:
        return FactRequest(files=frozenset({self.path}))

    def diff(self, facts: HostFacts) -> Change | None:
        current = facts.file(self.path)
        step = Mkdir(self.path, self.mode)
        if current.kind is FileKind.MISSING:
            return Change(self.id, Action.CREATE, (FieldChange("kind", "missing", "dir"),),
                          (step,), cleanup=self.cleanup())
        if current.kind is not FileKind.DIR:
            return Change(self.id, Action.UPDATE,
                          (FieldChange("kind", current.kind.value, "dir"),),
                          (Remove(self.path), step), cleanup=self.cleanup())
        if current.mode != self.mode:
            return Change(self.id, Action.UPDATE,
                          (FieldChange("mode", _octal(current.mode), _octal(self.mode)),),
                          (step,), cleanup=self.cleanup())
        return None

    def cleanup(self) -> tuple[Step, ...]:
        # Only an empty directory is removed: files inside may be the user's, not orch's.
        return (Rmdir(self.path),)


@dataclass(frozen=True)
class File:
    """A file whose whole content orch owns (rendered templates, plists, hostfiles)."""

    path: str
    content: str
    mode: int = 0o644

    @property
    def id(self) -> str:
        return f"file:{self.path}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()

    def facts_needed(self) -> FactRequest:
        return FactRequest(files=frozenset({self.path}))

    def diff(self, facts: HostFacts) -> Change | None:
        current = facts.file(self.path)
        fields: list[FieldChange] = []
        if current.kind is FileKind.MISSING:
            action = Action.CREATE
            fields.append(FieldChange("sha256", None, self.sha256))
        else:
            action = Action.UPDATE
            if current.kind is not FileKind.FILE:
                fields.append(FieldChange("kind", current.kind.value, "file"))
            elif current.sha256 != self.sha256:
                fields.append(FieldChange("sha256", current.sha256, self.sha256))
            if current.mode != self.mode:
                fields.append(FieldChange("mode", _octal(current.mode), _octal(self.mode)))
        if not fields:
            return None
        write = Write(self.path, self.mode, Text(self.content))
        return Change(self.id, action, tuple(fields), (write,), cleanup=self.cleanup())

    def cleanup(self) -> tuple[Step, ...]:
        return (Remove(self.path),)


def _octal(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:04o}"
