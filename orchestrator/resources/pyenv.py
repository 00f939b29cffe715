"""A Python virtual environment on a node with exactly the pinned packages."""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.facts import FactRequest, HostFacts
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import Remove, Run, Step


def normalize(name: str) -> str:
    """PEP 503: `MLX_LM`, `mlx.lm` and `mlx-lm` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _minor(version: str | None) -> str | None:
    """``3.12.4`` → ``3.12`` (pyvenv.cfg's ``version``); None stays None."""
    return ".".join(version.split(".")[:2]) if version else None


def pins(requirements: tuple[str, ...]) -> dict[str, str]:
    """{normalized name: version} from `name==version` (extras dropped: they pin no version)."""
    result: dict[str, str] = {}
    for requirement in requirements:
        name, version = requirement.split("==", 1)
        result[normalize(name.split("[", 1)[0])] = version
    return result


@dataclass(frozen=True)
class PythonEnv:
    """`path` is HOME-relative ("~/.orch/venv"); commands run from HOME so no shell expands it."""

    path: str
    python: str
    packages: tuple[str, ...]
    pip_args: tuple[str, ...] = ()  # e.g. ("--find-links", wheelhouse, "--no-index")
    # runtime.python as configured; `python` is what it resolved to on this node. The facts
    # ask for the node's interpreters (and this path, if it is one) from the configured value,
    # so a request made before the choice equals the one made after it.
    choice: str = "auto"
    # The Python (major.minor, "3.12") the venv must run: the wheelhouse's. A venv made by
    # another one (a newer interpreter appeared, runtime.python changed) is made again, or
    # the wheels for one version would be installed into the other.
    python_version: str | None = None

    @property
    def id(self) -> str:
        return f"python_env:{self.path}"

    def facts_needed(self) -> FactRequest:
        probe = frozenset({self.choice}) if self.choice.startswith(("/", "~/")) else frozenset()
        return FactRequest(venvs=frozenset({self.path}), pythons=probe)

    def diff(self, facts: HostFacts) -> Change | None:
        venv = facts.venvs[self.path]
        wanted = pins(self.packages)
        fields = [FieldChange(f"package {name}", venv.packages.get(name), version)
                  for name, version in sorted(wanted.items())
                  if venv.packages.get(name) != version]
        had = _minor(venv.python_version)
        remake = (venv.exists and self.python_version is not None and had is not None
                  and had != self.python_version)
        if venv.exists and not fields and not remake:
            return None
        relative = self.path.removeprefix("~/")
        steps: list[Step] = []
        if not venv.exists:
            fields.insert(0, FieldChange("venv", "missing", self.path))
            steps.append(Run((self.python, "-m", "venv", relative), cwd="~"))
        elif remake:
            fields.insert(0, FieldChange("python", had, self.python_version))
            steps.append(Run((self.python, "-m", "venv", "--clear", relative), cwd="~"))
        if self.packages:
            install = (f"{relative}/bin/python", "-m", "pip", "install", "--quiet",
                       "--disable-pip-version-check", *self.pip_args, *self.packages)
            steps.append(Run(install, cwd="~"))
        action = Action.UPDATE if venv.exists else Action.CREATE
        return Change(self.id, action, tuple(fields), tuple(steps), cleanup=self.cleanup())

    def cleanup(self) -> tuple[Step, ...]:
        return (Remove(self.path),)
