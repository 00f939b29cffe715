"""A node's model files: every file it needs present and verified, and no stray weight file.

`ModelFiles` asks the facts for every file of the revision (not only the node's own): a node
holding a verified copy of a file it no longer needs — after a placement change — is still a
LAN source for it (`verified`). The hashes come from the agent's (size, mtime, inode) cache, so
facts for a converged node read no file data.

The diff is one change listing the files that are missing or whose sha256 differs, with one
`Fetch` step per file. A fetch step's ``source`` is None here; the planner fills it in for the
whole cluster at once (`orchestrator.plan.sources.assign_sources`), because which node a file
comes from depends on every other node.

Files in the directory that are not declared:

* weight files named like mlx-lm's loader glob (``model*.safetensors``) that are not files of
  this revision are removed (a ``prune`` step, reported as ``stray_weight_files``): mlx-lm loads
  every match, and another revision's tensors would silently replace verified ones;
* this revision's files the node does not need are kept: their tensors belong to other ranks'
  layers, which mlx-lm's pipeline drops, and they make the node a source for its peers;
* anything else (README, ``.orch-verified/`` stamps the worker writes, ``*.partial`` downloads
  to resume) is left alone.

When the resource is no longer declared (the node leaves the cluster) nothing is deleted: the
files stay and keep serving peers (declare ``ModelFiles(..., needed=frozenset())`` for such a
node so the planner sees what it holds). Freeing the disk is a deliberate user action.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.facts import FactRequest, FileKind, Guard, HostFacts
from orchestrator.model.manifest import WEIGHT_GLOB, Manifest, needed_files
from orchestrator.resources.base import Action, Change, FieldChange, Resource
from orchestrator.resources.steps import Fetch, Prune, Remove, Step

__all__ = ["STRAY_GUARD_SCRIPT", "ModelFiles", "model_files_by_host",
           "model_files_in"]

# sh -c STRAY_GUARD_SCRIPT sh DIR KEEP...: exit 0 when DIR holds a `model*.safetensors` (file or
# link) whose name is not one of KEEP, 1 otherwise. A guard only reports an exit status, so the
# plan says "present" and the prune step finds the names itself.
STRAY_GUARD_SCRIPT = (
    'case "$1" in "~/"*) d="$HOME/${1#"~/"}" ;; *) d="$1" ;; esac; shift; '
    f'for f in "$d"/{WEIGHT_GLOB}; do '
    'if [ -L "$f" ] || [ -f "$f" ]; then :; else continue; fi; n="${f##*/}"; '
    'for k in "$@"; do [ "$n" = "$k" ] && continue 2; done; exit 0; done; exit 1'
)


@dataclass(frozen=True)
class ModelFiles:
    """``needed`` files of ``manifest`` verified in ``directory`` (HOME-relative, ``~/...``)."""

    directory: str
    manifest: Manifest
    needed: frozenset[str]

    def __post_init__(self) -> None:
        if not self.directory.startswith("~/") or self.directory.rstrip("/") == "~":
            raise ValueError(f"model directory must be under HOME (~/...), not {self.directory!r}")
        object.__setattr__(self, "directory", self.directory.rstrip("/"))
        object.__setattr__(self, "needed", frozenset(self.needed))
        unknown = sorted(r for r in self.needed
                         if r not in self.manifest.files or self.manifest.files[r].sha256 is None)
        if unknown:
            raise ValueError(f"needed files not in the manifest (or without sha256): {unknown}")

    @property
    def id(self) -> str:
        return f"model_files:{self.directory}"

    def path(self, rel: str) -> str:
        return f"{self.directory}/{rel}"

    @property
    def stray_guard(self) -> Guard:
        keep = sorted(rel for rel in self.manifest.files
                      if "/" not in rel and fnmatch.fnmatchcase(rel, WEIGHT_GLOB))
        return Guard(f"model-strays:{self.directory}",
                     ("sh", "-c", STRAY_GUARD_SCRIPT, "sh", self.directory, *keep))

    def facts_needed(self) -> FactRequest:
        files = {self.path(rel) for rel, e in self.manifest.files.items() if e.sha256}
        return FactRequest(files=frozenset(files), guards=frozenset({self.stray_guard}),
                           disk=frozenset({self.directory}))

    def bytes_to_fetch(self, facts: HostFacts) -> int:
        """Bytes of the needed files this host does not hold verified: the disk it needs."""
        return self.manifest.bytes_of(self.needed - self.verified(facts))

    def verified(self, facts: HostFacts) -> frozenset[str]:
        """The revision's files this host holds verified (needed or not): what it can serve."""
        held = set()
        for rel, entry in self.manifest.files.items():
            fact = facts.files.get(self.path(rel))
            if (fact is not None and fact.kind is FileKind.FILE and entry.sha256 is not None
                    and fact.sha256 == entry.sha256 and fact.size == entry.size):
                held.add(rel)
        return frozenset(held)

    def diff(self, facts: HostFacts) -> Change | None:
        held = self.verified(facts)
        fields: list[FieldChange] = []
        steps: list[Step] = []
        present = 0
        for rel in sorted(self.needed - held):
            entry = self.manifest.files[rel]
            fact = facts.file(self.path(rel))
            if fact.kind is FileKind.MISSING:
                before = None
            else:
                present += 1
                before = fact.sha256 if fact.kind is FileKind.FILE else fact.kind.value
            if fact.kind in (FileKind.DIR, FileKind.OTHER):
                steps.append(Remove(self.path(rel)))
            fields.append(FieldChange(rel, before, entry.sha256))
            steps.append(self.fetch_step(rel))
        strays = facts.guards.get(self.stray_guard.id) == 0
        if strays:
            fields.append(FieldChange("stray_weight_files", "present", "none"))
            steps.insert(0, Prune(self.directory, self.stray_guard.argv[5:], WEIGHT_GLOB))
        if not fields:
            return None
        total = len(self.needed)
        ok = len(self.needed & held)
        summary = FieldChange("verified", f"{ok} of {total} files", f"{total} of {total} files")
        action = Action.CREATE if ok == 0 and present == 0 and not strays else Action.UPDATE
        return Change(self.id, action, (summary, *fields), tuple(steps), cleanup=self.cleanup())

    def fetch_step(self, rel: str) -> Fetch:
        entry = self.manifest.files[rel]
        assert entry.sha256 is not None  # checked for every needed file in __post_init__
        return Fetch(self.path(rel), rel, entry.size, entry.sha256, entry.git_sha1)

    def cleanup(self) -> tuple[Step, ...]:
        # Kept on purpose (see the module docstring): a node that leaves still serves peers.
        return ()


def model_files_by_host(manifest: Manifest, directory: str,
                        weight_files: Mapping[str, Sequence[str]],
                        holders: Iterable[str] = ()) -> dict[str, ModelFiles]:
    """One `ModelFiles` per serving host (``weight_files``: host -> placement's files for its
    rank), and a fetch-nothing one per host in ``holders`` (e.g. drained), so the planner
    knows what they can serve."""
    result = {host: ModelFiles(directory, manifest, needed_files(manifest, files))
              for host, files in weight_files.items()}
    for host in holders:
        result.setdefault(host, ModelFiles(directory, manifest, frozenset()))
    return result


def model_files_in(desired: Mapping[str, Sequence[Resource]]) -> ModelFiles | None:
    """The cluster's `ModelFiles` (one directory and manifest for every host), if declared."""
    found = {(r.directory, r.manifest.origin): r for resources in desired.values()
             for r in resources if isinstance(r, ModelFiles)}
    if len(found) > 1:
        raise ValueError(f"hosts declare different model directories or revisions: "
                         f"{sorted(d for d, _ in found)}")
    return next(iter(found.values()), None)
