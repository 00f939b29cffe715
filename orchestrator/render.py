"""Views of a plan and of an apply report: text for people, JSON for machines. No logic here."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.plan import Plan
from orchestrator.resources.base import Action, Change
from orchestrator.run.apply import ApplyReport, HostStatus
from orchestrator.run.transfers import summary_text


def _value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256:{value[:12]}"
    return json.dumps(value) if not isinstance(value, str) else value


def change_lines(change: Change, *, show_diff: bool) -> list[str]:
    lines = [f"  {change.action.symbol} {change.resource}"]
    for f in change.fields:
        lines.append(f"      {f.name}: {_value(f.before)} → {_value(f.after)}")
    if show_diff and change.diff:
        lines.extend("      " + line for line in change.diff.rstrip("\n").splitlines())
    return lines


def plan_text(plan: Plan, *, show_diff: bool = False) -> str:
    """Terraform-like: hosts sorted, no-op hosts hidden, a summary line at the end."""
    lines: list[str] = []
    for host_plan in sorted(plan.hosts, key=lambda h: h.host):
        if not host_plan.changes:
            continue
        lines.append(f"{host_plan.host}:")
        for change in host_plan.changes:
            lines.extend(change_lines(change, show_diff=show_diff))
        lines.append("")
    for host, reason in sorted(plan.unreachable.items()):
        lines.append(f"{host}: UNREACHABLE: {reason}")
    if plan.unreachable:
        lines.append("")
    lines.append(summary_line(plan))
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    """The last line, which a log reader trusts: it never says "No changes." of a cluster
    whose hosts could not be asked (the lines above it give each host's reason)."""
    counts = plan.counts()
    hosts = len(plan.hosts)
    if not plan.hosts and plan.unreachable:
        n = len(plan.unreachable)
        return (f"No host could be reached ({n} unreachable: "
                f"{', '.join(sorted(plan.unreachable))}): nothing was planned.")
    if not plan.has_changes:
        text = f"No changes. {hosts} host{'s' if hosts != 1 else ''} match the cluster file."
    else:
        changed_hosts = sum(1 for h in plan.hosts if h.changes)
        text = (f"Plan: {counts[Action.CREATE]} to add, {counts[Action.UPDATE]} to change, "
                f"{counts[Action.DELETE]} to destroy on {changed_hosts} of {hosts} hosts.")
    if plan.unreachable:
        text += f" {len(plan.unreachable)} unreachable: {', '.join(sorted(plan.unreachable))}."
    return text


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2, sort_keys=True)


def report_text(report: ApplyReport) -> str:
    lines = []
    for outcome in report.outcomes:
        line = f"{outcome.host}: {outcome.status.value}"
        if outcome.applied:
            line += f" ({len(outcome.applied)} changed)"
        if outcome.error:
            line += f": {outcome.error}"
        lines.append(line)
    counts = {s: len(report.by_status(s)) for s in HostStatus}
    lines.append("Apply: " + ", ".join(f"{n} {s.value}" for s, n in counts.items()) + ".")
    transfers = report.extra.get("transfers")
    if transfers:
        lines.append(summary_text(transfers))
    lock = report.extra.get("lock")
    if lock:
        left = lock["not_released"]
        lines.append(f"Lock: NOT released on {', '.join(left)} "
                     f"({'; '.join(f'{h}: {why}' for h, why in left.items())}). "
                     f"Until it is removed every apply is refused; once reachable: "
                     f"{lock['unlock']}")
    health = report.extra.get("health")
    if health:
        lines.append(("Ring: serving at " if health["ok"] else "Ring: NOT serving at ")
                     + f"{health['api_url']}. {health['message']}")
    return "\n".join(lines)


def report_json(report: ApplyReport) -> dict[str, Any]:
    return {"hosts": [{"host": o.host, "status": o.status.value, "applied": list(o.applied),
                       "error": o.error} for o in report.outcomes],
            **dict(report.extra)}
