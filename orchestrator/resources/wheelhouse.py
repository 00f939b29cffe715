"""Packages reach N nodes with one download: a wheelhouse the controller builds and pushes.

The controller runs ``pip download --only-binary=:all: --platform … --python-version …`` once
for the nodes' platform (`orchestrator.run.wheelhouse`, at apply time) into its own cache
(``~/.cache/orch/wheelhouse/<request key>/``), pushes the wheels to each node
(``~/.orch/serve/<cluster>/wheelhouse/<content key>/``, through the agent's ``write``,
sha256-verified), and every node installs with ``--no-index --find-links`` from that
directory. PyPI is asked once per (platform, pinned packages), not once per node, and a node
never needs to reach the internet.

Identical on every node: the wheelhouse is also a lock. The venv is declared with every wheel
pinned (``numpy==2.4.6``, ``transformers==5.24.0``, … not just mlx and mlx-lm), so the venv
facts of a node that differs in any package are drift, and a node added months later gets
the same bytes as the others (the controller's cache is content-addressed and reused).

Measured on this kind of machine (Linux x86_64, CPython 3.11): for ``mlx[cpu]==0.32.4`` +
``mlx-lm==0.32.2`` the wheelhouse is 38 wheels, 59 MB (numpy 17 MB, transformers 13.5 MB,
mlx-cpu 10.5 MB; mlx-lm pulls transformers, tokenizers, huggingface_hub, pydantic, …) and
downloads in ~9 s; a venv plus an offline install from it takes ~13 s per node (5 s venv,
7 s pip with ``--no-compile``, 19 s without; 355 MB installed). For macOS arm64 it is 38
wheels, 80 MB (mlx-metal alone 45 MB). Pushing 61 MB to a node over SSH takes about a second
on loopback, so on a LAN the push is bounded by bandwidth, once per node (the sync's
peer-to-peer transfer could carry it later).

Two traps, both handled here:

* pip's ``--platform`` does not expand ``manylinux_2_X`` tags (only macOS and the legacy
  ``manylinux2014`` aliases): every glibc minor down to 2.17 is passed explicitly, or numpy
  (``manylinux_2_27``) is "not found" for a ``manylinux_2_35`` node.
* environment markers are evaluated on the *controller*: mlx's ``mlx-metal; platform_system ==
  "Darwin"`` is silently skipped when a Linux controller downloads for Macs (and ``mlx-cpu``
  when a Mac downloads for Linux). The backend package is therefore requested explicitly.

Pushing uses ``write`` steps whose bytes come from a controller file (``"source"``) instead of
inline text, so a 45 MB wheel is neither held in the plan nor decoded as UTF-8
(`orchestrator.run.apply.run_step` reads it at apply time); the plan JSON holds the source path and
the sha256 the agent verifies, so a saved plan stays exact.
"""

from __future__ import annotations

import hashlib
import platform as platform_module
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import PlanError
from orchestrator.facts import FactRequest, HostFacts, Interpreter
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.pyenv import normalize
from orchestrator.resources.steps import ControllerFile, Remove, Step, Write

__all__ = [
    "NodePlatform",
    "Wheel",
    "Wheelhouse",
    "WheelhouseFiles",
    "cluster_platform",
    "node_requirements",
    "platform_of",
]

MANIFEST = "orch-wheelhouse.json"
OLDEST_GLIBC_MINOR = 17  # manylinux2014
WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


@dataclass(frozen=True, order=True)
class NodePlatform:
    """What decides which wheels a node can install."""

    system: str  # "Darwin" or "Linux" (platform.system())
    machine: str  # "arm64", "x86_64", "aarch64"
    python: str  # "3.11": the venv's interpreter, major.minor
    os_version: str | None = None  # macOS product version ("14.5"); None on Linux
    glibc: str | None = None  # "2.36" on Linux; None on macOS

    def pip_platforms(self) -> list[str]:
        """``--platform`` values for ``pip download`` (pip expands macOS versions itself)."""
        if self.system == "Darwin":
            major = (self.os_version or "14").split(".")[0]
            return [f"macosx_{major}_0_{self.machine}"]
        if self.system == "Linux":
            if self.glibc is None:
                raise PlanError("a Linux node's glibc version is unknown: cannot pick wheels")
            minor = int(self.glibc.split(".")[1])
            tags = [f"manylinux_2_{m}_{self.machine}"
                    for m in range(minor, OLDEST_GLIBC_MINOR - 1, -1)]
            return [*tags, f"manylinux2014_{self.machine}", f"linux_{self.machine}"]
        raise PlanError(f"no wheels for nodes running {self.system}")

    @property
    def key(self) -> str:
        if self.system == "Darwin":
            return f"macos{(self.os_version or '14').split('.')[0]}-{self.machine}-py{self.python}"
        return f"linux-glibc{self.glibc}-{self.machine}-py{self.python}"


def platform_of(facts: HostFacts, python_exe: Interpreter | None = None) -> NodePlatform:
    """A node's platform from its facts and the interpreter chosen for its venv.

    The Python version is the venv's interpreter's (`orchestrator.resources.interpreter`),
    not the agent's: on a stock Mac the agent runs under the system's 3.9 while the venv is
    made by a newer Python, and wheels for the wrong one do not install. Without a chosen
    interpreter, the agent's own version stands in (facts not asked for interpreters).
    Facts carry the OS, its version and the Python version, not the CPU or libc: a Mac that
    runs MLX is Apple silicon (arm64); a Linux node is one of orch's simulated Macs, which
    run on this machine, so its machine and glibc are the controller's own.
    """
    version = python_exe.version if python_exe and python_exe.version else facts.python_version
    python = ".".join(version.split(".")[:2])
    if facts.os_system == "Darwin":
        return NodePlatform("Darwin", "arm64", python, facts.macos_version or None)
    if facts.os_system == "Linux":
        libc, version = platform_module.libc_ver()
        return NodePlatform("Linux", platform_module.machine(), python,
                            glibc=version if libc == "glibc" and version else None)
    raise PlanError(f"{facts.host}: cannot serve MLX on {facts.os_system}")


def cluster_platform(facts: Iterable[HostFacts],
                     pythons: Mapping[str, Interpreter] | None = None) -> NodePlatform:
    """The one platform every node can install from: the oldest macOS among them.

    One wheelhouse for the whole cluster is what makes the nodes identical (a wheel built for
    macOS 14 installs on 15; mlx publishes per-macOS builds). Nodes that differ in OS,
    architecture or Python version cannot share one, and that is an error, not drift to fix.
    """
    platforms = [(f.host, platform_of(f, (pythons or {}).get(f.host))) for f in facts]
    if not platforms:
        raise PlanError("no nodes to build a wheelhouse for")
    kinds = {(p.system, p.machine, p.python, p.glibc) for _, p in platforms}
    if len(kinds) > 1:
        described = ", ".join(f"{h}: {p.key}" for h, p in platforms)
        raise PlanError(f"the nodes must share OS, CPU and Python version to run one ring "
                        f"({described})")
    if platforms[0][1].system != "Darwin":
        return platforms[0][1]
    return min((p for _, p in platforms), key=lambda p: _version_tuple(p.os_version))


def _version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in (version or "0").split(".") if x.isdigit())


def node_requirements(packages: Sequence[str], system: str) -> tuple[str, ...]:
    """The cluster's pins with the node's MLX backend made explicit.

    Linux: ``mlx[cpu]`` and ``mlx-cpu`` (the CPU build); macOS: ``mlx-metal`` (the Metal
    build) and no ``cpu`` extra. Explicit because pip evaluates mlx's ``platform_system``
    markers on the controller when it downloads for another platform.
    """
    result: list[str] = []
    backend: str | None = None
    for requirement in packages:
        name, sep, version = requirement.partition("==")
        base, _, extras = name.partition("[")
        if normalize(base) == "mlx" and sep:
            wanted = {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}
            wanted.discard("cpu")
            if system == "Linux":
                wanted.add("cpu")
                backend = f"mlx-cpu=={version}"
            elif system == "Darwin":
                backend = f"mlx-metal=={version}"
            extra = f"[{','.join(sorted(wanted))}]" if wanted else ""
            result.append(f"{base}{extra}=={version}")
        else:
            result.append(requirement)
    if backend is not None and not any(normalize(r.partition("==")[0]) == backend.split("==")[0]
                                       for r in result):
        result.append(backend)
    return tuple(result)


@dataclass(frozen=True, order=True)
class Wheel:
    filename: str
    sha256: str
    size: int

    @property
    def pin(self) -> str:
        """``name==version`` from the file name (PEP 427), PEP 503-normalized."""
        match = WHEEL_RE.match(self.filename)
        if match is None:
            raise ValueError(f"not a wheel file name: {self.filename}")
        return f"{normalize(match['name'])}=={match['version']}"


@dataclass(frozen=True)
class Wheelhouse:
    """A complete set of wheels for one platform and one list of pins, on the controller."""

    directory: Path
    platform: NodePlatform
    requirements: tuple[str, ...]
    wheels: tuple[Wheel, ...]

    @property
    def key(self) -> str:
        """Content address: changes exactly when a wheel does."""
        digest = hashlib.sha256()
        for wheel in sorted(self.wheels):
            digest.update(f"{wheel.filename}\0{wheel.sha256}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def total_bytes(self) -> int:
        return sum(w.size for w in self.wheels)

    @property
    def pins(self) -> tuple[str, ...]:
        """Every package at the exact version in the wheelhouse: the venv's lock."""
        return tuple(sorted(w.pin for w in self.wheels))

    def files(self, node_dir: str) -> WheelhouseFiles:
        return WheelhouseFiles(node_dir, str(self.directory), tuple(sorted(self.wheels)))


@dataclass(frozen=True)
class WheelhouseFiles:
    """The controller's wheels present on a node, byte for byte (one resource per wheelhouse).

    The node directory is keyed by the wheelhouse's content, so ``--find-links`` never sees a
    stale wheel; an older wheelhouse becomes a removal through the managed record.
    """

    path: str  # on the node, HOME-relative: "~/.orch/serve/<cluster>/wheelhouse/<key>"
    source: str  # the controller's directory holding the same wheels
    wheels: tuple[Wheel, ...]

    @property
    def id(self) -> str:
        return f"wheelhouse:{self.path}"

    def _node_path(self, wheel: Wheel) -> str:
        return f"{self.path}/{wheel.filename}"

    @property
    def root(self) -> str:
        """The directory every wheelhouse of the node lives in, listed by facts.

        Listed, not asked file by file: which wheels a node needs follows from its platform,
        which the same facts call reports, so one round trip answers both.
        """
        return self.path.rsplit("/", 1)[0]

    def facts_needed(self) -> FactRequest:
        return FactRequest(trees=frozenset({self.root}))

    def diff(self, facts: HostFacts) -> Change | None:
        listed = facts.tree(self.root)
        key = self.path.rsplit("/", 1)[1]
        missing = [w for w in self.wheels
                   if (fact := listed.get(f"{key}/{w.filename}")) is None
                   or fact.sha256 != w.sha256]
        if not missing:
            return None
        total = len(self.wheels)
        have = total - len(missing)
        megabytes = sum(w.size for w in missing) / 1e6
        fields = (FieldChange("wheels", f"{have} of {total} present",
                              f"{total} present (+{len(missing)}, {megabytes:.1f} MB)"),)
        steps = tuple(Write(self._node_path(w), 0o644,
                            ControllerFile(f"{self.source}/{w.filename}", w.sha256))
                      for w in missing)
        action = Action.CREATE if have == 0 else Action.UPDATE
        return Change(self.id, action, fields, steps, cleanup=self.cleanup())

    def cleanup(self) -> tuple[Step, ...]:
        return (Remove(self.path),)
