"""Load a cluster file and everything it references, checking it all before any host is touched.

Problems are collected across files and reported together: a user fixing a 10-host inventory
should see every mistake in one run, each pointing at the line they wrote.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from orchestrator.config import models
from orchestrator.config.cluster import (
    Cluster,
    CommandTask,
    CopyTask,
    DirectoryTask,
    Host,
    LaunchdTask,
    ModelSpec,
    PlacementSpec,
    Runtime,
    SSHSettings,
    SysctlTask,
    Task,
    TaskAction,
    TemplateTask,
)
from orchestrator.config.diagnose import validate
from orchestrator.config.templates import check_template
from orchestrator.config.yamlsrc import DataPath, Document, SourceMap, load_document
from orchestrator.errors import ConfigError, Diagnostic

T = TypeVar("T")
PINNED_REVISION = re.compile(r"^[0-9a-f]{40}$")


def load_cluster(path: Path) -> Cluster:
    """Read and check the cluster file, its inventory and playbooks; raise every problem."""
    path = Path(path).absolute()
    errors: list[Diagnostic] = []
    doc = load_document(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([doc.source.diag((), "expected a mapping of cluster settings")])
    base = path.parent
    spec = _collect(errors, lambda: validate(models.ClusterFile, doc))
    if spec is None:
        # Keep going through the files the cluster file names, so one run shows every mistake.
        _check_referenced_files(doc, base, errors)
        raise ConfigError(errors)

    warnings: list[Diagnostic] = []
    hosts: dict[str, Host] = {}
    groups: dict[str, tuple[str, ...]] = {}
    ssh = SSHSettings()
    inventory_file: Path | None = None
    serves_model = spec.model is not None
    if spec.inventory is not None:
        candidate = (base / spec.inventory).absolute()
        if candidate.is_file():
            inventory_file = candidate
            loaded = _collect(errors, lambda: _load_inventory(candidate, serves_model))
            if loaded is not None:
                hosts, groups, ssh = loaded
        else:
            errors.append(doc.source.diag(
                ("inventory",), f"inventory file {spec.inventory!r} does not exist "
                f"(looked for {candidate}); expected a path relative to this file", at_key=False))
    else:
        inline = models.InventoryFile(hosts=spec.hosts or {})
        hosts, groups = _resolve_hosts(inline, doc.source, ("hosts",), base, errors,
                                       serves_model)

    model = (None if spec.model is None
             else _model(spec.model, doc.source, base, errors, warnings))
    placement = _placement(spec.placement, doc.source, hosts, errors)
    tasks = _tasks(spec, doc, base, set(hosts) | set(groups), errors)
    if errors:
        raise ConfigError(errors + warnings)
    return Cluster(
        name=spec.name,
        file=path,
        inventory_file=inventory_file,
        hosts=hosts,
        model=model,
        placement=placement,
        runtime=Runtime(
            python=spec.runtime.python,
            packages=tuple(spec.runtime.packages),
            api_port=spec.runtime.api_port,
            ring_port=spec.runtime.ring_port,
            sync_port=spec.runtime.sync_port,
            rendezvous_port=spec.runtime.rendezvous_port,
            env=tuple(sorted(spec.runtime.env.items())),
            throttle_interval=spec.runtime.throttle_interval,
            dir=spec.runtime.dir,
            launchd_domain=spec.runtime.launchd_domain,
            backend=spec.runtime.backend,
        ),
        tasks=tasks,
        groups=groups,
        warnings=tuple(sorted(warnings)),
        ssh=ssh,
    )


def _check_referenced_files(doc: Document, base: Path, errors: list[Diagnostic]) -> None:
    """Validate the inventory and playbooks named by a cluster file that itself has errors."""
    data = doc.data
    inventory = data.get("inventory")
    if isinstance(inventory, str) and (base / inventory).is_file():
        _collect(errors, lambda: _load_inventory((base / inventory).absolute(),
                                                 data.get("model") is not None))
    playbooks = data.get("playbooks")
    for name in playbooks if isinstance(playbooks, list) else []:
        if isinstance(name, str) and (base / name).is_file():
            file = (base / name).absolute()
            _collect(errors, lambda file=file: validate(  # type: ignore[misc]
                models.PlaybookFile, load_document(file)))


def _collect(errors: list[Diagnostic], fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except ConfigError as exc:
        errors.extend(exc.diagnostics)
        return None


def _load_inventory(path: Path, serves_model: bool,
                    ) -> tuple[dict[str, Host], dict[str, tuple[str, ...]], SSHSettings]:
    doc = load_document(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([doc.source.diag((), "expected a mapping with a `hosts` key")])
    inventory = validate(models.InventoryFile, doc)
    errors: list[Diagnostic] = []
    hosts, groups = _resolve_hosts(inventory, doc.source, ("hosts",), path.parent, errors,
                                   serves_model)
    ssh = _ssh(inventory.ssh, doc.source, path.parent, errors)
    if errors:
        raise ConfigError(errors)
    return hosts, groups, ssh


def _ssh(section: models.InventorySSH, source: SourceMap, base: Path,
         errors: list[Diagnostic]) -> SSHSettings:
    """The inventory's SSH settings; a known_hosts file is relative to the inventory and must
    exist (a typo would otherwise refuse every host key with a confusing message)."""
    known_hosts = None
    if section.known_hosts is not None:
        known_hosts = (base / Path(section.known_hosts).expanduser()).absolute()
        if not known_hosts.is_file():
            errors.append(source.diag(("ssh", "known_hosts"),
                                      f"known_hosts file {section.known_hosts!r} does not exist "
                                      f"(looked for {known_hosts})", at_key=False))
    return SSHSettings(known_hosts=known_hosts, connect_timeout=section.connect_timeout,
                       proxy_jump=section.proxy_jump)


RESERVED_VARS = {"address", "ring_ip", "vars", "name", "groups"}


def _user_vars(shared: models.SharedVars, source: SourceMap, path: DataPath,
               errors: list[Diagnostic]) -> dict[str, Any]:
    """The user variables among a `vars` block's keys (those that are not connection keys).

    Any other key is a variable, as in Ansible's group vars; what keeps this strict is that a
    near-miss of a connection key (`memroy_gb`, `prot`) is an error, not a variable."""
    extra = dict(shared.model_extra or {})
    known = sorted(models.HostVars.model_fields)
    for key in extra:
        if key in RESERVED_VARS:
            errors.append(source.diag((*path, key), f"{key!r} cannot be shared through `vars`; "
                                      "expected it on each host"))
        elif close := difflib.get_close_matches(key, known, n=1, cutoff=0.75):
            # A typo of a connection key must not silently become a variable nobody reads.
            errors.append(source.diag(
                (*path, key), f"unknown key {key!r} (did you mean {close[0]!r}?); a user "
                "variable (host.vars.KEY) needs a name not this close to a connection key"))
    return {k: v for k, v in extra.items() if k not in RESERVED_VARS}


def _resolve_hosts(
    inventory: models.InventoryFile,
    source: SourceMap,
    hosts_path: DataPath,
    base: Path,
    errors: list[Diagnostic],
    serves_model: bool,
) -> tuple[dict[str, Host], dict[str, tuple[str, ...]]]:
    """Apply precedence (host > group, in file order > vars), then check uniqueness; user
    variables follow the same precedence, key by key.

    `ring_ip` and `memory_gb` describe a rank of the ring and the RAM placement splits layers
    by: a cluster that serves a model needs both on every host, one that only runs tasks
    needs neither.
    """
    shared_vars = _user_vars(inventory.vars, source, ("vars",), errors)
    group_vars = {g: _user_vars(group.vars, source, ("groups", g, "vars"), errors)
                  for g, group in inventory.groups.items()}
    membership: dict[str, list[str]] = {}
    for group_name, group in inventory.groups.items():
        if group_name in inventory.hosts:
            errors.append(source.diag(("groups", group_name),
                                      f"group {group_name!r} has the name of a host; "
                                      "expected distinct names"))
        for i, member in enumerate(group.hosts):
            if member not in inventory.hosts:
                errors.append(source.diag(("groups", group_name, "hosts", i),
                                          f"group member {member!r} is not a host in this "
                                          f"inventory; expected one of: {_names(inventory.hosts)}",
                                          at_key=False))
            membership.setdefault(member, []).append(group_name)

    hosts: dict[str, Host] = {}
    ring_ips: dict[str, str] = {}
    endpoints: dict[tuple[str, int], str] = {}
    for name, entry in inventory.hosts.items():
        layers: list[models.HostVars] = [
            inventory.vars, *(inventory.groups[g].vars for g in membership.get(name, [])), entry]
        merged: dict[str, object] = {}
        for layer in layers:
            merged.update({k: v for k, v in layer.model_dump().items()
                           if v is not None and k in models.HostVars.model_fields})
        user_vars = dict(shared_vars)
        for group_name in membership.get(name, []):
            user_vars.update(group_vars[group_name])
        user_vars.update(entry.vars)
        path = (*hosts_path, name)
        if serves_model and "memory_gb" not in merged:
            errors.append(source.diag(path, f"host {name!r} has no `memory_gb`; expected it on "
                                      "the host, one of its groups or in `vars` (placement "
                                      "needs it to serve the model)"))
            continue
        if serves_model and entry.ring_ip is None:
            errors.append(source.diag(path, f"host {name!r} has no `ring_ip`; expected the IP "
                                      "its rank of the MLX ring listens on (needed to serve "
                                      "the model)"))
            continue
        identity = merged.get("identity_file")
        identity_path = None
        if isinstance(identity, str):
            identity_path = (base / Path(identity).expanduser()).absolute()
            if not identity_path.is_file():
                errors.append(source.diag(_where_set(source, path, "identity_file"),
                                          f"identity file {identity!r} does not exist "
                                          f"(looked for {identity_path})", at_key=False))
        ring_ip = entry.ring_ip
        if ring_ip is not None and ring_ip in ring_ips:
            errors.append(source.diag((*path, "ring_ip"),
                                      f"ring_ip {ring_ip} is already used by host "
                                      f"{ring_ips[ring_ip]!r}; each rank needs its own IP",
                                      at_key=False))
        if ring_ip is not None:
            ring_ips.setdefault(ring_ip, name)
        port = int(merged.get("port", 22))  # type: ignore[call-overload]
        endpoint = (entry.address, port)
        if endpoint in endpoints:
            errors.append(source.diag((*path, "address"),
                                      f"address {entry.address}:{port} is already host "
                                      f"{endpoints[endpoint]!r}; expected one entry per Mac",
                                      at_key=False))
        endpoints.setdefault(endpoint, name)
        others = {h: h for h in inventory.hosts if h != name}
        for peer in entry.rdma or {}:
            if peer not in others:
                errors.append(source.diag((*path, "rdma", peer),
                                          f"rdma peer {peer!r} is not another host in this "
                                          f"inventory; expected one of: {_names(others)}"))
        if _looks_like_bad_ip(entry.address):
            errors.append(source.diag((*path, "address"),
                                      f"address {entry.address!r} is not a valid IP address; "
                                      "expected an IP or a hostname", at_key=False))
        hosts[name] = Host(
            name=name,
            address=entry.address,
            ring_ip=ring_ip,
            memory_gb=(None if "memory_gb" not in merged
                       else float(merged["memory_gb"])),  # type: ignore[arg-type]
            port=port,
            user=merged.get("user"),  # type: ignore[arg-type]
            identity_file=identity_path,
            chip=merged.get("chip"),  # type: ignore[arg-type]
            drained=bool(merged.get("drained", False)),
            groups=tuple(membership.get(name, [])),
            rdma=tuple(sorted((entry.rdma or {}).items())),
            vars=user_vars,
        )
    groups = {g: tuple(group.hosts) for g, group in inventory.groups.items()}
    return hosts, groups


def _looks_like_bad_ip(address: str) -> bool:
    """`10.0.0.300` is a typo for an IP, not a hostname, though DNS syntax would allow it."""
    if not re.fullmatch(r"[0-9.]+", address):
        return False
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return True
    return False


def _where_set(source: SourceMap, host_path: DataPath, key: str) -> DataPath:
    """Point at the host's own key when it set one; else at the host (the value was inherited)."""
    own = (*host_path, key)
    return own if own in source.keys else host_path


def _names(mapping: Mapping[str, object]) -> str:
    return ", ".join(mapping) or "(none)"


def _model(section: models.ModelSection, source: SourceMap, base: Path,
           errors: list[Diagnostic], warnings: list[Diagnostic]) -> ModelSpec:
    path = None
    if section.path is not None:
        path = (base / Path(section.path).expanduser()).absolute()
        if not path.is_dir():
            errors.append(source.diag(("model", "path"),
                                      f"model directory {section.path!r} does not exist "
                                      f"(looked for {path})", at_key=False))
    if section.repo is not None and section.path is None:
        if section.revision is None:
            warnings.append(source.diag(
                ("model", "repo"), "no `revision`: the Hub's main branch can change under a "
                "running cluster; pin a 40-hex commit sha", severity="warning"))
        elif not PINNED_REVISION.match(section.revision):
            warnings.append(source.diag(
                ("model", "revision"), f"revision {section.revision!r} is not a commit sha; "
                "pin a 40-hex commit so every node serves the same weights",
                at_key=False, severity="warning"))
    return ModelSpec(repo=section.repo, revision=section.revision, path=path,
                     endpoint=section.endpoint.rstrip("/"))


def _placement(section: models.PlacementSection, source: SourceMap, hosts: dict[str, Host],
               errors: list[Diagnostic]) -> PlacementSpec:
    nodes: Literal["auto"] | tuple[str, ...] = (
        "auto" if section.nodes == "auto" else tuple(section.nodes))
    if isinstance(nodes, tuple) and hosts:
        seen: set[str] = set()
        for i, node in enumerate(nodes):
            if node not in hosts:
                errors.append(source.diag(("placement", "nodes", i),
                                          f"placement node {node!r} is not in the inventory; "
                                          f"expected one of: {_names(hosts)}", at_key=False))
            elif node in seen:
                errors.append(source.diag(("placement", "nodes", i),
                                          f"placement node {node!r} is listed twice",
                                          at_key=False))
            seen.add(node)
    return PlacementSpec(nodes=nodes,
                         reserve_gb=section.reserve_gb, overhead=section.overhead,
                         kv_cache_gb=section.kv_cache_gb, parallelism=section.parallelism,
                         link=section.link, link_latency_ms=section.link_latency_ms,
                         link_bandwidth_gb_s=section.link_bandwidth_gb_s)


def _tasks(spec: models.ClusterFile, doc: Document, base: Path, targets: set[str],
           errors: list[Diagnostic]) -> tuple[Task, ...]:
    sources: list[tuple[Document, DataPath, list[models.Task], Path]] = [
        (doc, ("tasks",), spec.tasks, base)]
    for i, name in enumerate(spec.playbooks):
        file = (base / name).absolute()
        if not file.is_file():
            errors.append(doc.source.diag(("playbooks", i), f"playbook {name!r} does not exist "
                                          f"(looked for {file})", at_key=False))
            continue

        def read(file: Path = file) -> tuple[Document, models.PlaybookFile]:
            playbook_doc = load_document(file)
            return playbook_doc, validate(models.PlaybookFile, playbook_doc)

        loaded = _collect(errors, read)
        if loaded is not None:
            sources.append((loaded[0], ("tasks",), loaded[1].tasks, file.parent))

    tasks: list[Task] = []
    # (where it was written, the task) for each launchd task, checked once every task is read
    launchd_tasks: list[tuple[Document, DataPath, int, LaunchdTask]] = []
    for task_doc, root, task_list, task_base in sources:
        for i, task in enumerate(task_list):
            path = (*root, i)
            for j, target in enumerate(task.hosts or []):
                if target not in targets:
                    errors.append(task_doc.source.diag(
                        (*path, "hosts", j), f"task target {target!r} is neither a host nor a "
                        "group of the inventory", at_key=False))
            action: TaskAction
            mark = task_doc.source.value(path)
            origin = f"{task_doc.source.file}:{mark.line}"
            if task.command is not None:
                action = CommandTask(tuple(task.command), task.creates,
                                     tuple(task.unless) if task.unless else None)
            elif task.template is not None:
                src = (task_base / task.template.src).absolute()
                if not src.is_file():
                    errors.append(task_doc.source.diag(
                        (*path, "template", "src"), f"template {task.template.src!r} does not "
                        f"exist (looked for {src}); expected a file relative to "
                        f"{task_doc.source.file.name}", at_key=False))
                else:
                    errors.extend(check_template(src, origin))
                action = TemplateTask(src, task.template.dest, int(task.template.mode, 8))
            elif task.copy_ is not None:
                src = (task_base / Path(task.copy_.src).expanduser()).absolute()
                if not (src.is_file() or src.is_dir()):
                    errors.append(task_doc.source.diag(
                        (*path, "copy", "src"), f"copy source {task.copy_.src!r} does not "
                        f"exist (looked for {src}); expected a file or directory relative to "
                        f"{task_doc.source.file.name}", at_key=False))
                action = CopyTask(src, task.copy_.dest, int(task.copy_.mode, 8))
            elif task.directory is not None:
                action = DirectoryTask(task.directory.path, int(task.directory.mode, 8))
            elif task.sysctl is not None:
                action = SysctlTask(task.sysctl.name, str(task.sysctl.value),
                                    task.sysctl.persist)
            else:
                assert task.launchd is not None
                action = LaunchdTask(task.launchd.plist, task.launchd.domain,
                                     task.launchd.label)
                launchd_tasks.append((task_doc, path, len(tasks), action))
            tasks.append(Task(name=task.name, action=action,
                              hosts=tuple(task.hosts) if task.hosts is not None else None,
                              vars=dict(task.vars), origin=origin))
    errors.extend(_check_launchd_plists(tasks, launchd_tasks))
    return tuple(tasks)


def _check_launchd_plists(tasks: list[Task],
                          launchd_tasks: list[tuple[Document, DataPath, int, LaunchdTask]],
                          ) -> list[Diagnostic]:
    """A launchd task's plist, when the cluster writes it, is written by an earlier task: the
    plan reloads the job after the write (a write after the load would leave the old job
    running), and a task without `label` reads it from that plist."""
    problems: list[Diagnostic] = []
    for task_doc, path, index, action in launchd_tasks:
        writers = [i for i, t in enumerate(tasks)
                   if isinstance(t.action, TemplateTask | CopyTask)
                   and t.action.dest == action.plist]
        later = [tasks[i].name for i in writers if i > index]
        if later:
            problems.append(task_doc.source.diag(
                (*path, "launchd", "plist"), f"{action.plist} is written by task "
                f"{later[0]!r} after this one; expected the task that writes a plist before "
                "the launchd task that loads it", at_key=False))
        elif not writers and action.label is None:
            problems.append(task_doc.source.diag(
                (*path, "launchd"), f"no `label`, and no earlier template or copy task "
                f"writes {action.plist} to read it from; expected `label: JOB_LABEL`"))
    return problems
