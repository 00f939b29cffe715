"""The controller's caches: hashes of local model files, and small files fetched from the Hub.

Both live under ``$XDG_CACHE_HOME/orch`` (default ``~/.cache/orch``):

* ``hashes.json`` — sha256 of local files keyed by (realpath, size, mtime_ns, inode), the same
  key and "racily clean" rule as the agent's cache, so an unchanged ``model.path`` is hashed
  once, ever;
* ``blobs/<git blob id>`` — small files kept in git (config, tokenizer, index), fetched once
  with the agent's own resumable, verified `transfer.fetch` (run here on the controller). Named
  by their content's id, so a blob is never stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.agent import transfer
from orchestrator.errors import ModelError

__all__ = ["HashStore", "cache_dir", "fetch_blob", "sha256_file"]

CHUNK = 1 << 20
RACY_SECONDS = 1.0
VERSION = 1


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "orch"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashStore:
    """sha256 by (realpath, size, mtime_ns, inode), persisted as JSON; corrupt means empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        self.bytes_hashed = 0
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            raw = {}
        if isinstance(raw, dict) and raw.get("version") == VERSION and \
                isinstance(raw.get("entries"), dict):
            self.entries = raw["entries"]

    def sha256(self, path: Path) -> str:
        real = str(path.resolve())
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(real)
        if isinstance(entry, list) and entry[:3] == key:
            return str(entry[3])
        started = time.time()
        sha = sha256_file(path)
        self.bytes_hashed += st.st_size
        after = path.stat()
        if [after.st_size, after.st_mtime_ns, after.st_ino] == key and \
                st.st_mtime < started - RACY_SECONDS:
            self.entries[real] = [*key, sha]
            self.dirty = True
        return sha

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": VERSION, "entries": self.entries}))
        tmp.replace(self.path)
        self.dirty = False


def fetch_blob(url: str, cache: Path, git_sha1: str, size: int, token: str | None, *,
               what: str) -> Path:
    """``cache/blobs/<git_sha1>``, fetched from ``url`` unless already there."""
    dest = cache / "blobs" / git_sha1
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        transfer.fetch(url, str(dest), sha256=None, size=size, git_sha1=git_sha1,
                       headers=headers)
    except transfer.TransferError as exc:  # the message never holds the token
        raise ModelError(f"cannot fetch {what} from the Hub: {exc}") from None
    return dest
