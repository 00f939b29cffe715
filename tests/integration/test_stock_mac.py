"""A stock Mac, as orch first meets it: its Python and its disk, refused before any change;
then converged for real (venv, wheels, a serving rank) by the Homebrew 3.11 that appears on its
disk, and again by the newer uv 3.12 that appears next: the venv and the wheels follow.

Simulated Macs of this file's own (127.0.0.61-64) through the real CLI. Their interpreters are
real: a stock Mac's ``python3`` is a real Python 3.9 linked as its /usr/bin/python3 (orch's
agent runs on it), or the Command Line Tools' stub (exit 1, the real message); a newer one
sits where Homebrew or uv puts it. The free disk is real too: a tmpfs smaller than the model,
mounted over the node's orch directory (the tests run as root, as CI does).

Each apply installs the default pins (mlx, mlx-lm) from a wheelhouse the controller downloads
once per Python version into its cache (~/.cache/orch; the 3.11 one is the e2e sandbox's too):
the pins every cluster gets, so the wheelhouse → venv path is the one users take, and the tiny
model's one rank proves the venv really runs mlx-lm.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import parse_wheel_filename

from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import (
    CLT_STUB,
    GIB,
    HostSpec,
    RunningHost,
    start_hosts,
    stop_hosts,
)
from orchestrator.simulator.tiny_model import make_tiny_deepseek
from tests.fixtures.cli import orch
from tests.integration.conftest import TreeHash

Start = Callable[[HostSpec], RunningHost]
VOLATILE = ("log", "run", "tmp")  # the sshd log, launchd's socket, session temp files


def real_python(minor: str) -> str:
    """A real interpreter of Python `minor` ("3.9") on this machine (not a pyenv shim):
    on PATH, else beside the running one (pyenv's versions/<X.Y.Z>/bin)."""
    beside = sorted(Path(sys.base_prefix).parent.glob(f"{minor}.*/bin/python{minor}"))
    for candidate in [shutil.which(f"python{minor}"), *map(str, beside)]:
        if candidate is None:
            continue
        done = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return done.stdout.strip()
    raise AssertionError(f"these tests need a real Python {minor} (a stock Mac's is 3.9)")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_tiny_deepseek(tmp_path / "model", n_layers=4, n_files=2)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    started: list[RunningHost] = []

    def boot(spec: HostSpec) -> RunningHost:
        [host] = start_hosts(tmp_path / "hosts", [spec])
        started.append(host)
        return host

    yield boot
    stop_hosts(list({h.name: h for h in started}.values()))  # a restarted host: its last boot


def serve_cluster(tmp_path: Path, host: RunningHost, model: Path, runtime: str = "") -> Path:
    (tmp_path / "inventory.yml").write_text(inventory_yaml([host]))
    cluster = tmp_path / "serve.yml"
    cluster.write_text(f"name: serve\ninventory: inventory.yml\nmodel:\n  path: {model}\n"
                       f"placement:\n  nodes: [{host.name}]\n{runtime}")
    return cluster


def test_a_stock_mac_with_python_3_9_is_refused_naming_it_then_a_newer_one_is_chosen(
        tmp_path: Path, model: Path, start: Start, tree_hash: TreeHash) -> None:
    stock = HostSpec("stock", 64 * GIB, "Apple M4 Pro", address="127.0.0.61",
                     python3=real_python("3.9"))
    host = start(stock)
    cluster = serve_cluster(tmp_path, host, model)
    before = tree_hash(host, "", exclude=VOLATILE)
    refused = orch("plan", cluster, known_hosts=host.known_hosts_file)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout == ""
    assert "nothing was changed" in refused.stderr
    assert "stock: needs Python ≥ 3.11 (the pinned mlx-lm requires it)" in refused.stderr
    assert f"found: {host.root}/usr/bin/python3 3.9." in refused.stderr  # the agent ran on it
    assert "Fix: `brew install python@3.12` (or `uv python install 3.12`)" in refused.stderr
    assert tree_hash(host, "", exclude=VOLATILE) == before, "plan changed the host"

    # `runtime.python: "3.12"` names what it wants when the Mac lacks it
    pinned = serve_cluster(tmp_path, host, model, 'runtime:\n  python: "3.12"\n')
    refused = orch("plan", pinned, known_hosts=host.known_hosts_file)
    assert refused.returncode == 1 and "needs Python 3.12 (runtime.python)" in refused.stderr
    assert "`brew install python@3.12`" in refused.stderr

    # Homebrew's 3.11 appears (the host's disk as it was, plus it): apply makes the venv with it
    stop_hosts([host])
    brew = ("/opt/homebrew/bin/python3.11", real_python("3.11"))
    host = start(replace(stock, pythons=(brew,)))
    cluster = serve_cluster(tmp_path, host, model)
    applied = orch("apply", cluster, "--yes", known_hosts=host.known_hosts_file)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    venv = host.home / ".orch/serve/serve/venv"
    assert_venv_of(venv, host.root / "opt/homebrew/bin", (3, 11))

    # then uv's 3.12 too: auto takes the newest, and the wheelhouse and the venv follow it
    stop_hosts([host])
    newer = replace(stock, pythons=(brew, ("~/.local/share/uv/python/cpython-3.12-macos-"
                                           "aarch64-none/bin/python3.12", real_python("3.12"))))
    host = start(newer)
    cluster = serve_cluster(tmp_path, host, model)
    planned = orch("plan", cluster, "--json", known_hosts=host.known_hosts_file)
    assert planned.returncode == 0, planned.stderr
    assert wheelhouse_planned(json.loads(planned.stdout)) == "py3.12"
    uv_python = str(host.home / ".local/share/uv/python/cpython-3.12-macos-aarch64-none/bin/"
                    "python3.12")
    checked = json.loads(planned.stdout)["preflight"]["stock"]  # what plan prints per node
    assert (checked["python"], checked["python_version"][:5]) == (uv_python, "3.12."), checked

    facts = json.loads(orch("facts", cluster, known_hosts=host.known_hosts_file).stdout)
    found = facts["stock"]["pythons"]["found"]
    assert [(p["path"].removeprefix(str(host.root)), p["version"][:4]) for p in found] == [
        ("/usr/bin/python3", "3.9."), ("/opt/homebrew/bin/python3.11", "3.11"),
        ("/home/.local/share/uv/python/cpython-3.12-macos-aarch64-none/bin/python3.12", "3.12")]
    assert facts["stock"]["pythons"]["developer_tools"] is True

    # apply: the venv is made again by uv's 3.12, from wheels for 3.12 (the 3.11 ones are
    # removed), and the ring serves
    applied = orch("apply", cluster, "--yes", known_hosts=host.known_hosts_file)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "python: 3.11 → 3.12" in applied.stdout, applied.stdout
    assert "Ring: serving at" in applied.stdout, applied.stdout
    assert_venv_of(venv, Path(uv_python).parent, (3, 12))
    wheels = sorted((host.home / ".orch/serve/serve/wheelhouse").glob("*/*.whl"))
    assert_wheels_fit(wheels, venv / "bin/python")
    assert any("-cp312-cp312-" in w.name for w in wheels), [w.name for w in wheels]  # mlx

    # converged: nothing left to change; the agent still runs on the Mac's own 3.9
    again = orch("plan", cluster, "--detailed-exitcode", known_hosts=host.known_hosts_file)
    assert again.returncode == 0, again.stdout + again.stderr
    line = next(x for x in again.stdout.splitlines() if x.startswith("  stock: macOS "))
    assert "· Python 3.12." in line and f"({uv_python}) · sudo -n ok · disk 0.0 MB to " \
        "fetch (" in line, again.stdout
    shown = orch("status", cluster, "--json", "--no-probe", known_hosts=host.known_hosts_file)
    node = json.loads(shown.stdout)["nodes"][0]
    assert node["worker"] == "running", shown.stdout + shown.stderr
    assert (node["preflight"]["python"], node["preflight"]["sudo"],
            node["preflight"]["disk_needed"]) == (uv_python, True, 0), node
    facts = json.loads(orch("facts", cluster, known_hosts=host.known_hosts_file).stdout)
    assert facts["stock"]["python_version"].startswith("3.9."), facts["stock"]["python_version"]


def wheelhouse_planned(plan: dict[str, Any]) -> str:
    """The Python ("py3.12") of the wheelhouse a plan installs from: in the download it
    plans (not yet in this controller's cache), else in the cache directory its wheels are
    pushed from (``~/.cache/orch/wheelhouse/linux-…-py3.12-<key>/``)."""
    changes = [c for h in plan["hosts"] for c in h["changes"]
               if c["resource"].startswith("wheelhouse:")]
    sources = {Path(s["payload"]["path"]).parent.name for c in changes for s in c["steps"]
               if s["op"] == "write" and s["payload"]["kind"] == "controller_file"}
    named = {c["resource"] for c in changes if not sources} | sources
    pythons: set[str] = set()
    for name in named:
        pythons.update(re.findall(r"-(py3\.\d+)(?:-|$)", name))
    assert len(pythons) == 1, changes
    return pythons.pop()


def assert_venv_of(venv: Path, interpreter_dir: Path, version: tuple[int, int]) -> None:
    """The venv was created by the interpreter in `interpreter_dir` (pyvenv.cfg's ``home``,
    which venv writes from the interpreter it ran under) and runs as Python `version`."""
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines()
               if " = " in line)
    assert cfg["home"] == str(interpreter_dir), cfg
    ran = subprocess.run([venv / "bin/python", "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == str(version), ran.stdout


def assert_wheels_fit(wheels: list[Path], python: Path) -> None:
    """Every wheel carries a tag `python` installs (its own cpXY, an abi3 one, or py3-none):
    the interpreter's own tag list, from packaging in the venv, against each file name's."""
    assert wheels, "no wheelhouse on the node"
    ran = subprocess.run([python, "-c", "import packaging.tags as t\n"
                          "print('\\n'.join(str(x) for x in t.sys_tags()))"],
                         capture_output=True, text=True, check=True)
    accepted = set(ran.stdout.split())
    for wheel in wheels:
        _, _, _, tags = parse_wheel_filename(wheel.name)
        assert {str(t) for t in tags} & accepted, f"{wheel.name} does not install on {python}"


def test_a_mac_whose_python3_is_the_command_line_tools_stub_gets_a_clear_refusal(
        tmp_path: Path, model: Path, start: Start, tree_hash: TreeHash) -> None:
    host = start(HostSpec("nodev", 64 * GIB, "Apple M4 Pro", address="127.0.0.62",
                          python3=CLT_STUB, developer_tools=False))
    cluster = serve_cluster(tmp_path, host, model)
    before = tree_hash(host, "", exclude=VOLATILE)
    for command in (("plan",), ("apply", "--yes")):
        refused = orch(*command, cluster, known_hosts=host.known_hosts_file)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "nodev: " in refused.stderr  # plan: in facts; apply: taking the lock, first
        assert "'python3' is the Command Line Tools stub (the Command Line Tools are " \
               "not installed)" in refused.stderr
        assert "xcode-select --install" in refused.stderr
        assert "Traceback" not in refused.stderr and "unreachable" not in refused.stderr
    assert tree_hash(host, "", exclude=VOLATILE) == before, "the host was changed"


def test_a_mac_without_the_disk_for_its_model_files_is_refused_with_numbers(
        tmp_path: Path, model: Path, start: Start, tree_hash: TreeHash) -> None:
    host = start(HostSpec("small", 64 * GIB, "Apple M4 Pro", address="127.0.0.63"))
    cluster = serve_cluster(tmp_path, host, model)
    model_bytes = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    orch_dir = host.home / ".orch"
    orch_dir.mkdir()
    size = 64 * 1024
    assert model_bytes > 4 * size, "the tiny model must not fit the tmpfs"
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(orch_dir)],
                   check=True)
    try:
        before = tree_hash(host, "", exclude=VOLATILE)
        refused = orch("plan", cluster, known_hosts=host.known_hosts_file)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        said = re.search(r"small: needs (\d+\.\d) MB free for the model files, has 0\.1 MB "
                         rf"on {re.escape(str(orch_dir))}\n", refused.stderr)
        assert said, refused.stderr
        assert 0.26 < float(said[1]) <= model_bytes / 1e6 + 0.05  # the files it needs
        assert tree_hash(host, "", exclude=VOLATILE) == before, "plan changed the host"
    finally:
        subprocess.run(["umount", str(orch_dir)], check=True)
    # with the room of the real disk, the same plan has changes to make and no refusal
    planned = orch("plan", cluster, "--detailed-exitcode", known_hosts=host.known_hosts_file)
    assert planned.returncode == 2, planned.stderr
