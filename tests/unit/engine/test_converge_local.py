"""Each resource converges and then reports no change: real agent, local HOME, no SSH.

`LocalConnection` runs the same agent as a remote host would; only the transport differs. These
tests pin down the core promise: after apply, facts give an empty diff (idempotence), and what
the plan says is exactly what apply does.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator.executor.fake import LocalConnection
from orchestrator.plan import HostPlan, diff_host, fact_request
from orchestrator.resources.base import Action, Resource
from orchestrator.resources.command import Command
from orchestrator.resources.files import Directory, File
from orchestrator.resources.pyenv import PythonEnv
from orchestrator.run.apply import HostStatus, apply_host
from tests.fixtures.facts import read_facts

CLUSTER = "local-test"


async def plan_for(conn: LocalConnection, resources: Sequence[Resource],
                   cluster: str = CLUSTER) -> HostPlan:
    return diff_host(cluster, resources, await read_facts(conn, resources, cluster))


def converge(home: Path, resources: Sequence[Resource],
             cluster: str = CLUSTER) -> tuple[HostPlan, HostPlan]:
    """Plan, apply, plan again; return (first plan, second plan)."""

    async def go() -> tuple[HostPlan, HostPlan]:
        conn = LocalConnection(home, name="node")
        try:
            first = await plan_for(conn, resources, cluster)
            outcome = await apply_host(conn, first)
            assert outcome.status in (HostStatus.CHANGED, HostStatus.OK), outcome.error
            return first, await plan_for(conn, resources, cluster)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_file_directory_and_command_converge_then_are_noops(tmp_path: Path) -> None:
    resources: list[Resource] = [
        Directory("~/conf", 0o750),
        File("~/conf/app.ini", "[app]\nname = it's \"quoted\" $(nope); ok\n", 0o640),
        Command("touch marker", ("touch", "marker"), creates="~/marker"),
        Command("only once", ("sh", "-c", "echo x >> count"), unless=("test", "-s", "count")),
    ]
    first, second = converge(tmp_path, resources)
    assert [c.action for c in first.changes] == [Action.CREATE] * 4
    assert second.changes == ()
    assert stat.S_IMODE((tmp_path / "conf").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "conf/app.ini").stat().st_mode) == 0o640
    assert (tmp_path / "conf/app.ini").read_text().endswith("$(nope); ok\n")
    assert (tmp_path / "count").read_text() == "x\n"


def test_one_changed_file_is_exactly_the_plan(tmp_path: Path) -> None:
    resources: list[Resource] = [File("~/a.txt", "a\n"), File("~/b.txt", "b\n", 0o600)]
    converge(tmp_path, resources)
    (tmp_path / "b.txt").write_text("tampered\n")
    os.chmod(tmp_path / "a.txt", 0o666)
    first, second = converge(tmp_path, resources)
    assert [(c.resource, c.action, [f.name for f in c.fields]) for c in first.changes] == [
        ("file:~/a.txt", Action.UPDATE, ["mode"]),
        ("file:~/b.txt", Action.UPDATE, ["sha256"]),
    ]
    assert second.changes == ()
    assert (tmp_path / "b.txt").read_text() == "b\n"


def test_undeclared_resources_are_removed(tmp_path: Path) -> None:
    converge(tmp_path, [File("~/keep", "k"), File("~/drop", "d"), Directory("~/emptydir")])
    first, second = converge(tmp_path, [File("~/keep", "k")])
    assert [(c.resource, c.action) for c in first.changes] == [
        ("directory:~/emptydir", Action.DELETE), ("file:~/drop", Action.DELETE)]
    assert not (tmp_path / "drop").exists() and not (tmp_path / "emptydir").exists()
    assert (tmp_path / "keep").read_text() == "k"
    assert second.changes == ()


def test_two_clusters_on_one_host_keep_their_own_records(tmp_path: Path) -> None:
    converge(tmp_path, [File("~/a", "a")], cluster="alpha")
    first, _ = converge(tmp_path, [File("~/b", "b")], cluster="beta")
    assert [c.resource for c in first.changes] == ["file:~/b"]
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_python_env_with_pinned_packages(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    _build_wheel(wheelhouse, "orchdemo", "1.2.3")
    env = PythonEnv("~/venv", sys.executable, ("orchdemo==1.2.3",),
                    pip_args=("--no-index", "--find-links", str(wheelhouse)))
    first, second = converge(tmp_path / "home", [env])
    assert [f.name for f in first.changes[0].fields] == ["venv", "package orchdemo"]
    assert second.changes == ()
    _build_wheel(wheelhouse, "orchdemo", "1.2.4")
    bumped = PythonEnv("~/venv", sys.executable, ("orchdemo==1.2.4",), env.pip_args)
    first, second = converge(tmp_path / "home", [bumped])
    assert [(f.name, f.before, f.after) for f in first.changes[0].fields] == [
        ("package orchdemo", "1.2.3", "1.2.4")]
    assert second.changes == ()


def _build_wheel(directory: Path, name: str, version: str) -> None:
    """A minimal pure-Python wheel, written by hand so the test needs no index."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
        wheel.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")


@pytest.mark.parametrize("value", ["plain", "sp ace", "q'uo\"te", "$(touch pwned)", "a;b", "é\n"])
def test_values_reach_the_host_literally(tmp_path: Path, value: str) -> None:
    name = value.replace("\n", "")
    converge(tmp_path, [File(f"~/{name}", value), Command("echo", ("touch", f"made {name}"),
                                                          creates=f"~/made {name}")])
    assert (tmp_path / name).read_text() == value
    assert (tmp_path / f"made {name}").exists()
    assert not (tmp_path / "pwned").exists()


def test_the_managed_record_lives_under_the_clusters_runtime_dir(tmp_path: Path) -> None:
    """Issue #13 item 6: a cluster whose runtime.dir is `.orch-b` keeps its record there, reads
    it back from there, and leaves ~/.orch alone but for the machine-wide caches."""
    resources: list[Resource] = [Directory("~/b-data", 0o755)]

    async def go() -> tuple[HostPlan, HostPlan]:
        conn = LocalConnection(tmp_path, name="node")

        async def plan() -> HostPlan:
            request = fact_request(resources, "b", ".orch-b")
            return diff_host("b", resources, await read_facts(conn, request))

        try:
            first = await plan()
            outcome = await apply_host(conn, first, state_dir=".orch-b")
            assert outcome.status is HostStatus.CHANGED, outcome.error
            return first, await plan()
        finally:
            await conn.close()

    first, second = asyncio.run(go())
    assert first.changes and not second.changes
    assert (tmp_path / ".orch-b" / "managed" / "b.json").is_file()
    assert not (tmp_path / ".orch" / "managed").exists()
