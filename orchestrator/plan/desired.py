"""What each host should hold, derived from the cluster file: the resource list per host.

This is where the cluster's intent becomes concrete resources, in the order they must be
applied on a host. Hosts that are in the inventory but not serving get an empty list, so the
plan removes what orch put there earlier (through the managed record).
"""

from __future__ import annotations

import hashlib
import plistlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import (
    Cluster,
    CommandTask,
    CopyTask,
    DirectoryTask,
    Host,
    LaunchdTask,
    SysctlTask,
    Task,
    TemplateTask,
)
from orchestrator.config.templates import render_template as render_user_template
from orchestrator.errors import ConfigError, Diagnostic, HostError
from orchestrator.facts import HostFacts, Interpreter
from orchestrator.placement.intent import Intent
from orchestrator.resources.base import Resource
from orchestrator.resources.command import Command
from orchestrator.resources.copy import Copy
from orchestrator.resources.files import Directory, File
from orchestrator.resources.interpreter import choose_python
from orchestrator.resources.loaded_job import LoadedJob
from orchestrator.resources.model_files import ModelFiles, model_files_by_host
from orchestrator.resources.sysctl import Sysctl
from orchestrator.resources.sysctl_setting import SysctlSetting
from orchestrator.resources.wheelhouse import Wheelhouse
from orchestrator.resources.worker import WorkerSettings, model_inputs, worker_resources


def host_vars(cluster: Cluster, host: Host) -> dict[str, Any]:
    """What a user's template sees about the host it is rendered for."""
    return {
        "cluster": cluster.name,
        "host": {"name": host.name, "address": host.address, "ring_ip": host.ring_ip,
                 "memory_gb": host.memory_gb, "chip": host.chip, "groups": list(host.groups),
                 "vars": dict(host.vars)},
        "hosts": {h.name: {"address": h.address, "ring_ip": h.ring_ip}
                  for h in cluster.hosts.values()},
    }


def render_template(src: Path, variables: Mapping[str, Any], origin: str) -> str:
    """Render a user's template for one host; its mistakes are ConfigErrors at its line."""
    return render_user_template(src, variables, origin)


def _targets(task: Task, cluster: Cluster, host: Host) -> bool:
    if task.hosts is None:
        return True
    return host.name in task.hosts or any(g in task.hosts for g in host.groups)


def task_resource(task: Task, cluster: Cluster, host: Host,
                  written: Mapping[str, bytes | Path] | None = None) -> Resource:
    """The resource a task declares on `host`; `written`: the content earlier tasks write on
    it, by destination (what a launchd task reads its plist from), or the controller file a
    copy sends there: read only when a launchd task names it (a copy may be gigabytes)."""
    action = task.action
    if isinstance(action, SysctlTask):
        return SysctlSetting(action.name, action.value, action.persist,
                             staging_dir=f"~/{cluster.runtime.dir}/system")
    if isinstance(action, LaunchdTask):
        source = (written or {}).get(action.plist)
        content = source.read_bytes() if isinstance(source, Path) else source
        return LoadedJob(_job_label(task, action, content), action.plist, action.domain,
                         None if content is None else hashlib.sha256(content).hexdigest())
    if isinstance(action, CommandTask):
        return Command(task.name, action.argv, action.creates, action.unless)
    if isinstance(action, TemplateTask):
        variables = {**host_vars(cluster, host), **task.vars}
        return File(action.dest, render_template(action.src, variables, task.origin),
                    action.mode)
    if isinstance(action, CopyTask):
        return Copy.of(action.src, action.dest, action.mode)
    assert isinstance(action, DirectoryTask)
    return Directory(action.path, action.mode)


def _task_error(task: Task, message: str) -> ConfigError:
    file, _, line = task.origin.rpartition(":")
    return ConfigError([Diagnostic(Path(file), int(line) if line.isdigit() else 1, 1,
                                   f"task {task.name!r}: {message}")])


def check_not_orchs(task: Task, resource: Resource, own_sysctls: set[str], host: str) -> None:
    """A `sysctl` task for a setting orch itself sets on this node (the wired limit its share
    of the model needs) is refused: two owners of one value would undo each other."""
    if isinstance(resource, SysctlSetting) and resource.name in own_sysctls:
        raise _task_error(task, f"orch sets {resource.name} itself on {host}, whose share of "
                                "the model needs it; expected no task for it on that node")


def _job_label(task: Task, action: LaunchdTask, content: bytes | None) -> str:
    """The given label, else the plist's own: launchd knows a job by the Label inside it, so
    a label given beside a plist that says otherwise would name a job that never loads."""
    if content is None:
        if action.label is None:  # load_cluster requires a writer; this host has none
            raise _task_error(task, f"no task writes {action.plist} on this host to read the "
                                    "job's Label from; expected `label:`")
        return action.label
    try:
        label = plistlib.loads(content).get("Label")
    except (plistlib.InvalidFileException, ValueError, AttributeError) as exc:
        raise _task_error(task, f"{action.plist} as the cluster writes it is not a plist "
                                f"dictionary ({exc})") from None
    if not isinstance(label, str) or not label or "/" in label:
        raise _task_error(task, f"{action.plist} as the cluster writes it has no usable "
                                f"Label ({label!r})")
    if action.label is not None and action.label != label:
        raise _task_error(task, f"label {action.label!r}, but {action.plist} says Label "
                                f"{label!r}; expected them equal (launchd loads the plist's)")
    return label


def serving_nodes(cluster: Cluster, intent: Intent) -> list[str]:
    """The hosts that serve: the placement's ranks; without a model, the listed placement
    nodes or every host, drained ones left out either way (as placement leaves them out)."""
    if intent.serving is not None:
        return list(intent.serving)
    listed = cluster.listed_nodes
    if listed is None:
        return [name for name, host in cluster.hosts.items() if not host.drained]
    return list(listed)


def desired_state(
    cluster: Cluster,
    intent: Intent,
    nodes: Sequence[str],
    facts: Mapping[str, HostFacts | HostError] | None = None,
    wheelhouse: Wheelhouse | None = None,
    pythons: Mapping[str, Interpreter] | None = None,
) -> dict[str, list[Resource]]:
    """Resources per inventory host, in apply order; `nodes` are the hosts that serve.

    A serving node holds its model files, then its worker (which needs HOME and the OS from
    `facts`: launchd takes absolute paths); without facts yet, "~" stands in for HOME, which
    gives the same fact request. A host that no longer serves keeps its verified model files
    (a LAN source for the others) and loses everything else through the managed record.
    `pythons`: each serving node's interpreter for the venv (`chosen_pythons`); a node not in
    it gets its own `choose_python`.
    """
    model_files: dict[str, ModelFiles] = {}
    if intent.placement is not None and intent.manifest is not None:
        assert intent.model_dir is not None
        model_files = model_files_by_host(
            intent.manifest, intent.model_dir,
            {n.name: n.files for n in intent.placement.nodes},
            holders=[h for h in cluster.hosts if h not in nodes])
    result: dict[str, list[Resource]] = {}
    for name, host in cluster.hosts.items():
        resources: list[Resource] = []
        if name in model_files:
            resources.append(model_files[name])
        if name in nodes:
            if intent.placement is not None:
                node = next(n for n in intent.placement.nodes if n.name == name)
                fact = (facts or {}).get(name)
                known = fact if isinstance(fact, HostFacts) else None
                inputs = model_inputs(model_files[name])
                python = (pythons or {}).get(name) or (
                    choose_python(known, cluster.runtime.python) if known else None)
                resources += worker_resources(
                    cluster, intent.placement, node,
                    home=known.home if known else "~",
                    user=known.user if known else "~",
                    system=known.os_system if known else "Darwin",
                    model_dir=inputs.model_dir, files=inputs.files,
                    model_files_id=inputs.model_files_id, wheelhouse=wheelhouse,
                    settings=WorkerSettings(throttle_interval=cluster.runtime.throttle_interval,
                                            env=dict(cluster.runtime.env)),
                    python=python.path if python else None)
            # A cluster that serves no model installs no Python environment (issue #14): its
            # hosts get their tasks only, and nothing another cluster's workers use.
            written: dict[str, bytes | Path] = {}
            own_sysctls = {r.name for r in resources if isinstance(r, Sysctl)}
            for task in cluster.tasks:
                if not _targets(task, cluster, host):
                    continue
                resource = task_resource(task, cluster, host, written)
                check_not_orchs(task, resource, own_sysctls, name)
                resources.append(resource)
                if isinstance(resource, File):
                    written[resource.path] = resource.content.encode()
                elif isinstance(resource, Copy) and not resource.directory:
                    written[resource.dest] = Path(resource.files[0].path)
        result[name] = resources
    return result
