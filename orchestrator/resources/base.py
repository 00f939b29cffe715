"""What a resource is: desired state that compares itself with facts and yields steps.

A resource never talks to a host. It reads `HostFacts` (gathered once per host by the agent)
and returns a `Change` only when the host differs from what it wants, so "no change" is
structural: an empty diff has no steps. Steps are typed data, one type per agent op
(`orchestrator.resources.steps`), which is what lets a plan be printed, saved as JSON, compared
and applied exactly later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from orchestrator.facts import FactRequest, HostFacts
from orchestrator.resources.steps import Fetch, Step, step_from_json


class Action(StrEnum):
    """Terraform's verbs. A restart is an update of the running process, shown as `~`."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"

    @property
    def symbol(self) -> str:
        return {"create": "+", "update": "~", "delete": "-"}[self.value]


@dataclass(frozen=True)
class FieldChange:
    """One attribute that differs: what the host has, what the cluster file wants."""

    name: str
    before: Any
    after: Any


@dataclass(frozen=True)
class Change:
    """A resource that differs on one host, why, and the steps that close the gap."""

    resource: str  # stable id, e.g. "file:~/.orch/ring.json"
    action: Action
    fields: tuple[FieldChange, ...]
    steps: tuple[Step, ...]
    diff: str | None = None  # unified diff of file content, shown with --diff
    cleanup: tuple[Step, ...] = ()  # how to remove it later; kept in the managed record

    def to_json(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "action": self.action.value,
            "fields": [{"name": f.name, "before": f.before, "after": f.after} for f in self.fields],
            "steps": [s.to_json() for s in self.steps],
            "diff": self.diff,
            "cleanup": [s.to_json() for s in self.cleanup],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Change:
        return cls(
            resource=raw["resource"],
            action=Action(raw["action"]),
            fields=tuple(FieldChange(f["name"], f["before"], f["after"]) for f in raw["fields"]),
            steps=tuple(step_from_json(s) for s in raw["steps"]),
            diff=raw.get("diff"),
            cleanup=tuple(step_from_json(s) for s in raw.get("cleanup", [])),
        )

    @property
    def fetches(self) -> tuple[Fetch, ...]:
        """Its model-file copies: the steps the sync runs (concurrently, between hosts)."""
        return tuple(s for s in self.steps if isinstance(s, Fetch))


class Resource(Protocol):
    """Desired state of one thing on one host."""

    @property
    def id(self) -> str:
        """Stable across runs: the managed record and saved plans refer to resources by it."""
        ...

    def facts_needed(self) -> FactRequest:
        """What the agent must gather for `diff`; merged across resources into one request."""
        ...

    def diff(self, facts: HostFacts) -> Change | None:
        """None when the host already matches; otherwise what differs and how to converge."""
        ...

    def cleanup(self) -> tuple[Step, ...]:
        """Steps that remove this resource once it is no longer declared."""
        ...


@dataclass(frozen=True)
class Removal:
    """A resource orch put on a host earlier that the cluster file no longer declares."""

    resource: str
    steps: tuple[Step, ...] = field(default=())

    def change(self) -> Change:
        return Change(self.resource, Action.DELETE,
                      (FieldChange("present", True, False),), self.steps)
