"""The plan: per host, what differs from the cluster file and the steps that close it. Pure data.

`diff_host` is a pure function of (desired resources, facts): no SSH, no clock, no globals, so a
plan can be built in a test from a facts fixture, printed, saved as JSON, compared with another
plan, and applied later exactly as saved.

What orch put on a host is remembered there (the managed record,
`~/<runtime.dir>/managed/<cluster>.json`), with the steps that remove each thing. A resource
that is in the record but no longer declared (a task deleted from the playbook, a node drained)
becomes a `-` change, so apply cleans it up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.facts import FactRequest, HostFacts
from orchestrator.plan.readiness import NodePreflight
from orchestrator.resources.base import Action, Change, FieldChange, Resource
from orchestrator.resources.steps import step_from_json

# 2: typed steps, ``{"op": OP, ...fields}`` (1: ``{"op": OP, "request": {...}}``). Saved plans
# of another format are refused; managed records of format 1 are still read (`step_from_json`).
PLAN_FORMAT = 2
RECORD_ID = "orch:managed-record"


def fact_request(resources: Sequence[Resource], cluster: str,
                 state_dir: str = ".orch") -> FactRequest:
    """Everything the host's resources need, and the cluster's managed record (under its
    `runtime.dir`): one agent call."""
    return FactRequest(cluster=cluster, state_dir=state_dir).merge(
        *(r.facts_needed() for r in resources))


def record_for(cluster: str, resources: Sequence[Resource]) -> dict[str, Any]:
    """The managed record a host should hold once it matches `resources`."""
    return {
        "format": PLAN_FORMAT,
        "cluster": cluster,
        # A list, not a mapping: removal runs in reverse order of creation, and JSON objects
        # do not keep order through every writer.
        "resources": [{"id": r.id, "cleanup": [s.to_json() for s in r.cleanup()]}
                      for r in resources],
    }


def widened_record(record: Mapping[str, Any], changes: Sequence[Change]) -> dict[str, Any]:
    """`record` plus what `changes` leave owed if they are not (all) carried out: a removal
    keeps its entry (with the steps that remove it), anything else is listed as ``pending``.

    A run writes this before its first change (`orchestrator.run.apply`): if it is cut or
    fails, the next plan still removes what was to go, and sees what it had set out to change
    (`HostFacts.pending`) even where the host cannot show it (a launchd job reloaded after its
    plist changed runs what it was loaded with, which launchctl does not tell). A plan
    narrowed with `Plan.only` ends with it for the same reason."""
    widened = dict(record)
    resources = list(widened.get("resources", []))
    listed = {entry["id"] for entry in resources}
    # Removals are listed newest first in a plan; kept in creation order in the record.
    removed = [{"id": c.resource, "cleanup": [s.to_json() for s in c.steps]}
               for c in changes if c.action is Action.DELETE and c.resource not in listed]
    widened["resources"] = list(reversed(removed)) + resources
    pending = list(dict.fromkeys([*widened.get("pending", ()),
                                  *(c.resource for c in changes if c.action is not Action.DELETE
                                    and c.resource != RECORD_ID)]))
    if pending:
        widened["pending"] = pending
    return widened


@dataclass(frozen=True)
class HostPlan:
    host: str
    changes: tuple[Change, ...]
    record: Mapping[str, Any]  # the managed record to write once the changes are applied

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "changes": [c.to_json() for c in self.changes],
                "record": dict(self.record)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HostPlan:
        return cls(raw["host"], tuple(Change.from_json(c) for c in raw["changes"]),
                   dict(raw["record"]))


def diff_host(cluster: str, resources: Sequence[Resource], facts: HostFacts) -> HostPlan:
    """Compare one host with what it should be. Removals come first, newest record entry first,
    so a job is booted out before the files it was using are removed."""
    ids = [r.id for r in resources]
    if len(ids) != len(set(ids)):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{facts.host}: resources declared twice: {duplicates}")
    previous = facts.managed.get("resources", []) if facts.managed else []
    declared = set(ids)
    removals = [
        Change(entry["id"], Action.DELETE, (FieldChange("declared", True, False),),
               tuple(step_from_json(s) for s in entry["cleanup"]))
        for entry in reversed(previous) if entry["id"] not in declared
    ]
    changes = [c for c in (r.diff(facts) for r in resources) if c is not None]
    record = record_for(cluster, resources)
    if not removals and not changes and dict(facts.managed) != record:
        # Nothing on the host differs but the bookkeeping does (e.g. written by an older orch):
        # say so, since apply will write it.
        changes.append(Change(RECORD_ID, Action.UPDATE, (FieldChange("record", "stale",
                                                                     "current"),), ()))
    return HostPlan(facts.host, tuple(removals + changes), record)


@dataclass(frozen=True)
class Plan:
    """What apply would do to every host, and which hosts could not be asked."""

    cluster: str
    cluster_file: str
    hosts: tuple[HostPlan, ...]
    unreachable: Mapping[str, str] = field(default_factory=dict)  # host -> reason
    # Each serving node's preflight facts, as the refusals saw them: shown, never compared
    # (`comparable`), since free disk moves without changing what apply would do.
    preflight: tuple[NodePreflight, ...] = ()

    def only(self, keep: Callable[[str, Change], bool]) -> Plan:
        """The plan restricted to the changes `keep(host, change)` accepts. Each host's record
        is then what it holds once just those are applied: the changes left out stay owed
        (`widened_record`), so the next plan still makes them."""
        hosts = []
        for h in self.hosts:
            kept: list[Change] = []
            left: list[Change] = []
            for change in h.changes:
                (kept if keep(h.host, change) else left).append(change)
            hosts.append(replace(h, changes=tuple(kept), record=widened_record(h.record, left)))
        return replace(self, hosts=tuple(hosts))

    @property
    def changes(self) -> list[tuple[str, Change]]:
        return [(h.host, c) for h in self.hosts for c in h.changes]

    def counts(self) -> dict[Action, int]:
        result = dict.fromkeys(Action, 0)
        for _, change in self.changes:
            result[change.action] += 1
        return result

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def comparable(self) -> list[dict[str, Any]]:
        """What must be equal for a saved plan to still be the plan: changes, not diff text."""
        return [{"host": h.host, "changes": [
            {k: v for k, v in c.to_json().items() if k != "diff"} for c in h.changes]}
            for h in sorted(self.hosts, key=lambda h: h.host)]

    def to_json(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "format": PLAN_FORMAT,
            "cluster": self.cluster,
            "cluster_file": self.cluster_file,
            "summary": {"add": counts[Action.CREATE], "change": counts[Action.UPDATE],
                        "destroy": counts[Action.DELETE], "unreachable": len(self.unreachable)},
            "hosts": [h.to_json() for h in sorted(self.hosts, key=lambda h: h.host)],
            "unreachable": dict(sorted(self.unreachable.items())),
            **({"preflight": {p.host: p.to_json() for p in self.preflight}}
               if self.preflight else {}),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Plan:
        if raw.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {raw.get('format')!r}, this orch reads format "
                             f"{PLAN_FORMAT}: make the plan again")
        return cls(raw["cluster"], raw["cluster_file"],
                   tuple(HostPlan.from_json(h) for h in raw["hosts"]),
                   dict(raw.get("unreachable", {})),
                   tuple(NodePreflight.from_json(host, p)
                         for host, p in sorted(raw.get("preflight", {}).items())))
