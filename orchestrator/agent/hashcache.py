"""The persistent sha256 cache: (path, size, mtime_ns, inode) -> sha256.

Why: the model files are hundreds of GB; a converged ``facts`` call must read no file data.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH103
# ruff: noqa: PTH116, PTH118, PTH123
import os
import stat
import time

from .common import CACHE_VERSION, CHUNK, RACY_SECONDS, dump_json_atomic, json_file, orch_dir

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import Any


class HashCache:
    """sha256 of files keyed by (path, size, mtime_ns, inode), persisted across runs.

    Why: the model files are hundreds of GB; a converged facts call must read no file data.
    Several agents may run at once on a node (concurrent fetches), so `save` merges this
    process's own changes into the file under a lock instead of overwriting others' entries.
    """

    def __init__(self) -> None:
        self.path = os.path.join(orch_dir(), "hashcache.json")
        self.entries: dict[str, list[Any]] = {}
        self.changes: dict[str, list[Any] | None] = {}  # what this process recorded or forgot
        self.dirty = False
        self.files_hashed = 0
        self.bytes_hashed = 0
        self.hits = 0
        try:
            raw = json_file(self.path, {})
        except ValueError:
            raw = {}  # a corrupt cache only costs re-hashing
        if isinstance(raw, dict) and raw.get("version") == CACHE_VERSION:
            entries = raw.get("entries")
            if isinstance(entries, dict):
                self.entries = entries

    @staticmethod
    def key(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def sha256(self, path: str, st: os.stat_result) -> str:
        real = os.path.realpath(path)
        entry = self.entries.get(real)
        if entry is not None and entry[:3] == self.key(st):
            self.hits += 1
            return str(entry[3])
        import hashlib  # here: a converged facts call hashes nothing (~3 ms to import)

        started = time.time()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                self.bytes_hashed += len(chunk)
        self.files_hashed += 1
        sha = digest.hexdigest()
        after = os.stat(path)
        if self.key(after) == self.key(st) and st.st_mtime < started - RACY_SECONDS:
            self.record(real, st, sha)
        else:
            self.forget(real)
        return sha

    def record(self, real: str, st: os.stat_result, sha: str) -> None:
        self.entries[real] = self.changes[real] = [*self.key(st), sha]
        self.dirty = True

    def forget(self, real: str) -> None:
        if self.entries.pop(real, None) is not None:
            self.changes[real] = None
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        import fcntl

        os.makedirs(orch_dir(), mode=0o700, exist_ok=True)
        with open(self.path + ".lock", "ab") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
            try:
                raw = json_file(self.path, {})
            except ValueError:
                raw = {}
            current = raw.get("entries") if isinstance(raw, dict) and \
                raw.get("version") == CACHE_VERSION else None
            entries = dict(current) if isinstance(current, dict) else {}
            for real, entry in self.changes.items():
                if entry is None:
                    entries.pop(real, None)
                else:
                    entries[real] = entry
            dump_json_atomic(self.path, {"version": CACHE_VERSION, "entries": entries})
        self.changes.clear()
        self.dirty = False

    def counters(self) -> dict[str, int]:
        return {
            "files_hashed": self.files_hashed,
            "bytes_hashed": self.bytes_hashed,
            "hash_cache_hits": self.hits,
        }


def cached_sha256(cache: HashCache, full: str) -> str | None:
    """The file's sha256 if the hash cache vouches for it as it is now; never reads data."""
    try:
        st = os.stat(full)
    except OSError:
        return None
    entry = cache.entries.get(os.path.realpath(full))
    if stat.S_ISREG(st.st_mode) and entry is not None and entry[:3] == cache.key(st):
        return str(entry[3])
    return None
