"""Helpers every op shares: request checking, path expansion, atomic JSON files, probes.

Node-side, stdlib only, Python >= 3.9 (see agent.py for why). ``AgentError`` is the one
exception an op raises on purpose: the protocol turns it into ``{"error": message}``.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH100, PTH101, PTH103, PTH105, PTH108, PTH110, PTH111, PTH112, PTH113
# ruff: noqa: PTH117, PTH118, PTH120, PTH123
# Only what every session uses is imported at the top (os, sys; JSON through jsonc.py).
# hashlib, subprocess and the rest are imported inside the functions that need them, and
# typing only for the type checker: a no-op run's session (facts, lock, unlock) starts one
# interpreter per host, and at ~2-5 ms of CPU each, those imports were a third of its start.
import os
import sys

from .jsonc import dumps, loads

TYPE_CHECKING = False  # typing.TYPE_CHECKING, for the type checker alone (see above)
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    Request = dict[str, Any]
    Response = dict[str, Any]

CHUNK = 1 << 20  # large files are hashed and written in 1 MiB chunks


OUTPUT_TAIL = 64 * 1024  # command output kept per stream (the end is what explains failures)


# A file whose mtime is this close to "now" may still be written within the same timestamp tick,
# so its hash is reported but not cached (git's "racily clean" problem).
RACY_SECONDS = 1.0


CACHE_VERSION = 1


RUN_TIMEOUT = 600  # the `run` op's default; the controller waits this long plus a grace period


FALLBACK_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class AgentError(Exception):
    """A request the agent refuses or cannot carry out; reported as {"error": ...}."""


def orch_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".orch")


def expand(path: str) -> str:
    """Expand a leading ``~/`` (or a bare ``~``) with $HOME; nothing else is interpreted.

    On a simulated Mac (orch's test hosts and sandbox, whose login sets ORCH_HOST_ROOT) every
    other absolute path lives under that root, as it would on the Mac's own disk: the one place
    the agent knows it may not be on a real Mac, so tests never write the machine's /Library.
    """
    if path == "~" or path.startswith("~/"):
        return os.path.join(os.path.expanduser("~"), path[2:])
    root = os.environ.get("ORCH_HOST_ROOT")
    if root and os.path.isabs(path) and not (path + "/").startswith(root.rstrip("/") + "/"):
        return root.rstrip("/") + path
    return path


def fields(req: Request, required: tuple[str, ...], optional: dict[str, Any]) -> list[Any]:
    """Return the request's values in order (required, then optional); refuse unknown keys."""
    unknown = sorted(set(req) - set(required) - set(optional))
    if unknown:
        raise AgentError("unknown request keys: " + ", ".join(unknown))
    missing = [k for k in required if k not in req]
    if missing:
        raise AgentError("missing request keys: " + ", ".join(missing))
    return [req[k] for k in required] + [req.get(k, d) for k, d in optional.items()]


def check_argv(argv: Any, what: str) -> list[str]:
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise AgentError(what + " must be a non-empty list of strings")
    return argv


def which(name: str) -> str | None:
    """Find a tool on PATH, then in the system dirs (a non-login SSH PATH may lack sbin)."""
    found = which_on(name, os.environ.get("PATH"))
    if found:
        return found
    return which_on(name, os.pathsep.join(FALLBACK_PATH))


def which_on(name: str, path: str | None) -> str | None:
    """``shutil.which(name, path=path)`` for a POSIX host, without importing shutil (~2 ms:
    it imports fnmatch, bz2, lzma, zlib): the first executable regular file of that name, in
    PATH order (an empty entry is the current directory); a name with a slash is only checked.
    """
    if os.path.dirname(name):
        return name if _runnable(name) else None
    if path is None:
        try:
            path = os.confstr("CS_PATH")
        except (AttributeError, ValueError):
            path = os.defpath
    if not path:
        return None
    seen = set()
    for directory in path.split(os.pathsep):
        if directory in seen:
            continue
        seen.add(directory)
        candidate = os.path.join(directory, name)
        if _runnable(candidate):
            return candidate
    return None


def _runnable(path: str) -> bool:
    return os.path.exists(path) and os.access(path, os.X_OK) and not os.path.isdir(path)


def capture(argv: list[str], timeout: float = 30.0, *, any_status: bool = False) -> str | None:
    """stdout of a quick probe, stripped; None when the tool is absent or fails (exits non-zero,
    unless `any_status`: a tool that reports some of its arguments as errors)."""
    tool = which(argv[0])
    if tool is None:
        return None
    from .spawn import TimedOut, run

    try:
        returncode, out = run([tool, *argv[1:]], timeout, capture=True)
    except (OSError, TimedOut):
        return None
    if returncode != 0 and not any_status:
        return None
    return out.decode("utf-8", "replace").strip() or None


def status_of(returncode: int) -> int:
    """Shell-style exit status: a signal N becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def tail(data: bytes) -> str:
    if len(data) > OUTPUT_TAIL:
        data = b"...[truncated]...\n" + data[-OUTPUT_TAIL:]
    return data.decode("utf-8", "replace")


def write_temp(path: str, chunks: Iterable[bytes], mode: int) -> tuple[str, str]:
    """Write chunks to a temp file beside path (same filesystem, so a rename is atomic), fsync
    and chmod it; return (sha256, temp path). The caller renames it into place or unlinks it."""
    import hashlib

    digest = hashlib.sha256()

    def hashed() -> Iterable[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    tmp = write_temp_plain(path, hashed(), mode)
    return digest.hexdigest(), tmp


def write_temp_plain(path: str, chunks: Iterable[bytes], mode: int) -> str:
    """`write_temp` without the hash (JSON state files: hashlib is ~3 ms to import)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = temp_beside(directory)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def temp_beside(directory: str) -> tuple[int, str]:
    """A new file ``.orch-<random>.tmp`` in directory, opened for writing, as
    ``tempfile.mkstemp`` makes one (O_EXCL, mode 0600, never through a symlink), without
    importing tempfile (~2 ms: it imports random, shutil, weakref)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, ".orch-" + os.urandom(6).hex() + ".tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def json_file(path: str, default: Any) -> Any:
    try:
        with open(path, "rb") as f:
            return loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return default


def dump_json_atomic(path: str, value: Any, mode: int = 0o600) -> bool:
    """Atomically replace path with value as JSON; False (and no write) when unchanged."""
    data = (dumps(value, indent=1) + "\n").encode("utf-8")
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except FileNotFoundError:
        pass
    os.replace(write_temp_plain(path, [data], mode), path)
    return True


def run_status(argv: list[str], cwd: str | None, env: dict[str, str] | None, timeout: Any) -> int:
    """Exit status of a command whose output nobody reads (127 absent, 124 timed out)."""
    if cwd is None and env is None:  # a facts probe or guard: no subprocess import (spawn.py)
        from .spawn import TimedOut, run

        try:
            return status_of(run(argv, timeout)[0])
        except FileNotFoundError:
            return 127
        except PermissionError:
            return 126
        except TimedOut:
            return 124
    import subprocess

    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return 127
    except PermissionError:
        return 126
    except subprocess.TimeoutExpired:
        return 124
    return status_of(proc.returncode)


def own_version() -> str:
    """sha256 of what the controller shipped: the zip this runs from, or the zip beside the
    directory it runs from (``<id>/``, unpacked from ``<id>.pyz`` and compiled at upload, which
    records that sha256 in ``<id>/VERSION``: read, not computed, where it is); the
    version the controller passed when the sources were streamed (``STREAMED_VERSION`` on
    the package, set by the stream bootstrap); or, run from a source tree (tests,
    debugging), the hash of the entry point agent.py."""
    package = sys.modules.get(__package__ or "")
    streamed = getattr(package, "STREAMED_VERSION", None)
    if isinstance(streamed, str):
        return streamed
    container = os.path.dirname(os.path.abspath(__file__))
    try:  # the compiled directory: the sha256 the upload verified, kept beside the bytecode
        with open(os.path.join(container, "VERSION"), encoding="utf-8") as f:
            recorded = f.read().strip()
        if len(recorded) == 64:
            return recorded
    except (OSError, UnicodeDecodeError):
        pass
    if os.path.isfile(container):  # a zip is a file, not a directory
        shipped = container
    elif os.path.isfile(container + ".pyz"):
        shipped = container + ".pyz"
    else:
        shipped = os.path.join(container, "agent.py")
    import hashlib

    digest = hashlib.sha256()
    with open(shipped, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def string_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AgentError(what + " must be a list of strings")
    return value


def check_mode(mode: Any) -> int:
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise AgentError("mode must be an int between 0 and 0o7777")
    return mode


def string_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise AgentError(what + " must map strings to strings")
    return value
