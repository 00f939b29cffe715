"""A stock Mac, as orch first meets it: its Python and its disk, refused before any change.

Simulated Macs of this file's own (127.0.0.61-64) through the real CLI. Their interpreters are
real: a stock Mac's ``python3`` is a real Python 3.9 linked as its /usr/bin/python3 (orch's
agent runs on it), or the Command Line Tools' stub (exit 1, the real message); a newer one
sits where Homebrew or uv puts it. The free disk is real too: a tmpfs smaller than the model,
mounted over the node's orch directory (the tests run as root, as CI does).
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

import pytest

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

    # Homebrew's 3.11 and uv's 3.12 appear (the host's disk as it was, plus them): auto takes
    # the newest, and the venv is made by it
    stop_hosts([host])
    newer = replace(stock, pythons=(("/opt/homebrew/bin/python3.11", real_python("3.11")),
                                    ("~/.local/share/uv/python/cpython-3.12-macos-aarch64-none/"
                                     "bin/python3.12", real_python("3.12"))))
    host = start(newer)
    cluster = serve_cluster(tmp_path, host, model)
    planned = orch("plan", cluster, "--json", known_hosts=host.known_hosts_file)
    assert planned.returncode == 0, planned.stderr
    wheelhouse = [c for h in json.loads(planned.stdout)["hosts"] for c in h["changes"]
                  if c["resource"].startswith("wheelhouse:")]
    assert wheelhouse and "py3.12" in wheelhouse[0]["resource"], wheelhouse

    facts = json.loads(orch("facts", cluster, known_hosts=host.known_hosts_file).stdout)
    found = facts["stock"]["pythons"]["found"]
    assert [(p["path"].removeprefix(str(host.root)), p["version"][:4]) for p in found] == [
        ("/usr/bin/python3", "3.9."), ("/opt/homebrew/bin/python3.11", "3.11"),
        ("/home/.local/share/uv/python/cpython-3.12-macos-aarch64-none/bin/python3.12", "3.12")]
    assert facts["stock"]["pythons"]["developer_tools"] is True


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
