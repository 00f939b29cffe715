"""The wheelhouse: platform tags, explicit MLX backends, the controller cache, the push."""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.errors import PlanError
from orchestrator.executor.fake import LocalConnection
from orchestrator.resources.base import Action
from orchestrator.resources.steps import ControllerFile, Mkdir, Remove, Write
from orchestrator.resources.wheelhouse import (
    NodePlatform,
    Wheel,
    WheelhouseFiles,
    cluster_platform,
    node_requirements,
    platform_of,
)
from orchestrator.run.apply import run_step
from orchestrator.run.wheelhouse import build_wheelhouse
from tests.unit.serving.helpers import facts, file_fact

LINUX = NodePlatform("Linux", "x86_64", "3.11", glibc="2.36")
MAC = NodePlatform("Darwin", "arm64", "3.11", "14.5")


def test_pip_platform_tags() -> None:
    tags = LINUX.pip_platforms()
    # pip does not expand manylinux_2_X: numpy's manylinux_2_27 wheel needs its own tag
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_27_x86_64" in tags
    assert tags[-3:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
    assert MAC.pip_platforms() == ["macosx_14_0_arm64"]  # pip expands older macOS itself
    assert replace(MAC, os_version="15.3.1").pip_platforms() == ["macosx_15_0_arm64"]
    with pytest.raises(PlanError):
        replace(LINUX, glibc=None).pip_platforms()


def test_node_requirements_make_the_backend_explicit() -> None:
    pins = ("mlx==0.32.4", "mlx-lm==0.32.2")
    assert node_requirements(pins, "Linux") == ("mlx[cpu]==0.32.4", "mlx-lm==0.32.2",
                                                "mlx-cpu==0.32.4")
    assert node_requirements(("mlx[cpu]==0.32.4", "mlx-lm==0.32.2"), "Darwin") == (
        "mlx==0.32.4", "mlx-lm==0.32.2", "mlx-metal==0.32.4")
    assert node_requirements(("MLX[cpu]==1.0", "mlx-cpu==1.0"), "Linux") == (
        "MLX[cpu]==1.0", "mlx-cpu==1.0")
    assert node_requirements(("numpy==2.0",), "Darwin") == ("numpy==2.0",)


def test_wheel_pins_come_from_file_names() -> None:
    assert Wheel("mlx_lm-0.32.2-py3-none-any.whl", "", 0).pin == "mlx-lm==0.32.2"
    assert Wheel("Foo.Bar-1.0-1build-cp311-cp311-linux_x86_64.whl", "", 0).pin == "foo-bar==1.0"
    with pytest.raises(ValueError, match="not a wheel"):
        _ = Wheel("notawheel.tar.gz", "", 0).pin


def test_platform_of_facts_and_one_platform_for_the_cluster() -> None:
    mac = facts("mac1")
    assert platform_of(mac) == MAC
    linux = replace(facts("w1"), os_system="Linux")
    node = platform_of(linux)
    assert (node.system, node.machine, node.python) == ("Linux", platform.machine(), "3.11")
    newer = replace(facts("mac2"), macos_version="15.1")
    assert cluster_platform([newer, mac]).os_version == "14.5"  # the oldest macOS installs
    with pytest.raises(PlanError, match="share OS, CPU and Python"):
        cluster_platform([mac, replace(facts("mac2"), python_version="3.12.1")])
    with pytest.raises(PlanError, match="cannot serve MLX on Windows"):
        platform_of(replace(mac, os_system="Windows"))


FAKE_PIP = """\
import json, pathlib, sys
args = sys.argv[1:]
log = pathlib.Path(__file__).with_name("calls.jsonl")
with log.open("a") as f:
    f.write(json.dumps(args) + "\\n")
if "broken==1" in args:
    sys.stderr.write("ERROR: No matching distribution found for broken==1\\n")
    sys.exit(1)
dest = pathlib.Path(args[args.index("--dest") + 1])
(dest / "mlx-0.32.4-cp311-cp311-manylinux_2_35_x86_64.whl").write_bytes(b"\\x00\\xffmlx")
(dest / "mlx_cpu-0.32.4-py3-none-manylinux_2_35_x86_64.whl").write_bytes(b"cpu")
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """An interpreter stand-in: `<it> -m pip download ...` writes two wheels and logs."""
    script = tmp_path / "bin" / "pip.py"
    script.parent.mkdir()
    script.write_text(FAKE_PIP)
    python = tmp_path / "bin" / "python"
    python.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_build_downloads_once_then_reuses_the_cache(tmp_path: Path, fake_python: Path) -> None:
    cache = tmp_path / "cache"
    house = build_wheelhouse(("mlx==0.32.4", "mlx-lm==0.32.2"), LINUX, cache,
                             python=str(fake_python))
    calls = [json.loads(line) for line in (fake_python.parent / "calls.jsonl").open()]
    assert len(calls) == 1
    args = calls[0]
    assert args[:1] == ["download"] and "--only-binary=:all:" in args
    assert args[args.index("--python-version") + 1] == "3.11"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--platform"] == \
        LINUX.pip_platforms()
    assert args[-3:] == ["mlx[cpu]==0.32.4", "mlx-lm==0.32.2", "mlx-cpu==0.32.4"]
    assert [w.filename for w in house.wheels] == [
        "mlx-0.32.4-cp311-cp311-manylinux_2_35_x86_64.whl",
        "mlx_cpu-0.32.4-py3-none-manylinux_2_35_x86_64.whl"]
    assert house.wheels[0].sha256 == hashlib.sha256(b"\x00\xffmlx").hexdigest()
    assert house.pins == ("mlx-cpu==0.32.4", "mlx==0.32.4")
    assert house.total_bytes == 8
    again = build_wheelhouse(("mlx==0.32.4", "mlx-lm==0.32.2"), LINUX, cache,
                             python=str(fake_python))
    assert again == house
    assert len((fake_python.parent / "calls.jsonl").read_text().splitlines()) == 1
    (house.directory / house.wheels[0].filename).write_bytes(b"truncated")  # size differs
    repaired = build_wheelhouse(("mlx==0.32.4", "mlx-lm==0.32.2"), LINUX, cache,
                                python=str(fake_python))
    assert repaired == house  # downloaded again, into the same place
    assert len((fake_python.parent / "calls.jsonl").read_text().splitlines()) == 2


def test_a_failed_download_names_pip_error(tmp_path: Path, fake_python: Path) -> None:
    with pytest.raises(PlanError, match="No matching distribution found for broken==1"):
        build_wheelhouse(("broken==1",), LINUX, tmp_path / "cache", python=str(fake_python))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".download")]


def test_push_resource_writes_only_missing_wheels_from_the_controller_cache() -> None:
    wheels = (Wheel("a-1-py3-none-any.whl", "a" * 64, 1), Wheel("b-1-py3-none-any.whl",
                                                                "b" * 64, 2))
    push = WheelhouseFiles("~/.orch/wheelhouse/k", "/cache/k", wheels)
    assert push.id == "wheelhouse:~/.orch/wheelhouse/k"
    paths = [f"~/.orch/wheelhouse/k/{w.filename}" for w in wheels]
    names = [f"k/{w.filename}" for w in wheels]
    # one listing of the wheelhouse root: which wheels are wanted is known only after facts
    assert push.facts_needed().trees == frozenset({"~/.orch/wheelhouse"})
    assert push.facts_needed().files == frozenset()
    none = facts(trees={"~/.orch/wheelhouse": {"other/x.whl": file_fact("c" * 64)}})
    change = push.diff(none)
    assert change is not None and change.action is Action.CREATE
    assert change.steps == (
        Write(paths[0], 0o644, ControllerFile("/cache/k/a-1-py3-none-any.whl", "a" * 64)),
        Write(paths[1], 0o644, ControllerFile("/cache/k/b-1-py3-none-any.whl", "b" * 64)))
    half = facts(trees={"~/.orch/wheelhouse": {names[0]: file_fact("a" * 64),
                                               names[1]: file_fact("0" * 64)}})
    change = push.diff(half)
    assert change is not None and change.action is Action.UPDATE
    assert [s.path for s in change.steps if isinstance(s, Write)] == [paths[1]]
    assert len(change.steps) == 1
    assert change.fields[0].before == "1 of 2 present"
    done = facts(trees={"~/.orch/wheelhouse": {names[0]: file_fact("a" * 64),
                                               names[1]: file_fact("b" * 64)}})
    assert push.diff(done) is None
    assert push.cleanup() == (Remove("~/.orch/wheelhouse/k"),)


def test_run_step_pushes_binary_bytes_verified(tmp_path: Path) -> None:
    data = bytes(range(256)) * 100  # not UTF-8: the inline `content` path could not carry it
    source = tmp_path / "w.whl"
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    conn = LocalConnection(tmp_path / "home", name="node")
    step = Write("~/wh/w.whl", 0o644, ControllerFile(str(source), sha))

    async def go() -> None:
        try:
            assert (await run_step(conn, step))["changed"] is True
            await run_step(conn, Mkdir("~/other", 0o755))
            bad = Write("~/wh/w.whl", 0o644, ControllerFile(str(source), "0" * 64))
            from orchestrator.errors import ActionFailed

            with pytest.raises(ActionFailed, match="sha256 mismatch"):
                await run_step(conn, bad)
        finally:
            await conn.close()

    asyncio.run(go())
    assert (tmp_path / "home" / "wh" / "w.whl").read_bytes() == data
    assert (tmp_path / "home" / "other").is_dir()
