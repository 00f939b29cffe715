"""A local directory seen as a Hub model repository: the hashes and JSON the Hub would give.

The Hub stores big files with git LFS: the git blob is a small pointer text and the tree API
reports both the blob's SHA-1 (``oid``) and the content's sha256 (``lfs.oid``). Small files are
plain git blobs, so their only hash is the blob SHA-1. `index_repo` computes all of these for
real (git blob, tree and LFS pointer formats), so a client verifying either kind of hash is
checked against what git and the Hub would compute.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What a model repository's .gitattributes typically sends to LFS, besides any file this big.
LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.npz",
    "*.onnx",
    "*.pt",
    "*.pth",
)
LFS_THRESHOLD = 10 * 2**20
LAST_MODIFIED = "2025-01-01T00:00:00.000Z"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RepoFile:
    """One file of a repository, with every hash the Hub reports for it."""

    path: str  # posix path inside the repository
    local: Path
    size: int
    sha256: str
    git_oid: str  # SHA-1 of the git blob: the content, or the LFS pointer for LFS files
    lfs_pointer_size: int | None  # None: a plain git file

    @property
    def lfs(self) -> bool:
        return self.lfs_pointer_size is not None

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "file",
            "oid": self.git_oid,
            "size": self.size,
            "path": self.path,
        }
        if self.lfs_pointer_size is not None:
            entry["lfs"] = {
                "oid": self.sha256,
                "size": self.size,
                "pointerSize": self.lfs_pointer_size,
            }
        return entry


@dataclass(frozen=True)
class Repo:
    """A repository pinned at one commit, reachable by its sha or any of its branch names."""

    repo_id: str
    commit: str
    branches: frozenset[str]
    files: Mapping[str, RepoFile]
    directories: Mapping[str, str]  # path -> git tree SHA-1

    def has_revision(self, revision: str) -> bool:
        return revision == self.commit or revision in self.branches

    def revision_json(self, *, blobs: bool, gated: bool) -> dict[str, Any]:
        siblings: list[dict[str, Any]] = []
        for f in sorted(self.files.values(), key=lambda f: f.path):
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {
                        "sha256": f.sha256,
                        "size": f.size,
                        "pointerSize": f.lfs_pointer_size,
                    }
            siblings.append(sibling)
        return {
            "_id": self.commit[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "sha": self.commit,
            "private": False,
            "gated": "manual" if gated else False,
            "disabled": False,
            "lastModified": LAST_MODIFIED,
            "siblings": siblings,
        }

    def tree_json(self, subpath: str, *, recursive: bool) -> list[dict[str, Any]] | None:
        """Entries under ``subpath`` ("" for the root); None when there is no such directory."""
        if subpath and subpath not in self.directories:
            return None
        prefix = subpath + "/" if subpath else ""
        entries: list[dict[str, Any]] = [
            {"type": "directory", "oid": oid, "size": 0, "path": path}
            for path, oid in self.directories.items()
            if path
        ]
        entries += [f.tree_entry() for f in self.files.values()]
        chosen = [
            e
            for e in entries
            if e["path"].startswith(prefix) and (recursive or "/" not in e["path"][len(prefix) :])
        ]
        return sorted(chosen, key=lambda e: str(e["path"]))


def index_repo(
    repo_id: str,
    directory: Path,
    branches: Iterable[str] = ("main",),
    *,
    lfs_threshold: int = LFS_THRESHOLD,
) -> Repo:
    """Hash every file under ``directory`` (skipping ``.git``) as the Hub would."""
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    files: dict[str, RepoFile] = {}
    for local in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = local.relative_to(directory).as_posix()
        if rel == ".git" or rel.startswith(".git/"):
            continue
        files[rel] = _index_file(rel, local, lfs_threshold)
    directories = _tree_oids(files)
    commit = _sha1(b"commit", f"tree {directories['']}\nrepo {repo_id}\n".encode())
    return Repo(
        repo_id=repo_id,
        commit=commit,
        branches=frozenset(branches),
        files=files,
        directories=directories,
    )


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer text (spec v1) that git stores in place of an LFS file."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    ).encode()


def _index_file(rel: str, local: Path, lfs_threshold: int) -> RepoFile:
    size = local.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode())  # noqa: S324 (git's object id, not security)
    with local.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    is_lfs = size >= lfs_threshold or any(fnmatch.fnmatch(Path(rel).name, p) for p in LFS_PATTERNS)
    if not is_lfs:
        return RepoFile(rel, local, size, sha256.hexdigest(), blob.hexdigest(), None)
    pointer = lfs_pointer(sha256.hexdigest(), size)
    return RepoFile(rel, local, size, sha256.hexdigest(), _sha1(b"blob", pointer), len(pointer))


def _sha1(kind: bytes, body: bytes) -> str:
    """A git object id: SHA-1 over ``<kind> <length>\\0<body>``."""
    header = kind + b" " + str(len(body)).encode() + b"\0"
    return hashlib.sha1(header + body).hexdigest()  # noqa: S324 (git's object id)


def _tree_oids(files: Mapping[str, RepoFile]) -> dict[str, str]:
    """Every directory's git tree id ("" is the root), computed bottom-up as git does."""
    children: dict[str, dict[str, tuple[bytes, str]]] = {"": {}}
    for path in files:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            children.setdefault("/".join(parts[:depth]), {})
    oids: dict[str, str] = {}
    for directory in sorted(children, key=lambda d: -d.count("/") - (1 if d else 0)):
        entries = dict(children[directory])
        prefix = directory + "/" if directory else ""
        for path, f in files.items():
            if path.startswith(prefix) and "/" not in path[len(prefix) :]:
                entries[path[len(prefix) :]] = (b"100644", f.git_oid)
        # git orders tree entries by name, comparing a directory's name as if it ended in "/".
        ordered = sorted(
            entries.items(), key=lambda kv: kv[0] + ("/" if kv[1][0] == b"40000" else "")
        )
        body = b"".join(
            mode + b" " + name.encode() + b"\0" + bytes.fromhex(oid)
            for name, (mode, oid) in ordered
        )
        oids[directory] = _sha1(b"tree", body)
        if directory:
            parent, _, name = directory.rpartition("/")
            children[parent][name] = (b"40000", oids[directory])
    return oids
