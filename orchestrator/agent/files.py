"""File ops: write (atomic, verified), mkdir, remove, rmdir, read, prune, sizes, and the
root-owned install_system / remove_system (through ``sudo -n``, never as the agent itself).
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH100, PTH101, PTH103, PTH105, PTH106, PTH108, PTH111, PTH112
# ruff: noqa: PTH114, PTH202
# ruff: noqa: PTH116, PTH118, PTH123, PTH208
import errno
import fnmatch
import os
import shutil
import stat
import subprocess

from .common import CHUNK, AgentError, check_mode, expand, fields, string_list, write_temp
from .hashcache import HashCache

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import IO, Any

    from .common import Request, Response


def op_install_system(req: Request, _stdin: IO[bytes]) -> Response:
    """Copy a staged file to a root-owned location (e.g. /Library/LaunchDaemons) with sudo -n.

    The file is staged as the user first (op write, verified), then copied by root: the agent
    itself never runs as root, and sudo never prompts (-n) so a missing NOPASSWD rule fails fast.
    """
    src, dest, mode = fields(req, ("src", "dest", "mode"), {})
    mode = check_mode(mode)
    for argv in (["sudo", "-n", "/bin/cp", expand(str(src)), expand(str(dest))],
                 ["sudo", "-n", "/bin/chmod", format(mode, "o"), expand(str(dest))]):
        proc = subprocess.run(argv, capture_output=True, check=False, timeout=60)
        if proc.returncode != 0:
            raise AgentError(f"{' '.join(argv[2:3])} {dest} as root failed: "
                             + proc.stderr.decode("utf-8", "replace").strip()[-500:])
    return {"changed": True}


def op_remove_system(req: Request, _stdin: IO[bytes]) -> Response:
    """Remove a root-owned file (the counterpart of install_system); missing is fine."""
    (path,) = fields(req, ("path",), {})
    full = expand(str(path))
    if not os.path.lexists(full):
        return {"changed": False}
    proc = subprocess.run(["sudo", "-n", "/bin/rm", "-f", full], capture_output=True,
                          check=False, timeout=60)
    if proc.returncode != 0:
        raise AgentError(f"rm {path} as root failed: "
                         + proc.stderr.decode("utf-8", "replace").strip()[-500:])
    return {"changed": True}


def stdin_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        yield chunk


def op_write(req: Request, stdin: IO[bytes]) -> Response:
    """Write stdin's bytes to path atomically, verified against the expected sha256.

    Read and hashed a chunk at a time, whatever the size. ``timeout`` is the controller's:
    how long it waits for a large file (ignored here)."""
    path, mode, expected, _timeout = fields(req, ("path", "mode", "sha256"), {"timeout": None})
    full = expand(str(path))
    mode = check_mode(mode)
    digest, tmp = write_temp(full, stdin_chunks(stdin), mode)
    if digest != expected:
        os.unlink(tmp)
        raise AgentError(f"sha256 mismatch writing {path}: got {digest}, expected {expected}")
    cache = HashCache()
    try:
        st = os.stat(full)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        os.unlink(tmp)
        raise AgentError(f"{path} is a directory")
    same = st is not None and stat.S_ISREG(st.st_mode) and cache.sha256(full, st) == digest
    if same and st is not None and stat.S_IMODE(st.st_mode) == mode:
        os.unlink(tmp)
        cache.save()
        return {"sha256": digest, "changed": False}
    os.replace(tmp, full)
    cache.record(os.path.realpath(full), os.stat(full), digest)
    cache.save()
    return {"sha256": digest, "changed": True}


def op_mkdir(req: Request, _stdin: IO[bytes]) -> Response:
    path, mode = fields(req, ("path", "mode"), {})
    full = expand(str(path))
    mode = check_mode(mode)
    if os.path.isdir(full):
        if stat.S_IMODE(os.stat(full).st_mode) == mode:
            return {"changed": False}
    elif os.path.lexists(full):
        raise AgentError(f"{path} exists and is not a directory")
    else:
        os.makedirs(full, exist_ok=True)
    os.chmod(full, mode)
    return {"changed": True}


def op_remove(req: Request, _stdin: IO[bytes]) -> Response:
    (path,) = fields(req, ("path",), {})
    full = os.path.abspath(expand(str(path)))
    home = os.path.realpath(os.path.expanduser("~"))
    if os.path.realpath(full) in ("/", home) or full in ("/", home):
        raise AgentError(f"refusing to remove {path}")
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)
    elif os.path.lexists(full):
        os.unlink(full)
    else:
        return {"changed": False}
    return {"changed": True}


def op_rmdir(req: Request, _stdin: IO[bytes]) -> Response:
    """Remove a directory only if it is empty: what is inside may be the user's, not orch's.

    Never an error when the directory is gone, not empty, or not a directory; `kept` says why
    nothing was removed."""
    (path,) = fields(req, ("path",), {})
    full = expand(str(path))
    if not os.path.lexists(full):
        return {"changed": False, "kept": None}
    if os.path.islink(full) or not os.path.isdir(full):
        return {"changed": False, "kept": "not a directory"}
    try:
        os.rmdir(full)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return {"changed": False, "kept": "not empty"}
        raise
    return {"changed": True, "kept": None}


def op_read(req: Request, _stdin: IO[bytes]) -> Response:
    """Small text files' content, for `plan --diff` (asked only for files the plan changes)."""
    paths, limit = fields(req, ("paths",), {"max_bytes": 256 * 1024})
    result: dict[str, Any] = {}
    for path in string_list(paths, "paths"):
        full = expand(path)
        try:
            if os.path.getsize(full) > int(limit):
                result[path] = None
                continue
            with open(full, "rb") as f:
                result[path] = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            result[path] = None
    return {"contents": result}


def op_prune(req: Request, _stdin: IO[bytes]) -> Response:
    """Remove the files directly in ``path`` whose names match ``pattern`` (fnmatch) and are
    not in ``keep``: e.g. weight files of another revision, which mlx-lm's
    ``model*.safetensors`` glob would load over the verified ones."""
    path, keep, pattern = fields(req, ("path", "keep", "pattern"), {})
    directory = expand(str(path))
    kept = set(string_list(keep, "keep"))
    if not isinstance(pattern, str) or "/" in pattern:
        raise AgentError("pattern must be a file name pattern")
    removed: list[str] = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            full = os.path.join(directory, name)
            if (name in kept or name.startswith(".") or not fnmatch.fnmatchcase(name, pattern)
                    or (os.path.isdir(full) and not os.path.islink(full))):
                continue
            os.unlink(full)
            removed.append(name)
    return {"changed": bool(removed), "removed": removed}


def op_sizes(req: Request, _stdin: IO[bytes]) -> Response:
    """Sizes of files, read from stat alone (no content): how far partial downloads are."""
    (paths,) = fields(req, ("paths",), {})
    sizes: dict[str, int | None] = {}
    for path in string_list(paths, "paths"):
        try:
            sizes[path] = os.stat(expand(path)).st_size
        except OSError:
            sizes[path] = None
    return {"sizes": sizes}
