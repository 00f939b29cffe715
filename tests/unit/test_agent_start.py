"""What an agent start costs the node: a no-op session imports only what it uses.

A no-op apply starts one agent per host (facts, lock, unlock over one session); every stdlib
module it imports is CPU on the node at every run. These tests run the compiled agent exactly as
RUN_SCRIPT starts it (its -c bootstrap, bytecode, -I -S -B), with ``-X importtime`` to list what
was imported, and check what replaced subprocess (spawn.py), shutil.which and tempfile.mkstemp
against the originals.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import agent_file_id, agent_source_hash, spawn
from orchestrator.agent.common import capture, run_status, status_of, temp_beside, which_on
from orchestrator.executor.agentcall import DIR_BOOTSTRAP, RUN_SCRIPT
from orchestrator.executor.fake import LocalConnection

# Imported by the agent before (runpy, typing, hashlib, shutil, tempfile at every start) and
# used by no op of a no-op run's session.
NOT_FOR_A_NO_OP = ("runpy", "importlib.util", "typing", "hashlib", "shutil", "tempfile",
                   "random", "bz2", "lzma", "orch_agent.files", "orch_agent.command",
                   "orch_agent.launchd", "orch_agent.peer", "orch_agent.transfer", "subprocess",
                   "json", "re", "enum")
FAKE_SYSCTL = "#!/bin/sh\nprintf 'hw.memsize: 68719476736\\nkern.osproductversion: 14.5\\n'\n"


def python_for(version: str) -> str:
    if version == "this":
        return sys.executable
    found = sorted(Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python"))
    python = str(found[0]) if found else shutil.which(f"python{version}") or ""
    assert python, f"no python{version} on this machine (a stock Mac runs the agent on 3.9)"
    return python


def frame(op: str, request: dict[str, Any]) -> bytes:
    header = json.dumps({"op": op, "request": request}).encode()
    return struct.pack(">II", len(header), 0) + header


def answers(out: bytes) -> list[dict[str, Any]]:
    found, pos = [], 0
    while pos < len(out):
        (size,) = struct.unpack(">I", out[pos : pos + 4])
        found.append(json.loads(out[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return found


@pytest.mark.parametrize("version", ["3.9", "this"])
def test_a_no_op_session_imports_only_what_it_uses(tmp_path: Path, version: str) -> None:
    python = python_for(version)
    home = tmp_path / "home"
    home.mkdir()

    async def upload() -> None:  # as a first run does: upload, unpack, compile
        conn = LocalConnection(home, name="n1", agent_python=python)
        try:
            await conn.agent("facts", {})
        finally:
            await conn.close()

    asyncio.run(upload())
    unpacked = home / ".orch" / "agent" / agent_file_id()
    assert (unpacked / "VERSION").read_text() == agent_source_hash() + "\n"
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "sysctl").write_text(FAKE_SYSCTL)
    (tools / "sysctl").chmod(0o755)
    (home / "conf").write_text("x")
    os.utime(home / "conf", (1e9, 1e9))  # converged long ago: the hash cache vouches for it
    no_op = [
        frame("facts", {"files": ["~/conf", "~/missing"], "guards": [
            {"id": "g", "argv": ["sh", "-c", "exit 3"]}], "cluster": "c"}),
        frame("lock_acquire", {"path": "~/.orch/lock", "holder": {"nonce": "n", "who": "t"}}),
        frame("lock_release", {"path": "~/.orch/lock", "nonce": "n"}),
    ]
    env = {"HOME": str(home), "PATH": f"{tools}:/usr/bin:/bin"}
    for _ in range(2):  # the second: with the hash cache the first one saved
        proc = subprocess.run(
            [python, "-I", "-S", "-B", "-X", "importtime", "-c", DIR_BOOTSTRAP, str(unpacked),
             "session"],
            input=b"".join(no_op), capture_output=True, env=env, cwd=home, check=True)
    hello, facts, acquired, released = answers(proc.stdout)
    assert hello["version"] == facts["agent"]["version"] == agent_source_hash()
    assert facts["memory_bytes"] == 68719476736 and facts["guards"] == {"g": 3}
    assert facts["counters"]["hash_cache_hits"] == 1 and facts["counters"]["files_hashed"] == 0
    assert acquired["acquired"] and released == {"released": True}
    assert not (home / ".orch" / "lock").exists()
    imported = {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "orch_agent.facts" in imported and "orch_agent.lock" in imported  # it did measure
    assert sorted(imported & set(NOT_FOR_A_NO_OP)) == []


def test_run_script_starts_the_compiled_directory_through_the_bootstrap(tmp_path: Path) -> None:
    """RUN_SCRIPT's sh passes DIR_BOOTSTRAP literally: the agent answers from the directory."""
    home = tmp_path / "home"
    home.mkdir()

    async def upload() -> None:
        conn = LocalConnection(home, name="n1")
        try:
            await conn.agent("facts", {})
        finally:
            await conn.close()

    asyncio.run(upload())
    proc = subprocess.run(
        ["sh", "-c", RUN_SCRIPT, "sh", agent_file_id(), "lock_release", sys.executable],
        input=b'{"path": "~/no-lock", "nonce": "n"}\n', capture_output=True,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=False)
    assert (proc.returncode, json.loads(proc.stdout)) == (0, {"released": False}), proc.stderr


@pytest.mark.parametrize("name", ["tool", "sub/tool", "./tool", "missing", "dir", "plain"])
@pytest.mark.parametrize("path", ["", "{bin}", "{bin}:{other}", "{other}:{bin}",
                                  ":{bin}", "{other}::{bin}", "{bin}:{bin}"])
def test_which_on_finds_what_shutil_which_finds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, path: str) -> None:
    for where in ("bin", "other", "sub", "."):
        directory = tmp_path / where
        directory.mkdir(exist_ok=True)
        (directory / "tool").write_text("#!/bin/sh\n")
        (directory / "tool").chmod(0o755)
    (tmp_path / "other" / "tool").chmod(0o644)  # not executable: skipped
    (tmp_path / "bin" / "dir").mkdir()  # a directory is never the tool
    (tmp_path / "bin" / "plain").write_text("")
    monkeypatch.chdir(tmp_path)  # an empty PATH entry is the current directory
    search = path.format(bin=tmp_path / "bin", other=tmp_path / "other")
    assert which_on(name, search) == shutil.which(name, path=search)


def test_which_on_without_path_uses_the_system_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH", raising=False)
    assert which_on("sh", None) == shutil.which("sh") is not None


def test_temp_beside_makes_a_private_new_file_each_time(tmp_path: Path) -> None:
    made = [temp_beside(str(tmp_path)) for _ in range(20)]
    for fd, path in made:
        os.close(fd)
        assert Path(path).parent == tmp_path and Path(path).name.startswith(".orch-")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len({path for _, path in made}) == 20
    target = tmp_path / "target"
    target.write_text("mine")
    (tmp_path / "link").symlink_to(target)
    fd, path = temp_beside(str(tmp_path))
    os.close(fd)
    assert target.read_text() == "mine"  # never opened through a link


# ------------------------------------------------------------ spawn: subprocess.run's contract


@pytest.mark.parametrize("argv", [
    ["sh", "-c", "exit 3"],
    ["sh", "-c", "echo out; echo err >&2"],
    ["sh", "-c", "cat; echo read"],  # stdin is /dev/null: cat ends at once
    ["sh", "-c", "kill -TERM $$"],
    [sys.executable, "-c", "import signal, sys; sys.exit(signal.getsignal(signal.SIGPIPE)"
                           " != signal.SIG_DFL or signal.getsignal(signal.SIGXFSZ) != "
                           "signal.SIG_DFL)"],  # restore_signals, as subprocess does
    [sys.executable, "-c", "import os; os.fstat(3)"],  # no descriptor of the agent's leaks
])
def test_spawn_runs_as_subprocess_runs(argv: list[str]) -> None:
    extra = os.open(os.devnull, os.O_RDONLY)  # non-inheritable, as Python opens every fd
    try:
        expected = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, timeout=30, check=False)
        assert spawn.run(argv, 30, capture=True) == (expected.returncode, expected.stdout)
        assert spawn.run(argv, None) == (expected.returncode, b"")
        assert run_status(argv, None, None, 30) == status_of(expected.returncode)
    finally:
        os.close(extra)


def test_spawn_reports_what_cannot_start(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(FileNotFoundError):
        spawn.run(["no-such-tool-here"], 5)
    assert run_status([str(tmp_path / "missing")], None, None, 5) == 127
    assert run_status([str(plain)], None, None, 5) == 126
    assert capture([str(plain)]) is None


def test_spawn_kills_and_reaps_what_outlives_its_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f'echo $$ > "{pid_file}"; exec sleep 60'
    assert run_status(["sh", "-c", script], None, None, 0.5) == 124
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped: not even a zombie
    pid_file.unlink()
    with pytest.raises(spawn.TimedOut):
        spawn.run(["sh", "-c", script], 0.5, capture=True)
    assert not Path(f"/proc/{int(pid_file.read_text())}").exists()


# ---------------------------------------------------------------------- jsonc: json's own text

JSONC_CHECK = r'''
import math, sys
sys.path.insert(0, sys.argv[1])
import jsonc
assert jsonc._C is not None, "no C accelerator: jsonc would only be json itself"
assert "json" not in sys.modules and "re" not in sys.modules, sorted(sys.modules)
texts = ["{not json", "[1,", '{"a" 1}', '"\\x"', "[1] x", "", " ", "\ufeff[]", "tru", "1 2",
         '"\\ud800"', '{"a":1,"a":2}', '"x\ny"', "-", "01", "[1.]", " \n[1]\t ", "[NaN]"]
first = []
for text in texts:  # before json is imported: errors must still be json's own
    try:
        first.append(("ok", repr(jsonc.loads(text))))
    except Exception as exc:
        first.append((type(exc).__name__, str(exc)))
import json
for text, got in zip(texts, first):
    try:
        expected = ("ok", repr(json.loads(text)))
    except Exception as exc:
        expected = (type(exc).__name__, str(exc))
    assert got == expected, (text, got, expected)
values = [{}, [], {"a": {}}, {"a": []}, "s", 1, 1.1, None, True, 2**80, -0.0, 1e300,
          {"z": 1, "a": [1, 2.5, None, True, False, "\u00e9\u2028\n\"\\\x00", "\U0001f600"]},
          {"n": {"b": [{"c": [[], {}]}, [1, [2, [3]]]]}}, ("t", "u"), {"k": ("a", 1)},
          [float("inf"), float("-inf")], {1: "x"}, {"a": {2: 3}}, {"holder": {"nonce": "n"}}]
for value in values:
    for indent in (None, 1, 2):
        text = jsonc.dumps(value, indent)
        assert text == json.dumps(value, sort_keys=True, indent=indent), (value, indent, text)
        assert repr(jsonc.loads(text)) == repr(json.loads(text))
class Odd: pass
for value in (Odd(), {"a": Odd()}, {"a": {1, 2}}):
    errors = []
    for dumps in (jsonc.dumps, lambda v: json.dumps(v, sort_keys=True)):
        try:
            dumps(value)
        except TypeError as exc:
            errors.append(str(exc))
    assert len(errors) == 2 and errors[0] == errors[1], errors
loop = []
loop.append(loop)
try:
    jsonc.dumps(loop)
except ValueError as exc:
    assert "Circular reference" in str(exc)
assert jsonc.dumps([1]) == "[1]"  # a fresh encoder after the errors
assert math.isnan(jsonc.loads("NaN"))
print("same")
'''


@pytest.mark.parametrize("version", ["3.9", "this"])
def test_jsonc_reads_and_writes_what_json_does(version: str) -> None:
    agent_dir = Path(__file__).parents[2] / "orchestrator" / "agent"
    proc = subprocess.run([python_for(version), "-I", "-S", "-c", JSONC_CHECK, str(agent_dir)],
                          capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout) == (0, "same\n"), proc.stderr
