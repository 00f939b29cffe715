"""A launchd job: its plist, loaded in its domain, running the config it was loaded with.

No handlers: the plist carries `ORCH_CONFIG_HASH`, a hash of itself and of every file the job
reads (hostfile, worker script). `launchctl print` reports the environment the *running* job
was loaded with, so a restart owed after a config change is visible on the host until it
happens — a run that dies between writing a file and restarting the job loses nothing.
"""

from __future__ import annotations

import hashlib
import plistlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.facts import FactRequest, FileKind, HostFacts, JobState, LaunchdRef
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import (
    InstallSystem,
    LaunchdBootout,
    LaunchdBootstrap,
    Remove,
    RemoveSystem,
    Step,
    Text,
    Write,
)

HASH_ENV = "ORCH_CONFIG_HASH"


def render_plist(
    label: str,
    program: Sequence[str],
    *,
    env: Mapping[str, str],
    inputs: Sequence[str] = (),
    working_directory: str | None = None,
    stdout_path: str | None = None,
    stderr_path: str | None = None,
    keep_alive: bool = True,
    throttle_interval: int = 10,
    background: bool = True,
    user_name: str | None = None,
) -> str:
    """The job's plist (XML via plistlib, so no value can break the markup).

    `inputs` are the contents of the files the job reads; their hash joins the plist's own in
    `ORCH_CONFIG_HASH`, so changing any of them changes the plist and reloads the job.
    `user_name` (a LaunchDaemon's `UserName`) runs a system-domain job as that user; a daemon
    is not `background` (LimitLoadToSessionType is for agents).
    """
    body: dict[str, object] = {
        "Label": label,
        "ProgramArguments": list(program),
        "KeepAlive": keep_alive,
        "RunAtLoad": True,
        "ThrottleInterval": throttle_interval,
        # Interactive: otherwise macOS throttles the CPU and I/O of a background job.
        "ProcessType": "Interactive",
    }
    if background:
        # Over SSH there is no GUI session: the user domain with Background sessions loads.
        body["LimitLoadToSessionType"] = "Background"
    if user_name:
        body["UserName"] = user_name
    if working_directory:
        body["WorkingDirectory"] = working_directory
    if stdout_path:
        body["StandardOutPath"] = stdout_path
    if stderr_path:
        body["StandardErrorPath"] = stderr_path
    digest = hashlib.sha256()
    digest.update(plistlib.dumps({**body, "EnvironmentVariables": dict(env)}, sort_keys=True))
    for content in inputs:
        digest.update(hashlib.sha256(content.encode()).digest())
    body["EnvironmentVariables"] = {**env, HASH_ENV: digest.hexdigest()[:16]}
    return plistlib.dumps(body, sort_keys=True).decode()


def config_hash(plist: str) -> str:
    env = plistlib.loads(plist.encode()).get("EnvironmentVariables", {})
    return str(env.get(HASH_ENV, ""))


@dataclass(frozen=True)
class LaunchdService:
    label: str
    plist_path: str
    plist: str
    domain: str = "user"
    must_run: bool = True  # a loaded job that is not running is drift (KeepAlive jobs)
    needs: tuple[str, ...] = field(default=())  # resource ids this job must wait for
    staged: str | None = None  # system domain: written here as the user, installed by root

    @property
    def id(self) -> str:
        return f"launchd:{self.domain}/{self.label}"

    @property
    def ref(self) -> LaunchdRef:
        return LaunchdRef(self.domain, self.label)

    def facts_needed(self) -> FactRequest:
        return FactRequest(files=frozenset({self.plist_path}), launchd=frozenset({self.ref}),
                           sudo=self.domain == "system")

    def diff(self, facts: HostFacts) -> Change | None:
        plist_file = facts.file(self.plist_path)
        job = facts.job(self.ref)
        wanted_hash = config_hash(self.plist)
        sha = hashlib.sha256(self.plist.encode()).hexdigest()
        fields: list[FieldChange] = []
        steps: list[Step] = []
        if plist_file.kind is not FileKind.FILE or plist_file.sha256 != sha \
                or (self.staged is not None and plist_file.mode != 0o644):
            fields.append(FieldChange("plist", plist_file.sha256, sha))
            if self.staged is None:
                steps.append(Write(self.plist_path, 0o644, Text(self.plist)))
            else:  # a LaunchDaemon's plist is root's: staged as the user, copied by root
                steps += [Write(self.staged, 0o644, Text(self.plist)),
                          InstallSystem(self.staged, self.plist_path, 0o644)]
        running_hash = job.env.get(HASH_ENV)
        if job.state is JobState.NOT_LOADED:
            fields.append(FieldChange("state", "not_loaded", "running"))
        elif running_hash != wanted_hash:
            fields.append(FieldChange("config_hash", running_hash, wanted_hash))
        elif self.must_run and job.state is not JobState.RUNNING:
            fields.append(FieldChange("state", job.state.value, "running"))
        if not fields:
            return None
        if any(f.name in ("plist", "state", "config_hash") for f in fields):
            steps.append(self.bootstrap())
        action = (Action.CREATE if job.state is JobState.NOT_LOADED
                  and plist_file.kind is FileKind.MISSING else Action.UPDATE)
        return Change(self.id, action, tuple(fields), tuple(steps), cleanup=self.cleanup())

    def bootstrap(self) -> LaunchdBootstrap:
        """(Re)load the job from its plist: also how a ring restarts an unchanged worker."""
        return LaunchdBootstrap(self.domain, self.label, self.plist_path)

    def cleanup(self) -> tuple[Step, ...]:
        bootout = LaunchdBootout(self.domain, self.label)
        if self.staged is None:
            return (bootout, Remove(self.plist_path))
        return (bootout, RemoveSystem(self.plist_path), Remove(self.staged))
