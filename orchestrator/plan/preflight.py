"""Preflight: refusals before any change, each from facts the plan's one call brings.

* a node with no Python the venv can use (`check_python`), or none to run the agent at all;
* a node whose model directory's volume lacks the bytes its placement needs (`check_disk`);
* a plan that needs root on a Mac where ``sudo -n`` would prompt (`check_sudo`).

What they saw on each serving node is kept in the plan (`with_preflight`), one line per node.

orch never runs as root; what must be root's (LaunchDaemons, the GPU wired limit) goes through
``sudo -n``, which fails instead of prompting. Without a NOPASSWD rule an apply would stop
half-way, after the files were written and before the job was loaded; asking first (the agent's
``sudo`` fact, in the facts call the plan needs anyway) turns that into a refusal before any
change, with the one sudoers line that allows exactly the commands orch runs as root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from orchestrator.errors import HostError, NoAgentPython, PlanError
from orchestrator.facts import HostFacts, Interpreter
from orchestrator.plan.core import Plan
from orchestrator.plan.readiness import NodePreflight, node_preflight, size
from orchestrator.resources.base import Resource
from orchestrator.resources.interpreter import chosen_pythons
from orchestrator.resources.model_files import ModelFiles
from orchestrator.resources.steps import (
    InstallSystem,
    LaunchdBootout,
    LaunchdBootstrap,
    LaunchdKickstart,
    RemoveSystem,
    Run,
    Step,
)

__all__ = ["check_disk", "check_python", "check_sudo", "needs_root", "preflights",
           "sudoers_line", "with_preflight"]

REFUSED = "nothing was changed: "


def check_python(facts: Mapping[str, HostFacts | HostError], nodes: Sequence[str],
                 wanted: str) -> dict[str, Interpreter]:
    """Each serving node's interpreter for the venv; PlanError (exit 1) naming every node
    that has none the pins accept, or no Python to run orch's agent at all."""
    refused = [str(f) for _, f in sorted(facts.items()) if isinstance(f, NoAgentPython)]
    try:
        chosen = chosen_pythons(facts, nodes, wanted)
    except PlanError as exc:
        refused.append(str(exc).removeprefix(REFUSED))
        chosen = {}
    if refused:
        raise PlanError(REFUSED + "\n".join(refused))
    return chosen


def check_disk(desired: Mapping[str, Sequence[Resource]],
               facts: Mapping[str, HostFacts | HostError]) -> None:
    """PlanError naming every node whose model directory's volume has less free space than
    the model files it still needs (its placement's files, minus those verified there)."""
    refused: list[str] = []
    for host in sorted(desired):
        fact = facts.get(host)
        if not isinstance(fact, HostFacts):
            continue
        for resource in desired[host]:
            if not isinstance(resource, ModelFiles) or resource.directory not in fact.disk:
                continue
            need, disk = resource.bytes_to_fetch(fact), fact.disk[resource.directory]
            if need > disk.free_bytes:
                refused.append(f"{host}: needs {size(need)} free for the model files, "
                               f"has {size(disk.free_bytes)} on {disk.volume}")
    if refused:
        raise PlanError(REFUSED + "\n".join(refused))

DAEMONS = "/Library/LaunchDaemons/com.orch.*"


def sudoers_line(user: str, home: str, staging_dirs: Sequence[str] = (".orch",)) -> str:
    """The sudoers rule (for ``visudo -f /etc/sudoers.d/orch``) allowing what orch runs as root.

    The commands are those of the agent's ``install_system`` / ``remove_system`` ops (cp and
    chmod of a staged plist, rm -f), of system-domain ``launchctl`` (bootstrap, bootout,
    kickstart -k) and the wired limit's ``sysctl -w``; every path is a LaunchDaemon of orch's
    (``com.orch.*``) or a plist orch staged under its directory in HOME.
    """
    home = home.rstrip("/")
    sources = ", ".join(f"/bin/cp {home}/{d.strip('/')}/system/com.orch.* {DAEMONS}"
                        for d in dict.fromkeys(staging_dirs))
    commands = [
        sources,
        f"/bin/chmod 644 {DAEMONS}",
        f"/bin/rm -f {DAEMONS}",
        f"/bin/launchctl bootstrap system {DAEMONS}",
        "/bin/launchctl bootout system/com.orch.*",
        "/bin/launchctl kickstart -k system/com.orch.*",
        "/usr/sbin/sysctl -w iogpu.wired_limit_mb=*",
    ]
    return f"{user} ALL=(root) NOPASSWD: " + ", ".join(commands)


def _root_step(step: Step) -> bool:
    if isinstance(step, InstallSystem | RemoveSystem):
        return True
    if isinstance(step, LaunchdBootstrap | LaunchdBootout | LaunchdKickstart):
        return step.domain == "system"
    if isinstance(step, Run):
        return bool(step.argv) and step.argv[0] == "sudo"
    return False


def needs_root(resources: Sequence[Resource], steps: Sequence[Step]) -> bool:
    """A host needs root when it should hold something root's (a system-domain job, a
    sysctl) or when the plan runs a root step there (e.g. removing such a daemon)."""
    return any(r.facts_needed().sudo for r in resources) or any(_root_step(s) for s in steps)


def check_sudo(plan: Plan, desired: Mapping[str, Sequence[Resource]],
               facts: Mapping[str, HostFacts | HostError], runtime_dir: str = ".orch") -> None:
    """Raise PlanError naming every node that needs root but whose ``sudo -n`` would prompt,
    with the sudoers line for each; do nothing when every such node is ready (or unasked)."""
    refused: list[str] = []
    for host_plan in sorted(plan.hosts, key=lambda h: h.host):
        fact = facts.get(host_plan.host)
        if not isinstance(fact, HostFacts) or fact.sudo is not False:
            continue
        steps = [s for c in host_plan.changes for s in c.steps]
        if not needs_root(desired.get(host_plan.host, ()), steps):
            continue
        line = sudoers_line(fact.user, fact.home, (runtime_dir, ".orch"))
        refused.append(f"{host_plan.host}: `sudo -n` would ask {fact.user} for a password, "
                       f"and orch runs LaunchDaemons and the GPU wired limit as root there. "
                       f"Allow exactly orch's root commands (sudo visudo -f "
                       f"/etc/sudoers.d/orch):\n  {line}")
    if refused:
        raise PlanError("nothing was changed: " + "\n".join(refused)
                        + "\n(without sudo, workers can run as launchd agents: "
                          "runtime.launchd_domain: user; see the README, What orch needs "
                          "on a Mac)")


def preflights(nodes: Sequence[str], desired: Mapping[str, Sequence[Resource]],
               facts: Mapping[str, HostFacts | HostError],
               pythons: Mapping[str, Interpreter]) -> tuple[NodePreflight, ...]:
    """Each answering serving node's preflight facts (`NodePreflight`), sorted by host as
    the plan's hosts are (and as its JSON keeps them)."""
    result = []
    for node in sorted(nodes):
        fact = facts.get(node)
        if not isinstance(fact, HostFacts):
            continue
        model = next((r for r in desired.get(node, ()) if isinstance(r, ModelFiles)), None)
        result.append(node_preflight(fact, pythons.get(node), model))
    return tuple(result)


def with_preflight(plan: Plan, nodes: Sequence[str], desired: Mapping[str, Sequence[Resource]],
                   facts: Mapping[str, HostFacts | HostError],
                   pythons: Mapping[str, Interpreter]) -> Plan:
    """The plan, carrying what preflight saw on each serving node."""
    return replace(plan, preflight=preflights(nodes, desired, facts, pythons))
