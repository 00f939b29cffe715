"""facts.py: strict parsing of the agent's JSON, and merging of fact requests. Pure: no agent run
except one end-to-end check that the real agent's answer parses."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import AGENT_FILE
from orchestrator.errors import ActionFailed
from orchestrator.facts import (
    FactRequest,
    FileFact,
    FileKind,
    Guard,
    HostFacts,
    JobState,
    LaunchdRef,
    parse_facts,
)

SHA = "a" * 64


def raw_facts() -> dict[str, Any]:
    """A complete answer as the agent gives it on a Mac."""
    return {
        "agent": {"version": "f" * 64},
        "os": {"system": "Darwin", "product_version": "14.5"},
        "user": "alice",
        "uid": 501,
        "home": "/Users/alice",
        "python": {"executable": "/usr/bin/python3", "version": "3.9.6"},
        "memory_bytes": 206158430208,
        "chip": "Apple M2 Ultra",
        "files": {
            "~/a": {"kind": "file", "size": 3, "mode": 0o644, "sha256": SHA},
            "~/d": {"kind": "dir", "size": None, "mode": 0o755, "sha256": None},
            "~/m": {"kind": "missing", "size": None, "mode": None, "sha256": None},
        },
        "venvs": {
            "~/.orch/venv": {
                "exists": True,
                "python_version": "3.11.7",
                "packages": {"mlx": "0.32.4", "mlx-lm": "0.32.2"},
            }
        },
        "launchd": {
            "user/com.orch.worker": {
                "state": "running",
                "pid": 4242,
                "last_exit": 0,
                "env": {"MLX_RANK": "0"},
            },
            "system/com.orch.wired": {
                "state": "not_loaded",
                "pid": None,
                "last_exit": None,
                "env": {},
            },
        },
        "sysctl": {"iogpu.wired_limit_mb": "180000", "nope": None},
        "guards": {"mlx-importable": 0},
        "trees": {"~/.orch/wheelhouse": {
            "k1/a.whl": {"kind": "file", "size": 3, "mode": 0o644, "sha256": SHA}}},
        "texts": {"~/.orch/serve/lab/status.json": '{"rank": 0}', "~/gone": None},
        "managed": {"resources": ["file:~/a"]},
        "counters": {"files_hashed": 0, "bytes_hashed": 0, "hash_cache_hits": 1},
    }


def test_parse_complete_answer() -> None:
    facts = parse_facts("mac1", raw_facts())
    assert facts.host == "mac1"
    assert (facts.os_system, facts.macos_version, facts.chip) == (
        "Darwin", "14.5", "Apple M2 Ultra")
    assert facts.memory_bytes == 192 * 1024**3
    assert facts.file("~/a") == FileFact(FileKind.FILE, 3, 0o644, SHA)
    assert facts.file("~/m").kind is FileKind.MISSING
    assert facts.venvs["~/.orch/venv"].packages["mlx-lm"] == "0.32.2"
    worker = facts.job(LaunchdRef("user", "com.orch.worker"))
    assert worker.state is JobState.RUNNING and worker.pid == 4242
    assert worker.env == {"MLX_RANK": "0"}
    assert facts.launchd["system/com.orch.wired"].state is JobState.NOT_LOADED
    assert facts.sysctl == {"iogpu.wired_limit_mb": "180000", "nope": None}
    assert facts.guards == {"mlx-importable": 0}
    assert facts.tree("~/.orch/wheelhouse") == {"k1/a.whl": FileFact(FileKind.FILE, 3, 0o644,
                                                                     SHA)}
    assert facts.text("~/.orch/serve/lab/status.json") == '{"rank": 0}'
    assert facts.text("~/gone") is None
    assert facts.counters["hash_cache_hits"] == 1


def test_facts_are_immutable() -> None:
    facts = parse_facts("mac1", raw_facts())
    with pytest.raises(AttributeError):
        facts.uid = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        facts.files["~/x"] = facts.file("~/a")  # type: ignore[index]
    with pytest.raises(TypeError):
        facts.venvs["~/.orch/venv"].packages["x"] = "1"  # type: ignore[index]


def test_unrequested_lookups_name_the_host() -> None:
    facts = parse_facts("mac1", raw_facts())
    with pytest.raises(KeyError, match=r"mac1: file '~/zzz' was not in the fact request"):
        facts.file("~/zzz")
    with pytest.raises(KeyError, match=r"user/com\.other"):
        facts.job(LaunchdRef("user", "com.other"))


def mutate(path: list[str], value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    raw = copy.deepcopy(raw_facts())
    node = raw
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (mutate(["extra"], 1), "unknown keys ['extra']"),
        (mutate(["chip"], delete=True), "missing keys ['chip']"),
        (mutate(["os", "kernel"], "x"), "facts.os: unknown keys ['kernel']"),
        (mutate(["files", "~/a", "owner"], "root"), "facts.files.~/a: unknown keys ['owner']"),
        (mutate(["files", "~/a", "kind"], "socket"), "unknown file kind 'socket'"),
        (mutate(["files", "~/a", "size"], "3"), "size should be int/null"),
        (mutate(["uid"], True), "uid should be int"),
        (mutate(["memory_bytes"], 1.5), "memory_bytes should be int/null"),
        (mutate(["launchd", "user/com.orch.worker", "state"], "zombie"), "unknown launchd state"),
        (mutate(["launchd", "user/com.orch.worker", "env", "X"], 1), "X should be str"),
        (mutate(["venvs", "~/.orch/venv", "exists"], 1), "exists should be bool"),
        (mutate(["counters", "hash_misses"], 0), "unknown keys ['hash_misses']"),
        (mutate(["guards", "g"], None), "g should be int"),
        (mutate(["files"], []), "facts.files: expected an object"),
    ],
)
def test_strict_parsing_names_the_problem(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ActionFailed) as info:
        parse_facts("mac2", raw)
    assert info.value.host == "mac2"
    assert message in str(info.value)


def test_answers_must_match_the_request() -> None:
    request = FactRequest(
        files=frozenset({"~/a", "~/d", "~/m"}),
        venvs=frozenset({"~/.orch/venv"}),
        launchd=frozenset(
            {LaunchdRef("user", "com.orch.worker"), LaunchdRef("system", "com.orch.wired")}
        ),
        sysctl=frozenset({"iogpu.wired_limit_mb", "nope"}),
        guards=frozenset({Guard("mlx-importable", ("python3", "-c", "import mlx"))}),
        trees=frozenset({"~/.orch/wheelhouse"}),
        texts=frozenset({"~/.orch/serve/lab/status.json", "~/gone"}),
    )
    assert isinstance(parse_facts("m", raw_facts(), request), HostFacts)
    bigger = request.merge(FactRequest(files=frozenset({"~/new"})))
    with pytest.raises(ActionFailed, match=r"files answered .* requested"):
        parse_facts("m", raw_facts(), bigger)


def test_merge_is_a_union() -> None:
    a = FactRequest(files=frozenset({"~/a"}), sysctl=frozenset({"x"}), managed=False)
    b = FactRequest(
        files=frozenset({"~/b", "~/a"}),
        launchd=frozenset({LaunchdRef("user", "l")}),
        guards=frozenset({Guard("g", ("true",))}),
        managed=False,
    )
    c = FactRequest(venvs=frozenset({"~/v"}))
    merged = a.merge(b, c)
    assert merged.files == {"~/a", "~/b"}
    assert merged.launchd == {LaunchdRef("user", "l")}
    assert merged.managed is True
    assert a.merge(b) == b.merge(a)
    assert FactRequest().merge() == FactRequest()


def test_conflicting_guard_ids_refuse_to_merge() -> None:
    a = FactRequest(guards=frozenset({Guard("g", ("true",))}))
    b = FactRequest(guards=frozenset({Guard("g", ("false",))}))
    with pytest.raises(ValueError, match="guard ids must be unique"):
        a.merge(b)
    assert a.merge(a) == a


def test_request_validation() -> None:
    with pytest.raises(TypeError):
        FactRequest(files="~/a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="domain"):
        LaunchdRef("gui", "x")
    with pytest.raises(ValueError, match="label"):
        LaunchdRef("user", "a/b")


def test_to_json_is_sorted_and_deterministic() -> None:
    request = FactRequest(
        files=frozenset({"~/b", "~/a"}),
        launchd=frozenset({LaunchdRef("user", "z"), LaunchdRef("system", "a")}),
        guards=frozenset({Guard("b", ("false",)), Guard("a", ("true", "x"))}),
    )
    assert request.to_json() == {
        "files": ["~/a", "~/b"],
        "venvs": [],
        "launchd": [{"domain": "system", "label": "a"}, {"domain": "user", "label": "z"}],
        "sysctl": [],
        "guards": [{"id": "a", "argv": ["true", "x"]}, {"id": "b", "argv": ["false"]}],
        "trees": [],
        "texts": [],
        "managed": True,
        "cluster": "default",
        "dir": ".orch",
    }
    json.dumps(request.to_json())


def test_real_agent_answer_parses(tmp_path: Path) -> None:
    """The agent and facts.py agree on the protocol (the skew this strictness exists for)."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "wh" / "k1" / "deep" / "deeper").mkdir(parents=True)
    (tmp_path / "wh" / "top.whl").write_text("t")
    (tmp_path / "wh" / "k1" / "a.whl").write_text("a")
    (tmp_path / "wh" / "k1" / "deep" / "too-deep.whl").write_text("d")
    request = FactRequest(
        files=frozenset({"~/f", "~/nope"}),
        venvs=frozenset({"~/venv"}),
        sysctl=frozenset({"hw.memsize"}),
        guards=frozenset({Guard("t", ("true",))}),
        trees=frozenset({"~/wh", "~/no-such-dir"}),
        texts=frozenset({"~/f", "~/absent"}),
    )
    proc = subprocess.run(
        [sys.executable, str(AGENT_FILE), "facts"],
        input=json.dumps(request.to_json()).encode() + b"\n",
        capture_output=True,
        env={**os.environ, "HOME": str(tmp_path)},
        check=True,
    )
    facts = parse_facts("local", json.loads(proc.stdout), request)
    assert facts.file("~/f").kind is FileKind.FILE
    assert facts.venvs["~/venv"].exists is False
    assert facts.guards == {"t": 0}
    # two levels down (wheelhouse/<key>/<wheel>), regular files only
    assert sorted(facts.tree("~/wh")) == ["k1/a.whl", "top.whl"]
    assert facts.tree("~/wh")["k1/a.whl"].sha256 == hashlib.sha256(b"a").hexdigest()
    assert facts.tree("~/no-such-dir") == {}
    assert facts.text("~/f") == "x"
    assert facts.text("~/absent") is None


def test_sudo_is_answered_exactly_when_asked(tmp_path: Path) -> None:
    """The real agent probes `sudo -n -l` only on request (here: a `sudo` that prompts, on
    PATH), and the answer must match the request either way."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sudo = bin_dir / "sudo"
    sudo.write_text("#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    sudo.chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    asked = FactRequest(sudo=True)
    proc = subprocess.run([sys.executable, str(AGENT_FILE), "facts"],
                          input=json.dumps(asked.to_json()).encode() + b"\n",
                          capture_output=True, env=env, check=True)
    raw = json.loads(proc.stdout)
    assert parse_facts("m", raw, asked).sudo is False
    with pytest.raises(ActionFailed, match="sudo answered"):
        parse_facts("m", raw, FactRequest())
    without = {**raw}
    del without["sudo"]
    with pytest.raises(ActionFailed, match="sudo requested, not answered"):
        parse_facts("m", without, asked)
    assert parse_facts("m", without, FactRequest()).sudo is None
    merged = FactRequest().merge(asked)
    assert merged.sudo and not merged.minus(asked).sudo
