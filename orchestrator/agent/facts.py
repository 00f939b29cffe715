"""``facts``: everything a plan needs from a node in one call (files, directory listings, small
texts, venvs, launchd jobs, sysctls, guards, the managed record), read without changing anything
a plan could see.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH111, PTH112, PTH113
# ruff: noqa: PTH114
# ruff: noqa: PTH116, PTH118, PTH123, PTH208
import os
import pwd
import stat
import sys

from .common import (
    AgentError,
    capture,
    check_argv,
    expand,
    fields,
    json_file,
    own_version,
    run_status,
    string_list,
    which,
)
from .hashcache import HashCache
from .managed import record_path

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import IO, Any

    from .common import Request, Response


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
    import re  # here: only venv facts need it (a no-op session imports no re at all)

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


def launchd_fact(spec: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, dict):
        raise AgentError("launchd entries must be objects")
    domain, label = fields(spec, ("domain", "label"), {})
    # Imported here, as interpreters is below: a facts call that asks no launchd job (no
    # Python, no disk) does not compile those modules (see OP_HOMES in agent.py).
    from .launchd import NOT_LOADED, launchd_job, launchd_print, service_target

    text = launchd_print(service_target(domain, label))
    return f"{domain}/{label}", NOT_LOADED if text is None else launchd_job(text)


def guard_status(spec: Any) -> tuple[str, int]:
    if not isinstance(spec, dict):
        raise AgentError("guards must be objects")
    gid, argv, timeout = fields(spec, ("id", "argv"), {"timeout": 60})
    return str(gid), run_status(check_argv(argv, "guard argv"), None, None, timeout)


# What every facts call reads with sysctl, besides the names the request asks for.
# kern.osproductversion is what `sw_vers -productVersion` prints (macOS >= 10.13.4).
HARDWARE_SYSCTLS = ("hw.memsize", "machdep.cpu.brand_string", "kern.osproductversion")


def sysctl_values(names: list[str]) -> dict[str, str | None]:
    """Every name's value from ONE ``sysctl`` run (None: unknown here, or no sysctl).

    Why one run: each process is a fork and exec on the node (on a simulated Mac, a Python
    start), and a facts call used to start three, plus one per requested name. Without
    ``-n``, sysctl prints each value after its name (``name: value`` on macOS, ``name =
    value`` from Linux procps), so an unknown name (reported on stderr, the others still
    printed, a non-zero exit) cannot shift the rest; a line that starts no requested name
    continues the value before it.
    """
    wanted = list(dict.fromkeys(names))
    for name in wanted:  # a fact is read-only: `name=value` would write, `-x` is an option
        if not name or "=" in name or name.startswith("-") or any(c.isspace() for c in name):
            raise AgentError(f"bad sysctl name {name!r}")
    found: dict[str, list[str]] = {}
    out = capture(["sysctl", *wanted], any_status=True) if wanted else None
    current: list[str] | None = None
    for line in (out or "").splitlines():
        head = next(((n, sep) for n in wanted for sep in (": ", " = ")
                     if n not in found and line.startswith(n + sep)), None)
        if head is not None:
            current = found[head[0]] = [line[len(head[0]) + len(head[1]):]]
        elif current is not None:
            current.append(line)
    values: dict[str, str | None] = {}
    for name in wanted:
        text = "\n".join(found.get(name, [])).strip()
        values[name] = text or None
    return values


def memory_bytes(value: str | None) -> int | None:
    """hw.memsize on macOS (or its test stand-in); MemTotal elsewhere."""
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


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "")


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


def rdma_devices() -> list[str]:
    """The RDMA devices ``ibv_devices`` lists (``rdma_en2``, ...): none when RDMA is disabled
    (``rdma_ctl enable`` from Recovery was never run) or the tool is absent (macOS < 26.2).

    Read as ``mlx.distributed_config``'s ``check_rdma`` reads it: every whitespace-separated
    word of the output that starts with ``rdma_`` (the header and the GUID column do not).
    """
    out = capture(["ibv_devices"]) or ""
    return [word for word in out.split() if word.startswith("rdma_")]


def op_facts(req: Request, _stdin: IO[bytes]) -> Response:
    (files, venvs, launchd, sysctls, guards, trees, texts, managed, cluster, read_only,
     sudo, directory, rdma, pythons, disk) = fields(
        req,
        (),
        {"files": [], "venvs": [], "launchd": [], "sysctl": [], "guards": [], "trees": [],
         "texts": [], "managed": True, "cluster": "default", "read_only": False,
         "sudo": False, "dir": None, "rdma": False, "pythons": None, "disk": []},
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
            managed_record = json_file(record_path(cluster, directory), {})
        except ValueError as exc:
            where = record_path(cluster, directory)
            raise AgentError(f"{where} is not valid JSON: {exc}") from None
    answer: Response = {} if not sudo else {"sudo": sudo_works()}
    if rdma:
        answer["rdma"] = rdma_devices()
    if pythons is not None or disk:
        from .interpreters import disk_fact, pythons_fact
    if pythons is not None:
        answer["pythons"] = pythons_fact(string_list(pythons, "pythons"))
    if disk:
        answer["disk"] = {p: disk_fact(p) for p in string_list(disk, "disk")}
    wanted = string_list(sysctls, "sysctl")
    values = sysctl_values([*HARDWARE_SYSCTLS, *wanted])
    product = values["kern.osproductversion"]
    if product is None:  # a system without that name: ask sw_vers, as before
        product = capture(["sw_vers", "-productVersion"])
    return {
        **answer,
        "agent": {"version": own_version()},
        "os": {
            "system": os.uname().sysname,  # platform.system(), without importing platform
            "product_version": product,
        },
        "user": user_name(),
        "uid": os.getuid(),
        "home": os.path.expanduser("~"),
        # platform.python_version(): the first word of sys.version ("3.9.6", "3.13.0rc1")
        "python": {"executable": sys.executable, "version": sys.version.split()[0]},
        "memory_bytes": memory_bytes(values["hw.memsize"]),
        "chip": values["machdep.cpu.brand_string"],
        "files": file_facts,
        "venvs": {v: venv_fact(v) for v in string_list(venvs, "venvs")},
        "launchd": dict(launchd_fact(s) for s in launchd),
        "sysctl": {n: values[n] for n in wanted},
        "guards": dict(guard_status(g) for g in guards),
        "trees": tree_facts,
        "texts": {p: text_fact(p) for p in string_list(texts, "texts")},
        "managed": managed_record,
        "counters": cache.counters(),
    }
