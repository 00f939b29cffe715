"""Which interpreter creates a node's venv: `runtime.python` resolved against the node's facts.

A stock Mac's ``python3`` is the Command Line Tools' 3.9 (or, without them, a stub that only
asks for their installation); mlx-lm needs 3.11 or later. The agent lists every interpreter it
finds (`orchestrator.agent.interpreters`), and this module picks one per node before anything
is planned: the venv is created by it, and the wheelhouse is downloaded for its version
(`orchestrator.resources.wheelhouse.cluster_platform`), so the two can never disagree.

``auto`` prefers a version every serving node has (one wheelhouse serves a ring only when the
nodes share it), the newest such, then on each node the newest patch release of it. A node
with nothing suitable is refused before any change, with what was found and the one command
that fixes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from orchestrator.config.models import PINS_REQUIRE_PYTHON
from orchestrator.errors import HostError, PlanError
from orchestrator.facts import HostFacts, Interpreter

__all__ = ["FIX_VERSION", "choose_python", "chosen_pythons", "described", "python_request"]

FIX_VERSION = "3.12"  # what the remedy installs: mlx publishes wheels for it on every macOS
VERSION = re.compile(r"^3\.\d+$")


def python_request(wanted: str) -> frozenset[str]:
    """Extra paths the agent should probe besides its discovery: the configured path, if any."""
    return frozenset({wanted}) if wanted.startswith(("/", "~/")) else frozenset()


def _floor_text(floor: tuple[int, int]) -> str:
    return f"{floor[0]}.{floor[1]}"


def _version_key(i: Interpreter) -> tuple[int, ...]:
    return tuple(int(x) for x in (i.version or "0").split(".") if x.isdigit())


def _matches(i: Interpreter, wanted: str, home: str) -> bool:
    if wanted == "auto":
        return True
    if VERSION.match(wanted):
        return i.version is not None and ".".join(i.version.split(".")[:2]) == wanted
    if wanted.startswith("~/"):
        wanted = f"{home.rstrip('/')}/{wanted[2:]}"
    if wanted.startswith("/"):
        # A simulated Mac's agent reports paths under its host root (the agent's `expand`).
        return i.path == wanted or i.path.endswith(wanted)
    return i.path.rsplit("/", 1)[-1] == wanted  # a command name: the first found by that name


def described(i: Interpreter) -> str:
    """How the refusal names what it found: `/usr/bin/python3 3.9.6`, or the stub."""
    if i.stub:
        return f"the Command Line Tools stub ({i.path}: the Command Line Tools are not installed)"
    return f"{i.path} {i.version}" if i.version else f"{i.path} (did not run)"


def _candidates(facts: HostFacts, wanted: str, floor: tuple[int, int]) -> list[Interpreter]:
    assert facts.pythons is not None
    return [i for i in facts.pythons.found
            if not i.stub and i.minor is not None and i.minor >= floor
            and _matches(i, wanted, facts.home)]


def _refusal(facts: HostFacts, wanted: str, floor: tuple[int, int]) -> str:
    assert facts.pythons is not None
    found = "; ".join(described(i) for i in facts.pythons.found) or "no Python at all"
    need = f"Python ≥ {_floor_text(floor)} (the pinned mlx-lm requires it)"
    fix_version = FIX_VERSION
    if VERSION.match(wanted):
        need = f"Python {wanted} (runtime.python), and the pins need ≥ {_floor_text(floor)}"
        fix_version = wanted
    elif wanted != "auto":
        return (f"{facts.host}: runtime.python is {wanted!r}, but no such {need} was found "
                f"(found: {found}). Fix: install it there, or set runtime.python: auto")
    return (f"{facts.host}: needs {need} to create orch's venv; found: {found}. "
            f"Fix: `brew install python@{fix_version}` (or `uv python install {fix_version}`)")


def choose_python(facts: HostFacts, wanted: str,
                  floor: tuple[int, int] = PINS_REQUIRE_PYTHON) -> Interpreter:
    """The newest interpreter of `facts` that `wanted` names and the pins accept.

    Facts that were not asked for interpreters (tables and tools that plan without them)
    keep the old meaning: ``python3`` on the node's PATH, at the agent's version.
    """
    if facts.pythons is None:
        path = wanted if wanted != "auto" and not VERSION.match(wanted) else "python3"
        return Interpreter(path, facts.python_version)
    found = _candidates(facts, wanted, floor)
    if not found:
        raise PlanError(_refusal(facts, wanted, floor))
    return max(found, key=_version_key)


def chosen_pythons(facts: Mapping[str, HostFacts | HostError], nodes: Sequence[str],
                   wanted: str, floor: tuple[int, int] = PINS_REQUIRE_PYTHON
                   ) -> dict[str, Interpreter]:
    """Each answering serving node's interpreter; PlanError naming every node refused
    ("nothing was changed": this runs before any host is touched)."""
    known = {n: f for n in nodes if isinstance(f := facts.get(n), HostFacts)}
    refused: list[str] = []
    result: dict[str, Interpreter] = {}
    common: set[tuple[int, int]] | None = None
    for name, fact in known.items():
        try:
            result[name] = choose_python(fact, wanted, floor)
        except PlanError as exc:
            refused.append(str(exc))
            continue
        if fact.pythons is not None:
            minors = {m for i in _candidates(fact, wanted, floor) if (m := i.minor)}
            common = minors if common is None else common & minors
    if refused:
        raise PlanError("nothing was changed: " + "\n".join(refused))
    if wanted == "auto" and common:
        best = max(common)
        for name, fact in known.items():
            if fact.pythons is not None:
                result[name] = max((i for i in _candidates(fact, wanted, floor)
                                    if i.minor == best), key=_version_key)
    return result
