"""A user's `launchd:` task: a job loaded from a plist on the node, read in the facts call.

Why not a `command` with an `unless` guard: the guard is a process tree per no-op (`sh`, `id`,
`launchctl print`), while the facts call reads the job with one `launchctl print` of its own.

What it converges, exactly:

* the job is not loaded → ``bootstrap`` it from the plist;
* the cluster writes the plist (an earlier `template` or `copy` task with that `dest`, which
  `load_cluster` requires to come first) and this plan changes its content → reload it
  (``bootout``, wait until gone, ``bootstrap``): Ansible's template task notifying a
  `launchd: state=reloaded` handler, without the handler;
* a run set out to change the job and was cut (or failed) before it finished (the managed
  record still lists it as pending, `HostFacts.pending`) → reload it: the plist may be
  current while the job still runs the old one, which launchctl would not tell (it does not
  show the plist a job was loaded from, only some of its keys). A run that fails after the
  reload costs one more reload, never a job left on an old plist;
* anything else is left as it is: a loaded job runs what it was loaded with, and orch does not
  compare the running job with a plist it did not write.

It does not own the plist: removing the task boots the job out, and the file goes with the
task that wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.facts import FactRequest, FileKind, HostFacts, JobState, LaunchdRef
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import LaunchdBootout, LaunchdBootstrap, Step


@dataclass(frozen=True)
class LoadedJob:
    label: str
    plist: str  # the path on the node, as the task wrote it ("~" is the login's HOME)
    domain: str = "user"
    written_sha256: str | None = None  # the plist's, when a task of the cluster writes it

    @property
    def id(self) -> str:
        return f"launchd:{self.domain}/{self.label}"

    @property
    def ref(self) -> LaunchdRef:
        return LaunchdRef(self.domain, self.label)

    def facts_needed(self) -> FactRequest:
        # The plist's own fact only when the cluster writes it (the task that writes it
        # asks for it too: one fact); otherwise nothing here reads the file.
        files = frozenset() if self.written_sha256 is None else frozenset({self.plist})
        return FactRequest(files=files, launchd=frozenset({self.ref}))

    def diff(self, facts: HostFacts) -> Change | None:
        job = facts.job(self.ref)
        bootstrap = LaunchdBootstrap(self.domain, self.label, self.plist)
        if job.state is JobState.NOT_LOADED:
            return Change(self.id, Action.CREATE, (FieldChange("state", "not_loaded", "loaded"),),
                          (bootstrap,), cleanup=self.cleanup())
        if self.id in facts.pending:
            fields: tuple[FieldChange, ...] = (
                FieldChange("reload", None, "an earlier run stopped before it was done"),)
            return Change(self.id, Action.UPDATE, fields, (bootstrap,), cleanup=self.cleanup())
        sha = self.written_sha256
        if sha is None:
            return None
        on_host = facts.file(self.plist)
        if on_host.kind is FileKind.FILE and on_host.sha256 == sha:
            return None
        fields = (FieldChange("plist", on_host.sha256, sha),
                  FieldChange("reload", None, "after the plist is written"))
        return Change(self.id, Action.UPDATE, fields, (bootstrap,), cleanup=self.cleanup())

    def cleanup(self) -> tuple[Step, ...]:
        return (LaunchdBootout(self.domain, self.label),)
