"""What the planner knows about a host: the agent's `facts` JSON, parsed into frozen values.

Resources declare what they need as a `FactRequest`; the requests of every resource on a host are
merged into one, so planning costs one agent call (one SSH round trip) per host. Parsing is pure
and strict: a key the controller does not know, or a missing one, means the agent and the
controller disagree about the protocol, and that must fail loudly rather than plan on guesses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any, NoReturn

from orchestrator.errors import ActionFailed

__all__ = [
    "DiskFact",
    "FactRequest",
    "FileFact",
    "FileKind",
    "Guard",
    "HostFacts",
    "Interpreter",
    "JobState",
    "LaunchdJob",
    "LaunchdRef",
    "PythonsFact",
    "VenvFact",
    "parse_facts",
]

LAUNCHD_DOMAINS = ("user", "system")


class FileKind(Enum):
    FILE = "file"
    DIR = "dir"
    MISSING = "missing"
    OTHER = "other"


class JobState(Enum):
    RUNNING = "running"
    WAITING = "waiting"  # loaded, not running now (exited, throttled, waiting for KeepAlive)
    NOT_LOADED = "not_loaded"


@dataclass(frozen=True)
class FileFact:
    kind: FileKind
    size: int | None  # files only
    mode: int | None  # permission bits; None when missing
    sha256: str | None  # files only


@dataclass(frozen=True)
class VenvFact:
    exists: bool
    python_version: str | None
    packages: Mapping[str, str]  # PEP 503-normalized name -> version


@dataclass(frozen=True, order=True)
class Interpreter:
    """A Python on the node: its absolute path and version ("3.12.4"); ``version`` is None
    when it did not answer, and ``stub`` says it is the Command Line Tools' install stub."""

    path: str
    version: str | None
    stub: bool = False

    @property
    def minor(self) -> tuple[int, int] | None:
        """(major, minor), e.g. (3, 12); None without a version."""
        if self.version is None:
            return None
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)


@dataclass(frozen=True)
class PythonsFact:
    """Every interpreter found on the node, and whether the Command Line Tools are there."""

    developer_tools: bool
    found: tuple[Interpreter, ...]


@dataclass(frozen=True)
class DiskFact:
    """Free bytes on the volume holding a path (``volume``: its nearest existing parent)."""

    volume: str
    free_bytes: int


@dataclass(frozen=True)
class LaunchdJob:
    state: JobState
    pid: int | None
    last_exit: int | None
    env: Mapping[str, str]


@dataclass(frozen=True, order=True)
class LaunchdRef:
    """A launchd job as a resource names it; `key` is how facts report it ("user/<label>")."""

    domain: str
    label: str

    def __post_init__(self) -> None:
        if self.domain not in LAUNCHD_DOMAINS:
            raise ValueError(f"launchd domain must be one of {LAUNCHD_DOMAINS}: {self.domain!r}")
        if not self.label or "/" in self.label:
            raise ValueError(f"bad launchd label {self.label!r}")

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.label}"


@dataclass(frozen=True, order=True)
class Guard:
    """A check command whose exit status the plan needs (e.g. an `unless`), run during facts."""

    id: str
    argv: tuple[str, ...]


def _frozen(items: Iterable[str]) -> frozenset[str]:
    if isinstance(items, str):
        raise TypeError("expected a collection of strings, not a string")
    return frozenset(items)


@dataclass(frozen=True)
class FactRequest:
    """What one or more resources need to know about a host; `merge` combines them."""

    files: frozenset[str] = frozenset()
    venvs: frozenset[str] = frozenset()
    launchd: frozenset[LaunchdRef] = frozenset()
    sysctl: frozenset[str] = frozenset()
    guards: frozenset[Guard] = frozenset()
    trees: frozenset[str] = frozenset()  # directories listed with every file's fact
    texts: frozenset[str] = frozenset()  # small files read whole (e.g. a worker's status)
    managed: bool = True
    cluster: str = "default"  # whose managed record to read (one per cluster on a host)
    state_dir: str = ".orch"  # the cluster's runtime.dir, where its managed record is
    sudo: bool = False  # whether `sudo -n` runs orch's root commands without a password
    rdma: bool = False  # the RDMA devices `ibv_devices` lists (runtime.backend jaccl)
    # the node's Pythons (discovery, plus these absolute paths); None: not asked (it runs them)
    pythons: frozenset[str] | None = None
    disk: frozenset[str] = frozenset()  # free space on the volume holding each path

    def __post_init__(self) -> None:
        if self.pythons is not None:
            object.__setattr__(self, "pythons", _frozen(self.pythons))
        for name in ("files", "venvs", "sysctl", "trees", "texts", "disk"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        object.__setattr__(self, "launchd", frozenset(self.launchd))
        object.__setattr__(self, "guards", frozenset(self.guards))
        ids = [g.id for g in self.guards]
        if len(ids) != len(set(ids)):
            raise ValueError(f"guard ids must be unique: {sorted(ids)}")

    def merge(self, *others: FactRequest) -> FactRequest:
        """The union of this request and others; one guard id naming two commands is an error."""
        parts = (self, *others)
        return FactRequest(
            files=frozenset().union(*(p.files for p in parts)),
            venvs=frozenset().union(*(p.venvs for p in parts)),
            launchd=frozenset().union(*(p.launchd for p in parts)),
            sysctl=frozenset().union(*(p.sysctl for p in parts)),
            guards=frozenset().union(*(p.guards for p in parts)),
            trees=frozenset().union(*(p.trees for p in parts)),
            texts=frozenset().union(*(p.texts for p in parts)),
            managed=any(p.managed for p in parts),
            cluster=_one_cluster(parts),
            sudo=any(p.sudo for p in parts),
            rdma=any(p.rdma for p in parts),
            state_dir=next((p.state_dir for p in parts if p.state_dir != ".orch"), ".orch"),
            pythons=_union_or_none(p.pythons for p in parts),
            disk=frozenset().union(*(p.disk for p in parts)),
        )

    def minus(self, other: FactRequest) -> FactRequest:
        """What this request asks that `other` does not (the managed record: never again)."""
        return FactRequest(files=self.files - other.files, venvs=self.venvs - other.venvs,
                           launchd=self.launchd - other.launchd,
                           sysctl=self.sysctl - other.sysctl,
                           guards=self.guards - other.guards, trees=self.trees - other.trees,
                           texts=self.texts - other.texts, managed=False,
                           cluster=self.cluster, sudo=self.sudo and not other.sudo,
                           rdma=self.rdma and not other.rdma, state_dir=self.state_dir,
                           pythons=None if self.pythons is None or (
                               other.pythons is not None and self.pythons <= other.pythons)
                           else self.pythons,  # the same probes asked again answer the same
                           disk=self.disk - other.disk)

    @property
    def empty(self) -> bool:
        return not (self.files or self.venvs or self.launchd or self.sysctl or self.guards
                    or self.trees or self.texts or self.managed or self.sudo or self.rdma
                    or self.pythons is not None or self.disk)

    def to_json(self) -> dict[str, Any]:
        """The agent's `facts` request, sorted so equal requests serialize identically
        (``sudo`` only when asked: the probe runs a command, so it is not asked for free)."""
        request: dict[str, Any] = {
            "files": sorted(self.files),
            "venvs": sorted(self.venvs),
            "launchd": [{"domain": r.domain, "label": r.label} for r in sorted(self.launchd)],
            "sysctl": sorted(self.sysctl),
            "guards": [{"id": g.id, "argv": list(g.argv)} for g in sorted(self.guards)],
            "trees": sorted(self.trees),
            "texts": sorted(self.texts),
            "managed": self.managed,
            "cluster": self.cluster,
            "dir": self.state_dir,
        }
        if self.sudo:
            request["sudo"] = True
        if self.rdma:
            request["rdma"] = True
        if self.pythons is not None:
            request["pythons"] = sorted(self.pythons)
        if self.disk:
            request["disk"] = sorted(self.disk)
        return request


def _union_or_none(sets: Iterable[frozenset[str] | None]) -> frozenset[str] | None:
    asked = [s for s in sets if s is not None]
    return frozenset().union(*asked) if asked else None


def _one_cluster(parts: Iterable[FactRequest]) -> str:
    named = {p.cluster for p in parts} - {"default"}
    if len(named) > 1:
        raise ValueError(f"one fact request cannot read several clusters' records: {named}")
    return named.pop() if named else "default"


@dataclass(frozen=True)
class HostFacts:
    host: str
    os_system: str
    macos_version: str | None  # `sw_vers -productVersion` ("15.3.1"); None where there is none
    user: str
    uid: int
    home: str
    python_version: str
    memory_bytes: int | None
    chip: str | None
    files: Mapping[str, FileFact] = field(default_factory=dict)
    venvs: Mapping[str, VenvFact] = field(default_factory=dict)
    launchd: Mapping[str, LaunchdJob] = field(default_factory=dict)
    sysctl: Mapping[str, str | None] = field(default_factory=dict)
    guards: Mapping[str, int] = field(default_factory=dict)
    trees: Mapping[str, Mapping[str, FileFact]] = field(default_factory=dict)
    texts: Mapping[str, str | None] = field(default_factory=dict)
    managed: Mapping[str, Any] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)
    sudo: bool | None = None  # `sudo -n` works for orch's root commands; None: not asked
    rdma_devices: tuple[str, ...] | None = None  # what `ibv_devices` lists; None: not asked
    pythons: PythonsFact | None = None  # None: not asked
    disk: Mapping[str, DiskFact] = field(default_factory=dict)

    def merged(self, more: HostFacts) -> HostFacts:
        """These facts plus those of a second, smaller request to the same host."""
        return replace(
            self,
            files=MappingProxyType({**self.files, **more.files}),
            venvs=MappingProxyType({**self.venvs, **more.venvs}),
            launchd=MappingProxyType({**self.launchd, **more.launchd}),
            sysctl=MappingProxyType({**self.sysctl, **more.sysctl}),
            guards=MappingProxyType({**self.guards, **more.guards}),
            trees=MappingProxyType({**self.trees, **more.trees}),
            texts=MappingProxyType({**self.texts, **more.texts}),
            counters=MappingProxyType({k: self.counters.get(k, 0) + more.counters.get(k, 0)
                                       for k in {*self.counters, *more.counters}}),
            sudo=self.sudo if more.sudo is None else more.sudo,
            rdma_devices=self.rdma_devices if more.rdma_devices is None else more.rdma_devices,
            pythons=self.pythons if more.pythons is None else more.pythons,
            disk=MappingProxyType({**self.disk, **more.disk}),
        )

    @property
    def pending(self) -> frozenset[str]:
        """Resources an earlier run set out to change and may not have finished: the managed
        record lists them (``pending``) from before that run's first change until after its
        last (`orchestrator.run.apply`), so they are still listed when it was cut or failed."""
        return frozenset(str(r) for r in self.managed.get("pending", ()))

    def file(self, path: str) -> FileFact:
        """The fact for a path exactly as requested; a KeyError names what was not requested."""
        try:
            return self.files[path]
        except KeyError:
            raise KeyError(f"{self.host}: file {path!r} was not in the fact request") from None

    def tree(self, path: str) -> Mapping[str, FileFact]:
        """Every file under a requested directory, by relative name (empty when absent)."""
        try:
            return self.trees[path]
        except KeyError:
            raise KeyError(f"{self.host}: tree {path!r} was not in the fact request") from None

    def text(self, path: str) -> str | None:
        """A requested small file's text; None when the file is absent."""
        try:
            return self.texts[path]
        except KeyError:
            raise KeyError(f"{self.host}: text {path!r} was not in the fact request") from None

    def job(self, ref: LaunchdRef) -> LaunchdJob:
        try:
            return self.launchd[ref.key]
        except KeyError:
            raise KeyError(f"{self.host}: job {ref.key!r} was not in the fact request") from None


class _Reader:
    """Strict access to one JSON object: every key must be read, type-checked, and known."""

    def __init__(self, host: str, where: str, raw: Any) -> None:
        self.host, self.where = host, where
        if not isinstance(raw, Mapping):
            self.fail(f"expected an object, got {type(raw).__name__}")
        self.raw: Mapping[str, Any] = raw

    def fail(self, message: str) -> NoReturn:
        raise ActionFailed(self.host, f"bad facts from agent at {self.where}: {message}")

    def expect_keys(self, keys: Iterable[str]) -> None:
        known = set(keys)
        unknown, missing = sorted(set(self.raw) - known), sorted(known - set(self.raw))
        if unknown:
            self.fail(f"unknown keys {unknown} (agent and controller versions differ?)")
        if missing:
            self.fail(f"missing keys {missing}")

    def get(self, key: str, *types: type) -> Any:
        value = self.raw[key]
        # bool is an int in Python; facts never mean one when they say the other.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            self.fail(f"{key} should be {names}, got {value!r:.80}")
        return value

    def child(self, key: str) -> _Reader:
        return _Reader(self.host, f"{self.where}.{key}", self.raw[key])

    def strings(self, key: str, value_types: tuple[type, ...]) -> dict[str, Any]:
        sub = self.child(key)
        return {k: sub.get(k, *value_types) for k in sub.raw}


_NONE = type(None)


def _file(r: _Reader) -> FileFact:
    r.expect_keys(("kind", "size", "mode", "sha256"))
    kind = r.get("kind", str)
    try:
        file_kind = FileKind(kind)
    except ValueError:
        r.fail(f"unknown file kind {kind!r}")
    return FileFact(
        file_kind, r.get("size", int, _NONE), r.get("mode", int, _NONE), r.get("sha256", str, _NONE)
    )


def _venv(r: _Reader) -> VenvFact:
    r.expect_keys(("exists", "python_version", "packages"))
    packages = MappingProxyType(r.strings("packages", (str,)))
    return VenvFact(r.get("exists", bool), r.get("python_version", str, _NONE), packages)


def _job(r: _Reader) -> LaunchdJob:
    r.expect_keys(("state", "pid", "last_exit", "env"))
    state = r.get("state", str)
    try:
        job_state = JobState(state)
    except ValueError:
        r.fail(f"unknown launchd state {state!r}")
    env = MappingProxyType(r.strings("env", (str,)))
    return LaunchdJob(job_state, r.get("pid", int, _NONE), r.get("last_exit", int, _NONE), env)


def _interpreter(r: _Reader) -> Interpreter:
    r.expect_keys(("path", "version", "stub"))
    return Interpreter(r.get("path", str), r.get("version", str, _NONE), r.get("stub", bool))


def _pythons(r: _Reader) -> PythonsFact:
    r.expect_keys(("developer_tools", "found"))
    found = r.get("found", list)
    return PythonsFact(r.get("developer_tools", bool), tuple(
        _interpreter(_Reader(r.host, f"{r.where}.found[{i}]", item))
        for i, item in enumerate(found)))


def _disk(r: _Reader) -> DiskFact:
    r.expect_keys(("volume", "free_bytes"))
    return DiskFact(r.get("volume", str), r.get("free_bytes", int))


def _each(r: _Reader, key: str, parse: Any) -> Mapping[str, Any]:
    sub = r.child(key)
    return MappingProxyType({k: parse(sub.child(k)) for k in sub.raw})


OPTIONAL_KEYS = ("sudo", "pythons", "disk", "rdma")  # answered only when asked: each runs something
TOP_KEYS = (
    "agent",
    "os",
    "user",
    "uid",
    "home",
    "python",
    "memory_bytes",
    "chip",
    "files",
    "venvs",
    "launchd",
    "sysctl",
    "guards",
    "trees",
    "texts",
    "managed",
    "counters",
)




def _rdma_devices(r: _Reader) -> tuple[str, ...]:
    devices = r.get("rdma", list)
    if not all(isinstance(d, str) and d for d in devices):
        r.fail(f"rdma should be a list of device names, got {devices!r:.80}")
    return tuple(devices)


def parse_facts(host: str, raw: Mapping[str, Any], request: FactRequest | None = None) -> HostFacts:
    """Parse the agent's `facts` answer; ActionFailed(host) on any unknown, missing or bad key.

    With `request`, also check that exactly the requested files, venvs, jobs, sysctls and guards
    were answered.
    """
    r = _Reader(host, "facts", raw)
    r.expect_keys((*TOP_KEYS, *(k for k in OPTIONAL_KEYS if k in r.raw)))
    r.child("agent").expect_keys(("version",))
    os_r = r.child("os")
    os_r.expect_keys(("system", "product_version"))
    py = r.child("python")
    py.expect_keys(("executable", "version"))
    counters = r.child("counters")
    counters.expect_keys(("files_hashed", "bytes_hashed", "hash_cache_hits"))
    facts = HostFacts(
        host=host,
        os_system=os_r.get("system", str),
        macos_version=os_r.get("product_version", str, _NONE),
        user=r.get("user", str),
        uid=r.get("uid", int),
        home=r.get("home", str),
        python_version=py.get("version", str),
        memory_bytes=r.get("memory_bytes", int, _NONE),
        chip=r.get("chip", str, _NONE),
        files=_each(r, "files", _file),
        venvs=_each(r, "venvs", _venv),
        launchd=_each(r, "launchd", _job),
        sysctl=MappingProxyType(r.strings("sysctl", (str, _NONE))),
        guards=MappingProxyType(r.strings("guards", (int,))),
        trees=_each(r, "trees", lambda t: MappingProxyType(
            {name: _file(t.child(name)) for name in t.raw})),
        texts=MappingProxyType(r.strings("texts", (str, _NONE))),
        managed=MappingProxyType(dict(r.get("managed", Mapping))),
        counters=MappingProxyType({k: counters.get(k, int) for k in counters.raw}),
        sudo=r.get("sudo", bool) if "sudo" in r.raw else None,
        rdma_devices=_rdma_devices(r) if "rdma" in r.raw else None,
        pythons=_pythons(r.child("pythons")) if "pythons" in r.raw else None,
        disk=_each(r, "disk", _disk) if "disk" in r.raw else MappingProxyType({}),
    )
    if request is not None:
        _check_answers(r, facts, request)
    return facts


def _check_answers(r: _Reader, facts: HostFacts, request: FactRequest) -> None:
    """Every requested item answered, nothing else: catches a controller/agent mismatch."""
    expected: dict[str, set[str]] = {
        "files": set(request.files),
        "venvs": set(request.venvs),
        "launchd": {ref.key for ref in request.launchd},
        "sysctl": set(request.sysctl),
        "guards": {g.id for g in request.guards},
        "trees": set(request.trees),
        "texts": set(request.texts),
        "disk": set(request.disk),
    }
    for name, keys in expected.items():
        got = set(getattr(facts, name))
        if got != keys:
            r.fail(f"{name} answered {sorted(got)}, requested {sorted(keys)}")
    if (facts.sudo is not None) != request.sudo:
        r.fail("sudo answered" if facts.sudo is not None else "sudo requested, not answered")
    if (facts.rdma_devices is not None) != request.rdma:
        r.fail("rdma answered" if facts.rdma_devices is not None
               else "rdma requested, not answered")
    if (facts.pythons is not None) != (request.pythons is not None):
        r.fail("pythons answered" if facts.pythons is not None
               else "pythons requested, not answered")
