#!/usr/bin/env python3
"""orch agent: the only code orch runs on a node.

Shipped by the controller as a zip holding this file (as ``__main__.py``) and ``transfer.py``,
cached on the node as ``~/.orch/agent/<sha256-prefix>.pyz`` and run as ``python3 -I <that zip>
OP`` with a JSON request on the first line of stdin (for ``write``, the raw file bytes follow
that line). It prints exactly one JSON object on stdout and exits 0, or prints
``{"error": ...}`` and exits 1 (``serve`` may print blank lines before it: a heartbeat that
notices a controller gone away).

Why stdlib only, Python >= 3.9: the node's Python is whatever macOS or the user installed; the
agent must never need the controller's packages. Why ops instead of shell snippets: argv lists
and JSON never pass through a shell, so no value is ever shell syntax, and ``facts`` gathers
everything a plan needs in one SSH round trip. ``transfer`` is imported only by the ops that
move model bytes (``fetch``, ``serve``), so a read-only run can stream this file alone.

Every path in a request may start with ``~/``; it is expanded with ``$HOME`` on the node.
Requests are strict: an unknown key is an error, so controller/agent skew fails loudly.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH100, PTH101, PTH102, PTH103, PTH105, PTH106, PTH108, PTH111, PTH112, PTH113
# ruff: noqa: PTH110, PTH114, PTH119, PTH202
# ruff: noqa: PTH116, PTH117, PTH118, PTH120, PTH123, PTH208
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

CHUNK = 1 << 20  # large files are hashed and written in 1 MiB chunks
OUTPUT_TAIL = 64 * 1024  # command output kept per stream (the end is what explains failures)
# A file whose mtime is this close to "now" may still be written within the same timestamp tick,
# so its hash is reported but not cached (git's "racily clean" problem).
RACY_SECONDS = 1.0
CACHE_VERSION = 1
RUN_TIMEOUT = 600  # the `run` op's default; the controller waits this long plus a grace period
FALLBACK_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

Request = dict[str, Any]
Response = dict[str, Any]


class AgentError(Exception):
    """A request the agent refuses or cannot carry out; reported as {"error": ...}."""


# --------------------------------------------------------------------------------------- helpers


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
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(FALLBACK_PATH))


def capture(argv: list[str], timeout: float = 30.0) -> str | None:
    """stdout of a quick probe, stripped; None when the tool is absent or fails."""
    tool = which(argv[0])
    if tool is None:
        return None
    try:
        proc = subprocess.run(
            [tool, *argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", "replace").strip() or None


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
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".orch-", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        os.unlink(tmp)
        raise
    return digest.hexdigest(), tmp


def json_file(path: str, default: Any) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return default


def dump_json_atomic(path: str, value: Any, mode: int = 0o600) -> bool:
    """Atomically replace path with value as JSON; False (and no write) when unchanged."""
    data = (json.dumps(value, sort_keys=True, indent=1) + "\n").encode("utf-8")
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except FileNotFoundError:
        pass
    _, tmp = write_temp(path, [data], mode)
    os.replace(tmp, path)
    return True


# ---------------------------------------------------------------------------------- hash cache


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


# --------------------------------------------------------------------------------------- facts


def file_fact(path: str, cache: HashCache) -> dict[str, Any]:
    full = expand(path)
    try:
        st = os.stat(full)
    except FileNotFoundError:
        cache.forget(os.path.realpath(full))
        kind = "other" if os.path.islink(full) else "missing"  # a dangling link is not absent
        return {"kind": kind, "size": None, "mode": None, "sha256": None}
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        sha = cache.sha256(full, st)
        return {"kind": "file", "size": st.st_size, "mode": mode, "sha256": sha}
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "other"
    return {"kind": kind, "size": None, "mode": mode, "sha256": None}


def normalize_name(name: str) -> str:
    """PEP 503 normalization, so `MLX_LM` and `mlx-lm` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_metadata(path: str) -> tuple[str | None, str | None]:
    """Name and Version from a METADATA file's header (stops at the first blank line)."""
    name = version = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                break
            if line.startswith("Name:") and name is None:
                name = line[5:].strip()
            elif line.startswith("Version:") and version is None:
                version = line[8:].strip()
    return name, version


def venv_fact(directory: str) -> dict[str, Any]:
    """What is installed in a venv, read from dist-info METADATA: no subprocess, no pip."""
    root = expand(directory)
    cfg = os.path.join(root, "pyvenv.cfg")
    if not os.path.isfile(cfg):
        return {"exists": False, "python_version": None, "packages": {}}
    python_version = None
    with open(cfg, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition("=")
            if key.strip() in ("version", "version_info") and python_version is None:
                python_version = value.strip()
    packages: dict[str, str] = {}
    lib = os.path.join(root, "lib")
    libdirs = sorted(os.listdir(lib)) if os.path.isdir(lib) else []
    for libdir in libdirs:
        site = os.path.join(lib, libdir, "site-packages")
        if not libdir.startswith("python") or not os.path.isdir(site):
            continue
        for entry in sorted(os.listdir(site)):
            if not entry.endswith(".dist-info"):
                continue
            meta = os.path.join(site, entry, "METADATA")
            if not os.path.isfile(meta):
                continue
            name, version = read_metadata(meta)
            if name and version:
                packages[normalize_name(name)] = version
    return {"exists": True, "python_version": python_version, "packages": packages}


def parse_launchctl_print(text: str) -> dict[str, Any]:
    """Parse ``launchctl print <service>`` (not a stable format) into scalars and blocks.

    Only the service's own (depth-1) keys count: nested blocks such as ``endpoints`` carry their
    own ``state``/``active`` keys that must not leak. ``environment = { K => V }`` is kept.
    """
    scalars: dict[str, str] = {}
    blocks: dict[str, list[str]] = {}
    depth = 0
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.endswith("{"):
            depth += 1
            if depth == 2:
                current = blocks.setdefault(line[:-1].rstrip(" =").strip(), [])
            continue
        if line == "}":
            depth -= 1
            if depth < 2:
                current = None
            continue
        if depth == 1 and " = " in line:
            key, _, value = line.partition(" = ")
            scalars.setdefault(key.strip(), value.strip())
        elif depth == 2 and current is not None:
            current.append(line)
    return {"scalars": scalars, "blocks": blocks}


def launchd_job(text: str) -> dict[str, Any]:
    """A loaded job's state from its ``launchctl print`` text (``not_loaded`` when the text
    holds no service block: "Bad request. Could not find service ...")."""
    parsed = parse_launchctl_print(text)
    scalars: dict[str, str] = parsed["scalars"]
    if not scalars:
        return dict(NOT_LOADED)
    state = "running" if scalars.get("state") == "running" else "waiting"
    pid_text = scalars.get("pid", "")
    pid = int(pid_text) if pid_text.isdigit() else None
    exit_match = re.match(r"-?\d+", scalars.get("last exit code", ""))
    # "last terminating signal = Killed: 9": report it the way a shell would, 128 + N.
    signal_match = re.search(r":\s*(\d+)$", scalars.get("last terminating signal", ""))
    last_exit = int(exit_match.group(0)) if exit_match else None
    if signal_match:
        last_exit = 128 + int(signal_match.group(1))
    env: dict[str, str] = {}
    for line in parsed["blocks"].get("environment", []):
        key, sep, value = line.partition(" => ")
        if sep:
            env[key.strip()] = value.strip()
    return {
        "state": state,
        "pid": pid if state == "running" else None,
        "last_exit": last_exit,
        "env": env,
    }


NOT_LOADED: Response = {"state": "not_loaded", "pid": None, "last_exit": None, "env": {}}


def domain_target(domain: Any) -> str:
    if domain == "user":
        return f"user/{os.getuid()}"
    if domain == "system":
        return "system"
    raise AgentError(f"launchd domain must be 'user' or 'system', not {domain!r}")


def service_target(domain: Any, label: Any) -> str:
    if not isinstance(label, str) or not label or "/" in label:
        raise AgentError("launchd label must be a non-empty string without '/'")
    return domain_target(domain) + "/" + label


def launchctl(
    args: list[str], *, privileged: bool = False, timeout: float = 60.0
) -> subprocess.CompletedProcess[bytes]:
    """Run launchctl. System-domain changes always go through ``sudo -n``: it never prompts
    (a missing NOPASSWD rule fails instead of hanging), and it is harmless when already root."""
    tool = which("launchctl")
    if tool is None:
        raise AgentError("launchctl not found on this host")
    argv = [tool, *args]
    if privileged:
        argv = ["sudo", "-n", *argv]
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )


def launchd_print(target: str) -> str | None:
    proc = launchctl(["print", target])
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", "replace")


def launchd_fact(spec: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, dict):
        raise AgentError("launchd entries must be objects")
    domain, label = fields(spec, ("domain", "label"), {})
    text = launchd_print(service_target(domain, label))
    return f"{domain}/{label}", NOT_LOADED if text is None else launchd_job(text)


def guard_status(spec: Any) -> tuple[str, int]:
    if not isinstance(spec, dict):
        raise AgentError("guards must be objects")
    gid, argv, timeout = fields(spec, ("id", "argv"), {"timeout": 60})
    return str(gid), run_status(check_argv(argv, "guard argv"), None, None, timeout)


def run_status(argv: list[str], cwd: str | None, env: dict[str, str] | None, timeout: Any) -> int:
    """Exit status of a command whose output nobody reads (127 absent, 124 timed out)."""
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


def memory_bytes() -> int | None:
    """hw.memsize on macOS (or its test stand-in); MemTotal elsewhere."""
    value = capture(["sysctl", "-n", "hw.memsize"])
    if value and value.isdigit():
        return int(value)
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def own_version() -> str:
    """sha256 of what the controller shipped: the zip this runs from (``<zip>/__main__.py``);
    the version the controller passed when the source was streamed; or, run as a plain file
    (tests, debugging), that file's own hash."""
    streamed = globals().get("ORCH_AGENT_VERSION")  # set when run from stdin, not from a file
    if isinstance(streamed, str):
        return streamed
    here = os.path.abspath(__file__)
    container = os.path.dirname(here)
    shipped = container if os.path.isfile(container) else here  # a zip is a file, not a dir
    digest = hashlib.sha256()
    with open(shipped, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_transfer() -> Any:
    """The ``transfer`` module shipped beside this file (in the zip, or the source tree).

    Imported on first use only, so ``facts`` never pays for it and a streamed agent (which
    has no transfer.py) still answers every read-only op.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import importlib

    try:
        return importlib.import_module("transfer")
    except ImportError:
        raise AgentError("this op needs the installed agent (transfer.py is not beside it); "
                         "it cannot run from a streamed, read-only agent") from None


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "")


def string_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AgentError(what + " must be a list of strings")
    return value


TREE_DEPTH = 2  # a tree fact lists files this many directory levels down (wheelhouse/<key>/x)
TREE_LIMIT = 10000  # entries; a tree fact is for orch's own small directories
TEXT_LIMIT = 1 << 20  # bytes of a text fact (worker status files are a few hundred)


def tree_fact(path: str, cache: HashCache) -> dict[str, Any]:
    """Every regular file under `path` (relative name -> file fact), TREE_DEPTH levels down.

    Why a listing: what a directory should hold may only be known once facts are in (the
    wheelhouse's wheels depend on the node's platform); listing it answers in the same call.
    """
    top = expand(path)
    found: dict[str, Any] = {}
    if not os.path.isdir(top):
        return found
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        depth = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
        if depth + 1 >= TREE_DEPTH:  # files of subdirectories here would be too deep
            dirnames[:] = []
        for name in filenames:
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            if len(found) >= TREE_LIMIT:
                raise AgentError(f"{path} holds more than {TREE_LIMIT} files")
            fact = file_fact(os.path.join(dirpath, name), cache)
            if fact["kind"] == "file":
                found[rel] = fact
    return found


def text_fact(path: str) -> str | None:
    """A small file's text (None when absent): state a process on the node writes, e.g. a
    worker's status file, read in the facts call rather than in a second round trip."""
    try:
        with open(expand(path), "rb") as f:
            data = f.read(TEXT_LIMIT + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(data) > TEXT_LIMIT:
        raise AgentError(f"{path} is larger than {TEXT_LIMIT} bytes")
    return data.decode("utf-8", "replace")


def sudo_works() -> bool:
    """Whether root commands orch runs would run without a password prompt.

    ``sudo -n -l CMD`` asks the policy about one command orch runs as root (bootstrapping a
    LaunchDaemon) without running anything and without prompting: exit 0 only when it is
    allowed with NOPASSWD. ``sudo -n true`` would wrongly fail on a Mac whose sudoers allows
    exactly orch's commands (the line the controller prints) and nothing else.
    """
    tool = which("launchctl") or "/bin/launchctl"
    probe = ["sudo", "-n", "-l", tool, "bootstrap", "system",
             "/Library/LaunchDaemons/com.orch.probe.plist"]
    return run_status(probe, None, None, 30) == 0


def op_facts(req: Request, _stdin: IO[bytes]) -> Response:
    (files, venvs, launchd, sysctls, guards, trees, texts, managed, cluster, read_only,
     sudo) = fields(
        req,
        (),
        {"files": [], "venvs": [], "launchd": [], "sysctl": [], "guards": [], "trees": [],
         "texts": [], "managed": True, "cluster": "default", "read_only": False,
         "sudo": False},
    )
    if not isinstance(launchd, list) or not isinstance(guards, list):
        raise AgentError("launchd and guards must be lists")
    cache = HashCache()
    file_facts = {p: file_fact(p, cache) for p in string_list(files, "files")}
    tree_facts = {p: tree_fact(p, cache) for p in string_list(trees, "trees")}
    if not read_only:  # a plan writes nothing on a host, not even orch's own hash cache
        cache.save()
    managed_record: Any = {}
    if managed:
        try:
            managed_record = json_file(record_path(cluster), {})
        except ValueError as exc:
            raise AgentError(f"{record_path(cluster)} is not valid JSON: {exc}") from None
    answer: Response = {} if not sudo else {"sudo": sudo_works()}
    return {
        **answer,
        "agent": {"version": own_version()},
        "os": {
            "system": platform.system(),
            "product_version": capture(["sw_vers", "-productVersion"]),
        },
        "user": user_name(),
        "uid": os.getuid(),
        "home": os.path.expanduser("~"),
        "python": {"executable": sys.executable, "version": platform.python_version()},
        "memory_bytes": memory_bytes(),
        "chip": capture(["sysctl", "-n", "machdep.cpu.brand_string"]),
        "files": file_facts,
        "venvs": {v: venv_fact(v) for v in string_list(venvs, "venvs")},
        "launchd": dict(launchd_fact(s) for s in launchd),
        "sysctl": {n: capture(["sysctl", "-n", n]) for n in string_list(sysctls, "sysctl")},
        "guards": dict(guard_status(g) for g in guards),
        "trees": tree_facts,
        "texts": {p: text_fact(p) for p in string_list(texts, "texts")},
        "managed": managed_record,
        "counters": cache.counters(),
    }


# ------------------------------------------------------------------------------ changing ops


def check_mode(mode: Any) -> int:
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise AgentError("mode must be an int between 0 and 0o7777")
    return mode


def stdin_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        yield chunk


def op_write(req: Request, stdin: IO[bytes]) -> Response:
    """Write stdin's bytes to path atomically, verified against the expected sha256."""
    path, mode, expected = fields(req, ("path", "mode", "sha256"), {})
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


def record_path(cluster: Any) -> str:
    """One managed record per cluster: two clusters sharing a Mac never remove each other's."""
    if not isinstance(cluster, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cluster):
        raise AgentError(f"bad cluster name {cluster!r}")
    return os.path.join(orch_dir(), "managed", cluster + ".json")


def op_managed_write(req: Request, _stdin: IO[bytes]) -> Response:
    record, cluster = fields(req, ("record",), {"cluster": "default"})
    if not isinstance(record, dict):
        raise AgentError("record must be an object")
    path = record_path(cluster)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return {"changed": dump_json_atomic(path, record)}


def op_run(req: Request, _stdin: IO[bytes]) -> Response:
    """Run argv (never through a shell) unless `creates` exists or `unless` succeeds."""
    argv, creates, unless, cwd, env, timeout = fields(
        req,
        ("argv",),
        {"creates": None, "unless": None, "cwd": None, "env": {}, "timeout": RUN_TIMEOUT},
    )
    argv = check_argv(argv, "argv")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise AgentError("env must map strings to strings")
    workdir = expand(cwd) if isinstance(cwd, str) else None
    full_env = dict(os.environ)
    full_env.update(env)
    skipped = {"skipped": True, "exit_status": None, "stdout": "", "stderr": ""}
    if isinstance(creates, str) and os.path.lexists(expand(creates)):
        return skipped
    if unless is not None:
        check = check_argv(unless, "unless")
        if run_status(check, workdir, full_env, timeout) == 0:
            return skipped
    try:
        proc = subprocess.run(
            argv,
            cwd=workdir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        return {"skipped": False, "exit_status": 127, "stdout": "", "stderr": str(exc)}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, bytes) else b""
        err = exc.stderr if isinstance(exc.stderr, bytes) else b""
        err += (f"\n[orch agent: timed out after {timeout}s]").encode()
        return {"skipped": False, "exit_status": 124, "stdout": tail(out), "stderr": tail(err)}
    return {
        "skipped": False,
        "exit_status": status_of(proc.returncode),
        "stdout": tail(proc.stdout),
        "stderr": tail(proc.stderr),
    }


def wait_gone(target: str, timeout: float) -> bool:
    """bootout returns before the job is gone; poll ``print`` until it is (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        if launchctl(["print", target]).returncode != 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def bootout(domain: Any, label: Any, timeout: float) -> bool:
    """Unload a job and wait until launchd has forgotten it; False when it was not loaded."""
    target = service_target(domain, label)
    if launchctl(["print", target]).returncode != 0:
        return False
    proc = launchctl(["bootout", target], privileged=domain == "system")
    if not wait_gone(target, timeout):
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise AgentError(f"{target} still loaded {timeout}s after bootout: {err}")
    return True


def op_launchd_bootout(req: Request, _stdin: IO[bytes]) -> Response:
    domain, label, timeout = fields(req, ("domain", "label"), {"timeout": 30})
    return {"changed": bootout(domain, label, float(timeout))}


def op_launchd_bootstrap(req: Request, _stdin: IO[bytes]) -> Response:
    """(Re)load a job from its plist: bootout and wait first, then bootstrap."""
    domain, label, plist, timeout = fields(req, ("domain", "label", "plist"), {"timeout": 30})
    was_loaded = bootout(domain, label, float(timeout))
    deadline = time.monotonic() + float(timeout)
    while True:
        argv = ["bootstrap", domain_target(domain), expand(str(plist))]
        proc = launchctl(argv, privileged=domain == "system")
        if proc.returncode == 0:
            return {"changed": True, "was_loaded": was_loaded}
        err = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
        # 5: Input/output error also means "the previous instance is still being torn down".
        if "Input/output error" not in err or time.monotonic() >= deadline:
            raise AgentError(f"launchctl bootstrap {label} failed: {err}")
        time.sleep(0.2)


def op_launchd_kickstart(req: Request, _stdin: IO[bytes]) -> Response:
    domain, label = fields(req, ("domain", "label"), {})
    target = service_target(domain, label)
    proc = launchctl(["kickstart", "-k", target], privileged=domain == "system")
    if proc.returncode != 0:
        err = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
        raise AgentError(f"launchctl kickstart {label} failed: {err}")
    return {"changed": True}


def op_lock_acquire(req: Request, _stdin: IO[bytes]) -> Response:
    """Take the cluster lock on this host: mkdir is atomic, so of two runs exactly one wins."""
    path, holder = fields(req, ("path", "holder"), {})
    if not isinstance(holder, dict) or not isinstance(holder.get("nonce"), str):
        raise AgentError("holder must be an object with a nonce")
    full = expand(str(path))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    try:
        os.mkdir(full, 0o700)
    except FileExistsError:
        # The winner writes holder.json right after its mkdir; wait briefly for it.
        for _ in range(50):
            current = json_file(os.path.join(full, "holder.json"), None)
            if current is not None:
                return {"acquired": False, "holder": current}
            time.sleep(0.02)
        return {"acquired": False, "holder": {"who": "unknown (no holder.json)", "nonce": "?"}}
    dump_json_atomic(os.path.join(full, "holder.json"), holder)
    return {"acquired": True, "holder": holder}


def op_lock_release(req: Request, _stdin: IO[bytes]) -> Response:
    """Release the lock only if `nonce` is its holder's: a run never frees another's lock."""
    path, nonce = fields(req, ("path", "nonce"), {})
    full = expand(str(path))
    current = json_file(os.path.join(full, "holder.json"), None)
    if not os.path.isdir(full) or not isinstance(current, dict) or current.get("nonce") != nonce:
        return {"released": False}
    shutil.rmtree(full)
    return {"released": True}


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


# ---------------------------------------------------------------------------------- model sync

SYNC_STATE = "sync"  # ~/.orch/sync: which run serves on which port, and stop requests
HEARTBEAT_S = 2.0  # `serve` writes a blank line this often; a failed write means no controller
BIND_WAIT_S = 10.0  # how long `serve` waits for a previous run's server to free the port
STALE_STOP_S = 86400.0  # stop requests older than this are swept by the next `serve`
RUN_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


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


def string_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise AgentError(what + " must map strings to strings")
    return value


def op_fetch(req: Request, _stdin: IO[bytes]) -> Response:
    """Download one file into place, resumably and verified (see transfer.py), then record
    its hash in the cache so the next ``facts`` reads none of its bytes.

    Header values (the Hub token, the per-run peer token) come only in this request, on
    stdin; transfer keeps them out of every message. A file the cache already vouches for is
    not fetched again (a retried apply)."""
    path, size, sha256, url, git_sha1, headers, timeout, retries, backoff = fields(
        req,
        ("path", "size", "sha256", "url"),
        {"git_sha1": None, "headers": {}, "timeout": RUN_TIMEOUT, "retries": 8, "backoff": 0.5},
    )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise AgentError("size must be a non-negative int")
    headers = string_map(headers, "headers")
    full = expand(str(path))
    cache = HashCache()
    if sha256 is not None and cached_sha256(cache, full) == sha256:
        return {"path": full, "size": size, "sha256": sha256, "skipped": True,
                "bytes_downloaded": 0, "bytes_resumed": 0, "requests": 0, "retries": 0,
                "mismatches": 0, "seconds": 0.0}
    transfer = load_transfer()
    limit = float(timeout)
    deadline = time.monotonic() + limit

    def progress(have: int, total: int) -> None:
        if time.monotonic() > deadline:
            raise AgentError(f"{os.path.basename(full)}: not complete after {limit:g}s "
                             f"({have} of {total} bytes kept for the next run)")

    try:
        result = transfer.fetch(str(url), full, sha256=sha256, size=size, git_sha1=git_sha1,
                                headers=headers, retries=int(retries), backoff=float(backoff),
                                progress=progress)
    except transfer.TransferError as exc:  # its message names the file, never a header value
        raise AgentError(str(exc)) from None
    except ValueError as exc:
        raise AgentError(f"bad fetch request: {exc}") from None
    cache.record(os.path.realpath(full), os.stat(full), result.sha256)
    cache.save()
    answer: Response = result.to_json()
    answer["skipped"] = False
    return answer


def sync_state(*parts: str) -> str:
    return os.path.join(orch_dir(), SYNC_STATE, *parts)


def touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "ab"):
        pass


def sweep_stale_stops(keep: str) -> None:
    """Stop requests for servers that had already ended stay behind; drop the old ones."""
    directory = sync_state()
    now = time.time()
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        try:
            if name.startswith("stop-") and full != keep and \
                    now - os.stat(full).st_mtime > STALE_STOP_S:
                os.unlink(full)
        except OSError:
            pass


def bind_peer_server(transfer: Any, bind: str, port: int, files: dict[str, str], token: str,
                     run_id: str) -> Any:
    """Start the peer server; if the port is held by a server an earlier run left behind (its
    controller died), ask that server to stop and wait for the port."""
    record = sync_state(f"serve-{port}.json")
    deadline = time.monotonic() + BIND_WAIT_S
    asked = False
    while True:
        try:
            return transfer.serve_files(bind, port, files, token)
        except ValueError as exc:
            raise AgentError(f"cannot serve: {exc}") from None
        except OSError as exc:
            failure = AgentError(f"cannot serve on {bind}:{port}: "
                                 f"{exc.strerror or type(exc).__name__}")
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise failure from None
        if not asked:
            try:
                previous = json_file(record, {})
            except ValueError:
                previous = {}
            other = previous.get("run_id") if isinstance(previous, dict) else None
            if not isinstance(other, str) or other == run_id or not RUN_ID.fullmatch(other):
                raise failure from None  # not a server orch left behind: waiting won't help
            touch(sync_state("stop-" + other))
            asked = True
        time.sleep(0.1)


def op_serve(req: Request, _stdin: IO[bytes]) -> Response:
    """Serve verified files to peers (transfer.serve_files) until told to stop.

    Stops when ``serve_stop`` names this run, when ``timeout`` seconds have passed, or when
    the controller is gone (the heartbeat, a blank line on stdout every few seconds, fails).
    The token comes only in this request, on stdin, never in argv (which ``ps`` shows).
    Answers what was served."""
    files, bind, port, token, run_id, timeout = fields(
        req, ("files", "bind", "port", "token", "run_id"), {"timeout": 86400})
    files = string_map(files, "files")
    if not all(u.startswith("/") for u in files):
        raise AgentError("file URL paths must start with '/'")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise AgentError("port must be an int between 0 and 65535")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise AgentError("run_id must be 8 to 64 letters, digits, '-' or '_'")
    if not isinstance(token, str) or not isinstance(bind, str):
        raise AgentError("token and bind must be strings")
    transfer = load_transfer()
    stop = sync_state("stop-" + run_id)
    os.makedirs(sync_state(), mode=0o700, exist_ok=True)
    sweep_stale_stops(stop)
    started = time.monotonic()
    server = bind_peer_server(transfer, bind, port, {u: expand(p) for u, p in files.items()},
                              token, run_id)
    record = sync_state(f"serve-{server.server_address[1]}.json")
    dump_json_atomic(record, {"run_id": run_id, "pid": os.getpid()})
    reason = None
    beat = started
    try:
        while reason is None:
            time.sleep(0.05)
            now = time.monotonic()
            if os.path.exists(stop):
                reason = "stopped"
            elif now - started > float(timeout):
                reason = "deadline"
            elif now - beat >= HEARTBEAT_S:
                beat = now
                try:
                    sys.stdout.buffer.write(b"\n")
                    sys.stdout.buffer.flush()
                except OSError:
                    reason = "hangup"
    finally:
        server.close()
        try:
            if json_file(record, {}).get("run_id") == run_id:
                os.unlink(record)
        except (OSError, ValueError, AttributeError):
            pass
        with contextlib.suppress(OSError):
            os.unlink(stop)
    with server.lock:
        return {"reason": reason, "port": server.server_address[1],
                "requests": server.requests, "refused": server.refused,
                "bytes_served": dict(sorted(server.bytes_served.items())),
                "seconds": round(time.monotonic() - started, 3)}


def op_serve_stop(req: Request, _stdin: IO[bytes]) -> Response:
    """Ask this run's ``serve`` to stop; it answers on its own channel within ~50 ms.

    Written whether or not the server has started yet: a server that starts later sees the
    request at once and stops, instead of serving until its deadline."""
    (run_id,) = fields(req, ("run_id",), {})
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise AgentError("run_id must be 8 to 64 letters, digits, '-' or '_'")
    touch(sync_state("stop-" + run_id))
    return {"changed": True}


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


OPS: dict[str, Callable[[Request, IO[bytes]], Response]] = {
    "facts": op_facts,
    "install_system": op_install_system,
    "remove_system": op_remove_system,
    "lock_acquire": op_lock_acquire,
    "lock_release": op_lock_release,
    "read": op_read,
    "write": op_write,
    "mkdir": op_mkdir,
    "remove": op_remove,
    "rmdir": op_rmdir,
    "run": op_run,
    "managed_write": op_managed_write,
    "launchd_bootstrap": op_launchd_bootstrap,
    "launchd_bootout": op_launchd_bootout,
    "launchd_kickstart": op_launchd_kickstart,
    "fetch": op_fetch,
    "serve": op_serve,
    "serve_stop": op_serve_stop,
    "prune": op_prune,
    "sizes": op_sizes,
}


def emit(value: Response) -> None:
    sys.stdout.buffer.write(json.dumps(value, sort_keys=True).encode("ascii") + b"\n")
    sys.stdout.buffer.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in OPS:
        emit({"error": "usage: agent.py OP (one of {})".format(", ".join(sorted(OPS)))})
        return 2
    stdin = sys.stdin.buffer
    try:
        line = stdin.readline()
        req = json.loads(line.decode("utf-8")) if line.strip() else {}
        if not isinstance(req, dict):
            raise AgentError("the request must be a JSON object")
        response = OPS[argv[1]](req, stdin)
    except AgentError as exc:
        emit({"error": str(exc)})
        return 1
    except Exception as exc:  # report, never a bare traceback the controller cannot parse
        emit({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]})
        return 1
    emit(response)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
