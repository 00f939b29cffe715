"""The model revision's files, with the hashes that prove a copy, and which of them a node needs.

`Manifest` is pure data: every file of one pinned revision (``{relpath: Entry}``) and where the
bytes come from (`HubOrigin`: endpoint, repository, commit sha; or `LocalOrigin`: the
controller's ``model.path``). Every file a node may need carries a sha256: LFS files have it in
the Hub's tree (the LFS oid); small files kept in git have only a git blob id there, so the
loader fetches them once to the controller (verified against that id, cached by it) and hashes
them — those copies (`Manifest.controller_copies`) are then also the seed the nodes get them
from, so they still leave the Hub once.

Which files a node needs (`needed_files`) — the rule, in one place:

* the weight files placement lists for its rank (exactly what ``mlx_lm.utils.sharded_load``
  reads for those layers), and
* every file matching mlx-lm's own non-weight download patterns (`METADATA_PATTERNS`:
  ``*.json`` — config, index, tokenizer, generation config —, ``*.txt``, ``*.jinja`` chat
  templates, ``tokenizer.model``, ``*.tiktoken``, ``*.jsonl``, ``*.py``), matched the way
  huggingface_hub matches ``allow_patterns`` (fnmatch on the relative path).

Nothing else: not other ranks' weights, not README or ``.gitattributes``, not ``*.bin`` or
``original/`` checkpoints that mlx-lm never reads.

The loaders (`hub_manifest`, `local_manifest`) are the I/O edge; they run on the controller.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from orchestrator.errors import ModelError

if TYPE_CHECKING:
    from orchestrator.model.hub import HubClient

__all__ = [
    "METADATA_PATTERNS",
    "WEIGHT_GLOB",
    "Entry",
    "HubOrigin",
    "LocalOrigin",
    "Manifest",
    "SeedKind",
    "hub_manifest",
    "is_metadata",
    "local_manifest",
    "needed_files",
]

# mlx_lm.utils.DEFAULT_ALLOW_PATTERNS (mlx-lm 0.32.2) without its weight pattern.
METADATA_PATTERNS = ("*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
                     "*.txt", "*.jsonl", "*.jinja")
# What mlx-lm's loader globs in the model directory: every match is loaded (see ModelFiles).
WEIGHT_GLOB = "model*.safetensors"
_SHA1 = re.compile(r"[0-9a-f]{40}")

SeedKind = Literal["hub", "local"]


@dataclass(frozen=True)
class Entry:
    """One file of the revision. ``sha256`` is None only for files no node ever needs."""

    size: int
    sha256: str | None
    git_sha1: str | None = None  # the content's git blob id (files kept in git, not LFS)

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "sha256": self.sha256, "git_sha1": self.git_sha1}


@dataclass(frozen=True)
class HubOrigin:
    endpoint: str
    repo: str
    commit: str  # pinned: the files are those of this commit, whatever the branch does later

    def describe(self) -> str:
        return f"{self.repo}@{self.commit[:12]}"


@dataclass(frozen=True)
class LocalOrigin:
    directory: Path  # on the controller

    def describe(self) -> str:
        return str(self.directory)


@dataclass(frozen=True)
class Manifest:
    """Every file of one model revision, and where the first copy of each comes from."""

    origin: HubOrigin | LocalOrigin
    files: Mapping[str, Entry]
    # Files the controller holds verified (all of a local model; a Hub model's small git
    # files): their seed copy is streamed from the controller, never fetched from the Hub.
    controller_copies: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(sorted(self.files.items()))))
        object.__setattr__(self, "controller_copies",
                           MappingProxyType(dict(sorted(self.controller_copies.items()))))
        for rel in self.files:
            if rel.startswith("/") or ".." in rel.split("/") or not rel:
                raise ValueError(f"manifest path {rel!r} is outside the model directory")

    def seed_kind(self, rel: str) -> SeedKind:
        """Where the one copy that leaves the origin comes from: the controller or the Hub."""
        return "local" if rel in self.controller_copies else "hub"

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def bytes_of(self, rels: Iterable[str]) -> int:
        return sum(self.files[r].size for r in rels)


def is_metadata(rel: str) -> bool:
    """A non-weight file every node needs (see the module docstring)."""
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in METADATA_PATTERNS)


def needed_files(manifest: Manifest, weight_files: Iterable[str]) -> frozenset[str]:
    """The files one node must hold: its rank's weight files (from placement) and metadata."""
    weights = set(weight_files)
    unknown = sorted(weights - set(manifest.files))
    if unknown:
        raise ModelError(f"{manifest.origin.describe()}: placement needs files the revision "
                         f"does not have: {', '.join(unknown[:10])}")
    wanted = weights | {rel for rel in manifest.files if is_metadata(rel)}
    unhashed = sorted(rel for rel in wanted if manifest.files[rel].sha256 is None)
    if unhashed:
        raise ModelError(f"{manifest.origin.describe()}: no sha256 for {', '.join(unhashed)}")
    return frozenset(wanted)


# ------------------------------------------------------------------------------------ loaders
# The loaders import the Hub client and the hash cache themselves: every plan reads a
# manifest's types, only a cluster that serves a model builds one (urllib, http.client and
# email are a noticeable part of a run's startup otherwise).


def hub_manifest(client: HubClient, repo: str, revision: str | None, *,
                 cache: Path) -> Manifest:
    """The revision's file list from the tree API, pinned to its commit sha.

    Small files kept in git (the tree gives no sha256 for them) that nodes need are fetched
    once into ``cache/blobs/<git blob id>`` (verified against it, resumable) and hashed.
    """
    from orchestrator.model.cache import fetch_blob, sha256_file

    wanted = revision or "main"
    commit = wanted if _SHA1.fullmatch(wanted) else client.revision_sha(repo, wanted)
    files: dict[str, Entry] = {}
    copies: dict[str, Path] = {}
    for rel, hub_file in sorted(client.tree(repo, commit).items()):
        if hub_file.sha256 is not None:  # an LFS file: the tree has its sha256
            files[rel] = Entry(hub_file.size, hub_file.sha256)
            continue
        sha256 = None
        if is_metadata(rel):
            if hub_file.git_sha1 is None:
                raise ModelError(f"{repo}@{commit}: the Hub's tree gives no hash for {rel}")
            blob = fetch_blob(client.resolve_url(repo, commit, rel), cache, hub_file.git_sha1,
                              hub_file.size, client.token, what=f"{repo}/{rel}")
            sha256 = sha256_file(blob)
            copies[rel] = blob
        files[rel] = Entry(hub_file.size, sha256, hub_file.git_sha1)
    if not files:
        raise ModelError(f"{repo}@{commit}: the repository has no files")
    return Manifest(HubOrigin(client.endpoint, repo, commit), files, copies)


def local_manifest(directory: Path, *, cache: Path) -> Manifest:
    """Every file under ``directory`` (hidden names skipped), hashed on the controller.

    Hashes are kept in ``cache/hashes.json`` keyed by (path, size, mtime_ns, inode), so a
    directory hashed once is never read again while it is unchanged.
    """
    from orchestrator.model.cache import HashStore

    root = Path(directory).expanduser().absolute()
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist")
    store = HashStore(cache / "hashes.json")
    files: dict[str, Entry] = {}
    copies: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not path.is_file():
            continue
        files[rel] = Entry(path.stat().st_size, store.sha256(path))
        copies[rel] = path
    store.save()
    if not files:
        raise ModelError(f"model directory {root} is empty")
    return Manifest(LocalOrigin(root), files, copies)


def model_directory(runtime_dir: str, name: str) -> str:
    """``~/<runtime dir>/models/<name>``; ``name`` from a repo id (``org/model`` becomes
    ``org--model``, as the Hub's own cache names it) or a local directory's name."""
    safe = name.strip("/").replace("/", "--")
    if not safe or safe.startswith("."):
        raise ValueError(f"bad model name {name!r}")
    return "/".join(["~", runtime_dir.strip("/"), "models", safe])
