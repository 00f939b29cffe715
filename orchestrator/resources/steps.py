"""The steps of a plan: one frozen type per agent op a plan can hold.

A step is what a resource asks the host to do to close a diff. Each type names its agent op
(`op`, a ClassVar) and builds the op's JSON request (`request()`): that request is the wire
format the agent reads, and it is the only place it is spelled. Typed fields instead of a dict
make the two things that used to be ambiguous impossible to write:

* a `Write`'s payload is either `Text` the plan carries (a template, a plist: shown by
  ``--diff``) or a `ControllerFile` apply streams from the controller (a wheel: the plan holds
  its path and sha256, never its bytes) — never both, never neither;
* a `Fetch`'s source is `FromHub`, `FromController` or `FromPeer(host)`. A peer is a host
  name inside its own type, so a host called ``hub`` or ``local`` (names validation allows)
  is a peer like any other, never read as an origin.

Steps travel as JSON in saved plans and in the managed record on each node (the cleanup steps
of what orch put there): ``{"op": OP, ...fields}``, read back by `step_from_json`. A record
written by an earlier orch holds ``{"op": OP, "request": {...}}``; that shape is still read,
so upgrading orch never strands what an older one created.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from orchestrator.model.manifest import SeedKind

__all__ = [
    "STEP_TYPES",
    "ControllerFile",
    "Fetch",
    "FromController",
    "FromHub",
    "FromPeer",
    "InstallSystem",
    "LaunchdBootout",
    "LaunchdBootstrap",
    "LaunchdKickstart",
    "Mkdir",
    "Origin",
    "Payload",
    "Prune",
    "Remove",
    "RemoveSystem",
    "Rmdir",
    "Run",
    "Source",
    "Step",
    "Text",
    "Write",
    "origin",
    "source_from_json",
    "step_from_json",
]

JSON: TypeAlias = dict[str, Any]


# ------------------------------------------------------------------------ reading JSON fields


def _get(raw: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in raw:
        raise ValueError(f"{what}: missing {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{what}: {key!r} must be {kind.__name__}, not {value!r}")
    return value


def _str(raw: Mapping[str, Any], key: str, what: str) -> str:
    value: str = _get(raw, key, str, what)
    return value


def _int(raw: Mapping[str, Any], key: str, what: str) -> int:
    value: int = _get(raw, key, int, what)
    return value


def _opt_str(raw: Mapping[str, Any], key: str, what: str) -> str | None:
    return None if raw.get(key) is None else _str(raw, key, what)


def _strs(raw: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    values: list[Any] = _get(raw, key, list, what)
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what}: {key!r} must be a list of strings")
    return tuple(values)


def _opt_strs(raw: Mapping[str, Any], key: str, what: str) -> tuple[str, ...] | None:
    return None if raw.get(key) is None else _strs(raw, key, what)


def _only(raw: Mapping[str, Any], keys: set[str], what: str) -> None:
    """Refuse unknown keys, as the agent does: a typo must not silently drop a field."""
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}")


# ------------------------------------------------------------- steps whose request is their JSON


class _Plain:
    """A step whose JSON is its op and its agent request, nothing else (all but write/fetch).

    Such a step is also what an earlier orch stored as ``{"op", "request"}``: `from_request`
    reads both shapes."""

    op: ClassVar[str]

    def request(self) -> JSON:
        raise NotImplementedError

    def to_json(self) -> JSON:
        return {"op": self.op, **self.request()}


@dataclass(frozen=True)
class Mkdir(_Plain):
    op: ClassVar[str] = "mkdir"
    path: str
    mode: int

    def request(self) -> JSON:
        return {"path": self.path, "mode": self.mode}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> Mkdir:
        _only(raw, {"path", "mode"}, cls.op)
        return cls(_str(raw, "path", cls.op), _int(raw, "mode", cls.op))


@dataclass(frozen=True)
class Remove(_Plain):
    """Remove a file, link or whole directory tree (the agent refuses HOME and /)."""

    op: ClassVar[str] = "remove"
    path: str

    def request(self) -> JSON:
        return {"path": self.path}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> Remove:
        _only(raw, {"path"}, cls.op)
        return cls(_str(raw, "path", cls.op))


@dataclass(frozen=True)
class Rmdir(_Plain):
    """Remove a directory only if empty: what is inside may be the user's, not orch's."""

    op: ClassVar[str] = "rmdir"
    path: str

    def request(self) -> JSON:
        return {"path": self.path}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> Rmdir:
        _only(raw, {"path"}, cls.op)
        return cls(_str(raw, "path", cls.op))


@dataclass(frozen=True)
class Run(_Plain):
    """Run argv (never a shell), skipped by the agent when `creates` exists or `unless` exits 0.

    Fields left None are left out of the request: the agent's default for each is None."""

    op: ClassVar[str] = "run"
    argv: tuple[str, ...]
    creates: str | None = None
    unless: tuple[str, ...] | None = None
    cwd: str | None = None
    check: bool = True  # a non-zero exit fails the step (and stops the host's batch)

    def request(self) -> JSON:
        """The plan's and the record's JSON: `check` appears only when it is off, so plans and
        records written before the flag existed read back unchanged."""
        request: JSON = {"argv": list(self.argv)}
        if self.creates is not None:
            request["creates"] = self.creates
        if self.unless is not None:
            request["unless"] = list(self.unless)
        if self.cwd is not None:
            request["cwd"] = self.cwd
        if not self.check:
            request["check"] = False
        return request

    def agent_request(self) -> JSON:
        """What the agent gets: `check` always explicit (the bare op's default is off, for the
        callers that read a command's exit status as an answer)."""
        return {**self.request(), "check": self.check}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> Run:
        _only(raw, {"argv", "creates", "unless", "cwd", "check"}, cls.op)
        check = raw.get("check", True)
        if not isinstance(check, bool):
            raise ValueError(f"{cls.op}: check must be true or false")
        return cls(_strs(raw, "argv", cls.op), _opt_str(raw, "creates", cls.op),
                   _opt_strs(raw, "unless", cls.op), _opt_str(raw, "cwd", cls.op), check)


@dataclass(frozen=True)
class LaunchdBootstrap(_Plain):
    """(Re)load a job: the agent boots out the running one and waits until it is gone first."""

    op: ClassVar[str] = "launchd_bootstrap"
    domain: str
    label: str
    plist: str

    def request(self) -> JSON:
        return {"domain": self.domain, "label": self.label, "plist": self.plist}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> LaunchdBootstrap:
        _only(raw, {"domain", "label", "plist"}, cls.op)
        return cls(_str(raw, "domain", cls.op), _str(raw, "label", cls.op),
                   _str(raw, "plist", cls.op))


@dataclass(frozen=True)
class LaunchdBootout(_Plain):
    op: ClassVar[str] = "launchd_bootout"
    domain: str
    label: str

    def request(self) -> JSON:
        return {"domain": self.domain, "label": self.label}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> LaunchdBootout:
        _only(raw, {"domain", "label"}, cls.op)
        return cls(_str(raw, "domain", cls.op), _str(raw, "label", cls.op))


@dataclass(frozen=True)
class LaunchdKickstart(_Plain):
    """``kickstart -k``: restart a loaded job in place. No resource plans one today (a changed
    job is re-bootstrapped, which also reloads its plist); the agent has the op, so the type
    exists and the agent's op table and the step types stay one list."""

    op: ClassVar[str] = "launchd_kickstart"
    domain: str
    label: str

    def request(self) -> JSON:
        return {"domain": self.domain, "label": self.label}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> LaunchdKickstart:
        _only(raw, {"domain", "label"}, cls.op)
        return cls(_str(raw, "domain", cls.op), _str(raw, "label", cls.op))


@dataclass(frozen=True)
class InstallSystem(_Plain):
    """Copy a file staged as the user to a root-owned path with ``sudo -n``."""

    op: ClassVar[str] = "install_system"
    src: str
    dest: str
    mode: int

    def request(self) -> JSON:
        return {"src": self.src, "dest": self.dest, "mode": self.mode}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> InstallSystem:
        _only(raw, {"src", "dest", "mode"}, cls.op)
        return cls(_str(raw, "src", cls.op), _str(raw, "dest", cls.op),
                   _int(raw, "mode", cls.op))


@dataclass(frozen=True)
class RemoveSystem(_Plain):
    op: ClassVar[str] = "remove_system"
    path: str

    def request(self) -> JSON:
        return {"path": self.path}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> RemoveSystem:
        _only(raw, {"path"}, cls.op)
        return cls(_str(raw, "path", cls.op))


@dataclass(frozen=True)
class Prune(_Plain):
    """Remove the files directly in `path` matching `pattern` whose names are not in `keep`."""

    op: ClassVar[str] = "prune"
    path: str
    keep: tuple[str, ...]
    pattern: str

    def request(self) -> JSON:
        return {"path": self.path, "keep": list(self.keep), "pattern": self.pattern}

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> Prune:
        _only(raw, {"path", "keep", "pattern"}, cls.op)
        return cls(_str(raw, "path", cls.op), _strs(raw, "keep", cls.op),
                   _str(raw, "pattern", cls.op))


# ------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class Text:
    """Content the plan carries (rendered templates, plists, hostfiles): ``--diff`` shows it."""

    content: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data()).hexdigest()

    def data(self) -> bytes:
        return self.content.encode()


@dataclass(frozen=True)
class ControllerFile:
    """A file on the controller (a wheel): the plan holds its path and sha256, never its bytes,
    which apply reads when it sends them."""

    path: str
    sha256: str


Payload: TypeAlias = Text | ControllerFile


@dataclass(frozen=True)
class Write:
    """Write a file atomically; the agent verifies the bytes it got against `sha256` before the
    rename. The bytes travel on the agent's stdin, never in the request."""

    op: ClassVar[str] = "write"
    path: str
    mode: int
    payload: Payload

    @property
    def sha256(self) -> str:
        return self.payload.sha256

    def request(self) -> JSON:
        return {"path": self.path, "mode": self.mode, "sha256": self.sha256}

    def to_json(self) -> JSON:
        payload: JSON = ({"kind": "text", "content": self.payload.content}
                         if isinstance(self.payload, Text) else
                         {"kind": "controller_file", "path": self.payload.path,
                          "sha256": self.payload.sha256})
        return {"op": self.op, "path": self.path, "mode": self.mode, "payload": payload}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Write:
        _only(raw, {"path", "mode", "payload"}, cls.op)
        body: Mapping[str, Any] = _get(raw, "payload", dict, cls.op)
        what = f"{cls.op} payload"
        kind = body.get("kind")
        payload: Payload
        if kind == "text":
            _only(body, {"kind", "content"}, what)
            payload = Text(_str(body, "content", what))
        elif kind == "controller_file":
            _only(body, {"kind", "path", "sha256"}, what)
            payload = ControllerFile(_str(body, "path", what), _str(body, "sha256", what))
        else:
            raise ValueError(f"{what}: unknown kind {kind!r}")
        return cls(_str(raw, "path", cls.op), _int(raw, "mode", cls.op), payload)


# ------------------------------------------------------------------------------------- fetch


@dataclass(frozen=True)
class FromHub:
    """The seed copy comes from the Hub: the pinned commit's resolve URL."""

    kind: ClassVar[SeedKind] = "hub"


@dataclass(frozen=True)
class FromController:
    """The seed copy comes from the controller's verified copy (a local model, or a Hub
    model's small git files the manifest already fetched), sent through the `write` op."""

    kind: ClassVar[SeedKind] = "local"


@dataclass(frozen=True)
class FromPeer:
    """Another host of the cluster serves its copy over the LAN.

    ``scheduled``: the host holds no verified copy yet but fetches it earlier in this same
    apply, which waits for it. ``fallback``: the other hosts holding a verified copy now, in
    the order apply turns to them if this one cannot serve."""

    kind: ClassVar[str] = "peer"
    host: str
    scheduled: bool = False
    fallback: tuple[str, ...] = ()


Origin: TypeAlias = FromHub | FromController
Source: TypeAlias = FromHub | FromController | FromPeer


def origin(kind: SeedKind) -> Origin:
    """The source of a file's seed copy, from the manifest's `seed_kind`."""
    return FromController() if kind == "local" else FromHub()


def source_to_json(source: Source) -> JSON:
    if isinstance(source, FromPeer):
        return {"kind": source.kind, "host": source.host, "scheduled": source.scheduled,
                "fallback": list(source.fallback)}
    return {"kind": source.kind}


def source_from_json(raw: Mapping[str, Any]) -> Source:
    what = "fetch source"
    kind = raw.get("kind")
    if kind == FromPeer.kind:
        _only(raw, {"kind", "host", "scheduled", "fallback"}, what)
        return FromPeer(_str(raw, "host", what), bool(_get(raw, "scheduled", bool, what)),
                        _strs(raw, "fallback", what))
    _only(raw, {"kind"}, what)
    if kind == FromHub.kind:
        return FromHub()
    if kind == FromController.kind:
        return FromController()
    raise ValueError(f"{what}: unknown kind {kind!r}")


@dataclass(frozen=True)
class Fetch:
    """One model file into place, resumable and verified (size, sha256; git blob sha1 for
    small git files). `source` is None as a resource plans it; the cluster-wide pass
    (`orchestrator.plan.sources`) sets it. The agent's request holds a URL and headers that
    only apply knows (a per-run peer token, the Hub token), so `request` takes them."""

    op: ClassVar[str] = "fetch"
    path: str
    file: str  # relative to the model directory, as in the manifest
    size: int
    sha256: str
    git_sha1: str | None = None
    source: Source | None = None

    def request(self, url: str, headers: Mapping[str, str], *, timeout: int,
                retries: int | None = None, backoff: float | None = None,
                read_timeout: float | None = None) -> JSON:
        request: JSON = {"path": self.path, "size": self.size, "sha256": self.sha256,
                         "git_sha1": self.git_sha1, "timeout": timeout, "url": url,
                         "headers": dict(headers)}
        if read_timeout is not None:
            request["read_timeout"] = read_timeout
        if retries is not None:
            request["retries"] = retries
        if backoff is not None:
            request["backoff"] = backoff
        return request

    def from_controller(self, copy: str) -> Write:
        """The `write` that puts the controller's verified copy of the file in place."""
        return Write(self.path, 0o644, ControllerFile(copy, self.sha256))

    def to_json(self) -> JSON:
        return {"op": self.op, "path": self.path, "file": self.file, "size": self.size,
                "sha256": self.sha256, "git_sha1": self.git_sha1,
                "source": None if self.source is None else source_to_json(self.source)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Fetch:
        _only(raw, {"path", "file", "size", "sha256", "git_sha1", "source"}, cls.op)
        source = raw.get("source")
        return cls(_str(raw, "path", cls.op), _str(raw, "file", cls.op),
                   _int(raw, "size", cls.op), _str(raw, "sha256", cls.op),
                   _opt_str(raw, "git_sha1", cls.op),
                   None if source is None else source_from_json(_get(raw, "source", dict,
                                                                     cls.op)))


# ---------------------------------------------------------------------------------- the union


Step: TypeAlias = (Write | Mkdir | Remove | Rmdir | Run | LaunchdBootstrap | LaunchdBootout
                   | LaunchdKickstart | InstallSystem | RemoveSystem | Prune | Fetch)

_PLAIN: tuple[type[Mkdir | Remove | Rmdir | Run | LaunchdBootstrap | LaunchdBootout
                   | LaunchdKickstart | InstallSystem | RemoveSystem | Prune], ...] = (
    Mkdir, Remove, Rmdir, Run, LaunchdBootstrap, LaunchdBootout, LaunchdKickstart,
    InstallSystem, RemoveSystem, Prune)

STEP_TYPES: Mapping[str, type[Step]] = {t.op: t for t in (*_PLAIN, Write, Fetch)}


def step_from_json(raw: Mapping[str, Any]) -> Step:
    """A step from its JSON: ``{"op": OP, ...}``, or ``{"op": OP, "request": {...}}`` as an
    earlier orch wrote its managed record (its cleanup steps are all plain steps)."""
    op = raw.get("op")
    body = {k: v for k, v in raw.items() if k != "op"}
    legacy = set(body) == {"request"} and isinstance(body["request"], dict)
    for plain in _PLAIN:
        if plain.op == op:
            return plain.from_request(body["request"] if legacy else body)
    if legacy:
        raise ValueError(f"a {op!r} step in the shape of plan format 1: only a saved plan "
                         f"holds one, and such a plan must be made again")
    if op == Write.op:
        return Write.from_json(body)
    if op == Fetch.op:
        return Fetch.from_json(body)
    raise ValueError(f"unknown step op {op!r}")
