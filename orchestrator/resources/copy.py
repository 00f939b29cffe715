"""A `copy:` task: a controller file or directory on each node, byte for byte.

Compared by sha256, never by transferring: the node's side comes from the agent's facts (its
hash cache answers from (size, mtime, inode) without reading a converged file again), the
controller's side is hashed here in 1 MiB chunks. Only files that differ are sent, each as a
`write` whose payload is a `ControllerFile`: the plan holds the path and sha256, apply streams
the bytes in chunks (`executor.FileStream`) and the agent writes them to a temp file beside
the destination, checks the sha256 and renames (atomic). So a second apply of a converged copy
sends 0 bytes, and a multi-GB file is never whole in memory on either side.

A directory is copied file by file under `dest` (its subdirectories created as needed); files
already in `dest` that the source lacks are left alone, as Ansible's `copy` does. Removal
(through the managed record) removes exactly the files copied, then the directories they made
if empty.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from orchestrator.errors import PlanError
from orchestrator.facts import FactRequest, FileKind, HostFacts
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import ControllerFile, Remove, Rmdir, Step, Write

CHUNK = 1 << 20
MAX_FILES = 10000  # a copy is for what a node needs, not for a whole disk


@dataclass(frozen=True, order=True)
class SourceFile:
    """One controller file to copy: where it goes under the destination, its bytes' identity."""

    rel: str  # "" for a single-file copy; else the POSIX path under the source directory
    path: str  # absolute, on the controller
    size: int
    sha256: str


def sha256_file(path: Path) -> str:
    """The file's sha256, read in chunks; remembered for this process by (path, size, mtime,
    inode), since every host of a plan asks for the same source."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, _size: int, _mtime_ns: int, _inode: int) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(src: Path) -> tuple[SourceFile, ...]:
    """The files of `src` (a file, or every file under a directory), hashed in chunks.

    Symlinks are followed (their target's bytes are copied), as `cp -L` and Ansible do; a
    directory with more than MAX_FILES files is refused rather than planned."""
    try:
        if src.is_file():
            return (SourceFile("", str(src), src.stat().st_size, sha256_file(src)),)
        if not src.is_dir():
            raise PlanError(f"copy source {src} is neither a file nor a directory")
        found: list[SourceFile] = []
        for path in sorted(src.rglob("*")):
            if path.is_file():
                if len(found) >= MAX_FILES:
                    raise PlanError(f"copy source {src} has more than {MAX_FILES} files")
                found.append(SourceFile(path.relative_to(src).as_posix(), str(path),
                                        path.stat().st_size, sha256_file(path)))
        return tuple(found)
    except OSError as exc:
        raise PlanError(f"copy source {src} cannot be read: {exc}") from exc


@dataclass(frozen=True)
class Copy:
    """`dest` on the node holds the controller's `files` with `mode`."""

    dest: str
    files: tuple[SourceFile, ...]
    mode: int = 0o644
    directory: bool = False  # the source was a directory: files go under dest

    @classmethod
    def of(cls, src: Path, dest: str, mode: int) -> Copy:
        return cls(dest.rstrip("/") or "/", source_files(src), mode, src.is_dir())

    @property
    def id(self) -> str:
        return f"copy:{self.dest}"

    def _node_path(self, file: SourceFile) -> str:
        return f"{self.dest}/{file.rel}" if self.directory else self.dest

    def facts_needed(self) -> FactRequest:
        return FactRequest(files=frozenset(self._node_path(f) for f in self.files))

    def diff(self, facts: HostFacts) -> Change | None:
        """Only the files whose sha256 or mode differ are written; the fields say how many
        and how many bytes travel (a binary-safe summary: contents are never in the plan)."""
        stale: list[SourceFile] = []
        for file in self.files:
            fact = facts.file(self._node_path(file))
            if fact.kind is not FileKind.FILE or fact.sha256 != file.sha256 \
                    or fact.mode != self.mode:
                stale.append(file)
        if not stale:
            return None
        present = [f for f in self.files
                   if facts.file(self._node_path(f)).kind is not FileKind.MISSING]
        action = Action.CREATE if not present else Action.UPDATE
        total, sending = len(self.files), sum(f.size for f in stale)
        fields = [FieldChange("files", f"{total - len(stale)} of {total} match",
                              f"{total} match (send {len(stale)}, {_bytes(sending)})")]
        if not self.directory:
            fact = facts.file(self.dest)
            fields = [FieldChange("sha256", fact.sha256, self.files[0].sha256),
                      FieldChange("size", fact.size, self.files[0].size)]
            if fact.mode != self.mode:
                fields.append(FieldChange("mode", _octal(fact.mode), _octal(self.mode)))
        steps = tuple(Write(self._node_path(f), self.mode, ControllerFile(f.path, f.sha256))
                      for f in stale)
        return Change(self.id, action, tuple(fields), steps, cleanup=self.cleanup())

    def cleanup(self) -> tuple[Step, ...]:
        removals: list[Step] = [Remove(self._node_path(f)) for f in self.files]
        if self.directory:
            parents = {str(PurePosixPath(f.rel).parent) for f in self.files} - {"."}
            nested = {str(p) for d in parents for p in PurePosixPath(d).parents} - {"."}
            for rel in sorted(parents | nested, key=lambda d: (-d.count("/"), d)):
                removals.append(Rmdir(f"{self.dest}/{rel}"))
            removals.append(Rmdir(self.dest))
        return tuple(removals)


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _octal(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:04o}"
