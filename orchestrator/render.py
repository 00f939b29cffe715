"""Views of a plan and of an apply report: text for people, JSON for machines. No logic here."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.plan import Plan
from orchestrator.resources.base import Action, Change
from orchestrator.run.apply import ApplyReport, HostStatus
from orchestrator.run.report import TransferSummary


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
    """Terraform-like: hosts sorted, no-op hosts hidden, a summary line at the end; first,
    one preflight line per serving node (what the refusals checked)."""
    lines = preflight_lines(plan)
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


def preflight_lines(plan: Plan) -> list[str]:
    """``Preflight:`` and a line per serving node, then a blank line; nothing without nodes."""
    if not plan.preflight:
        return []
    return ["Preflight:", *(f"  {p.line()}" for p in plan.preflight), ""]


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
    if report.transfers:
        lines.append(summary_text(report.transfers))
    if report.lock:
        left = report.lock.not_released
        lines.append(f"Lock: NOT released on {', '.join(left)} "
                     f"({'; '.join(f'{h}: {why}' for h, why in left.items())}). "
                     f"Until it is removed every apply is refused; once reachable: "
                     f"{report.lock.unlock}")
    if report.health:
        lines.append(("Ring: serving at " if report.health.ok else "Ring: NOT serving at ")
                     + f"{report.health.api_url}. {report.health.message}")
    return "\n".join(lines)


def summary_text(summary: TransferSummary) -> str:
    """One line for the apply report: what moved, and from where."""
    b = summary["bytes"]
    text = (f"Model files: {summary['files']} fetched — {_size(b['hub'])} from the Hub, "
            f"{_size(b['lan'])} over the LAN, {_size(b['local'])} from the controller; "
            f"{_size(b['resumed'])} resumed, {_size(b['refetched'])} re-fetched.")
    if summary["failed"]:
        text += f" {summary['failed']} failed."
    return text


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"



def report_json(report: ApplyReport) -> dict[str, Any]:
    return {"hosts": [{"host": o.host, "status": o.status.value, "applied": list(o.applied),
                       "error": o.error} for o in report.outcomes],
            **({"transfers": report.transfers} if report.transfers is not None else {}),
            **({"lock": report.lock.to_json()} if report.lock is not None else {}),
            **({"health": report.health.to_json()} if report.health is not None else {})}
