"""Step types: the agent requests they build, their JSON round trip (saved plans, managed
records, old records included), and that they and the agent's op table are one list."""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import pytest

import orchestrator.agent
from orchestrator.facts import FileFact, FileKind, HostFacts
from orchestrator.plan import PLAN_FORMAT, HostPlan, Plan, diff_host, record_for
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.files import File
from orchestrator.resources.steps import (
    STEP_TYPES,
    ControllerFile,
    Fetch,
    FromController,
    FromHub,
    FromPeer,
    InstallSystem,
    LaunchdBootout,
    LaunchdBootstrap,
    LaunchdKickstart,
    Mkdir,
    Prune,
    Remove,
    RemoveSystem,
    Rmdir,
    Run,
    Step,
    Text,
    Write,
    step_from_json,
)

# Agent ops that no plan holds: apply, facts, lock, sync and status call them at run time.
RUN_TIME_CALLS = frozenset({
    "facts",  # one call per host: every fact the plan needs
    "read",  # file contents for --diff and the workers' status files
    "sizes",  # progress of in-flight downloads
    "managed_write",  # the managed record, around each host's changes
    "lock_acquire", "lock_release",  # the cluster lock
    "serve", "serve_stop",  # a host's peer server for one apply
    "batch",  # carries a host's steps in one request
})

SHA = "ab" * 32

# One of each step type, with the agent request it must build (today's wire format).
EXAMPLES: list[tuple[Step, dict[str, Any] | None]] = [
    (Write("~/a b.txt", 0o600, Text("hi\n")),
     {"path": "~/a b.txt", "mode": 0o600,
      "sha256": "98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4"}),
    (Write("~/w.whl", 0o644, ControllerFile("/cache/w.whl", SHA)),
     {"path": "~/w.whl", "mode": 0o644, "sha256": SHA}),
    (Mkdir("~/d", 0o755), {"path": "~/d", "mode": 0o755}),
    (Remove("~/d"), {"path": "~/d"}),
    (Rmdir("~/d"), {"path": "~/d"}),
    (Run(("echo", "$(x); y")), {"argv": ["echo", "$(x); y"]}),
    (Run(("make",), creates="~/out", unless=("test", "-e", "x"), cwd="~"),
     {"argv": ["make"], "creates": "~/out", "unless": ["test", "-e", "x"], "cwd": "~"}),
    (LaunchdBootstrap("user", "com.orch.w", "~/Library/LaunchAgents/com.orch.w.plist"),
     {"domain": "user", "label": "com.orch.w",
      "plist": "~/Library/LaunchAgents/com.orch.w.plist"}),
    (LaunchdBootout("system", "com.orch.s"), {"domain": "system", "label": "com.orch.s"}),
    (LaunchdKickstart("user", "com.orch.w"), {"domain": "user", "label": "com.orch.w"}),
    (InstallSystem("~/.orch/system/x.plist", "/Library/LaunchDaemons/x.plist", 0o644),
     {"src": "~/.orch/system/x.plist", "dest": "/Library/LaunchDaemons/x.plist",
      "mode": 0o644}),
    (RemoveSystem("/Library/LaunchDaemons/x.plist"),
     {"path": "/Library/LaunchDaemons/x.plist"}),
    (Prune("~/m", ("model-1.safetensors",), "model*.safetensors"),
     {"path": "~/m", "keep": ["model-1.safetensors"], "pattern": "model*.safetensors"}),
    (Fetch("~/m/f", "f", 3, SHA), None),  # its request needs apply's URL: tested below
    (Fetch("~/m/g", "g", 3, SHA, "c" * 40, FromHub()), None),
    (Fetch("~/m/g", "g", 3, SHA, None, FromController()), None),
    (Fetch("~/m/g", "g", 3, SHA, None, FromPeer("hub", scheduled=True)), None),
    (Fetch("~/m/g", "g", 3, SHA, None, FromPeer("local", fallback=("hub", "b"))), None),
]


def agent_op_table() -> Mapping[str, Callable[..., Any]]:
    """`OPS` wherever it lives in the agent package (it may move between its modules)."""
    tables: dict[int, Mapping[str, Callable[..., Any]]] = {}
    for module in pkgutil.iter_modules(orchestrator.agent.__path__, "orchestrator.agent."):
        if module.name.endswith("__main__"):
            continue
        ops = getattr(importlib.import_module(module.name), "OPS", None)
        if isinstance(ops, Mapping):
            tables[id(ops)] = ops
    [table] = tables.values()
    return table


def test_the_agent_ops_are_the_step_types_and_the_run_time_calls() -> None:
    ops = set(agent_op_table())
    assert "write" in ops and "fetch" in ops  # the table found is the agent's
    steps = set(STEP_TYPES)
    assert steps - ops == set(), "step types whose op the agent does not have"
    assert ops - steps - RUN_TIME_CALLS == set(), "agent ops neither a step nor a run-time call"
    assert RUN_TIME_CALLS - ops == set(), "run-time calls the agent no longer has"
    assert steps & RUN_TIME_CALLS == set()


def test_every_step_type_has_an_example_here() -> None:
    assert {type(step) for step, _ in EXAMPLES} == set(STEP_TYPES.values())
    assert all(STEP_TYPES[t.op] is t for t in STEP_TYPES.values())


@pytest.mark.parametrize(("step", "request_"), [e for e in EXAMPLES if e[1] is not None],
                         ids=lambda v: getattr(v, "op", ""))
def test_request_is_the_agent_wire_format(step: Step, request_: dict[str, Any]) -> None:
    assert not isinstance(step, Fetch)
    assert step.request() == request_
    assert json.loads(json.dumps(step.request())) == request_


def test_fetch_request_carries_what_apply_knows() -> None:
    step = Fetch("~/m/g", "g", 3, SHA, "c" * 40, FromPeer("hub"))
    assert step.request("http://10.0.0.1:47300/g", {"Authorization": "Bearer t"},
                        timeout=600, retries=3, backoff=0.2) == {
        "path": "~/m/g", "size": 3, "sha256": SHA, "git_sha1": "c" * 40, "timeout": 600,
        "url": "http://10.0.0.1:47300/g", "headers": {"Authorization": "Bearer t"},
        "retries": 3, "backoff": 0.2}
    assert "retries" not in step.request("https://hub/g", {}, timeout=5)
    assert step.from_controller("/cache/g") == Write("~/m/g", 0o644,
                                                     ControllerFile("/cache/g", SHA))


@pytest.mark.parametrize("step", [s for s, _ in EXAMPLES], ids=lambda s: s.op)
def test_json_round_trip(step: Step) -> None:
    raw = json.loads(json.dumps(step.to_json()))
    assert raw["op"] == step.op
    assert step_from_json(raw) == step


def test_a_host_named_like_an_origin_stays_a_peer_through_json() -> None:
    for name in ("hub", "local"):
        step = Fetch("~/m/g", "g", 3, SHA, None, FromPeer(name))
        back = step_from_json(json.loads(json.dumps(step.to_json())))
        assert isinstance(back, Fetch) and back.source == FromPeer(name)


@pytest.mark.parametrize(("raw", "message"), [
    ({"op": "remove"}, "missing 'path'"),
    ({"op": "remove", "path": 3}, "'path' must be str"),
    ({"op": "mkdir", "path": "~/d", "mode": True}, "'mode' must be int"),
    ({"op": "remove", "path": "~/d", "content": "x"}, "unknown keys"),
    ({"op": "chmod", "path": "~/d"}, "unknown step op 'chmod'"),
    ({"op": "write", "path": "~/f", "mode": 420, "payload": {"kind": "url"}}, "unknown kind"),
    ({"op": "fetch", "path": "~/f", "file": "f", "size": 1, "sha256": SHA,
      "source": {"kind": "lan"}}, "unknown kind 'lan'"),
    ({"op": "write", "request": {"path": "~/f", "mode": 420, "sha256": SHA, "content": "x"}},
     "plan format 1"),
])
def test_malformed_steps_are_refused_with_what_is_wrong(raw: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        step_from_json(raw)


def previous_record(cluster: str) -> dict[str, Any]:
    """A managed record as the previous orch (plan format 1) wrote it on a node."""
    return {"format": 1, "cluster": cluster, "resources": [
        {"id": "file:~/kept", "cleanup": [{"op": "remove", "request": {"path": "~/kept"}}]},
        {"id": "launchd:system/com.orch.s", "cleanup": [
            {"op": "launchd_bootout", "request": {"domain": "system", "label": "com.orch.s"}},
            {"op": "remove_system", "request": {"path": "/Library/LaunchDaemons/s.plist"}},
            {"op": "run", "request": {"argv": ["sudo", "-n", "sysctl", "-w", "k=0"],
                                      "creates": None, "unless": None}}]},
        {"id": "directory:~/d", "cleanup": [{"op": "rmdir", "request": {"path": "~/d"}}]},
    ]}


def test_a_record_written_by_the_previous_orch_is_read_and_rewritten() -> None:
    kept = File("~/kept", "x\n")
    facts = HostFacts(host="n", os_system="Darwin", macos_version="14.5", user="u", uid=501,
                      home="/Users/u", python_version="3.9.6", memory_bytes=1 << 37,
                      chip="Apple M2 Ultra",
                      files={"~/kept": FileFact(FileKind.FILE, len(kept.content), kept.mode,
                                                kept.sha256)},
                      managed=previous_record("c"))
    plan = diff_host("c", [kept], facts)
    assert [(c.resource, c.action) for c in plan.changes] == [
        ("directory:~/d", Action.DELETE), ("launchd:system/com.orch.s", Action.DELETE)]
    assert plan.changes[0].steps == (Rmdir("~/d"),)
    assert plan.changes[1].steps == (
        LaunchdBootout("system", "com.orch.s"), RemoveSystem("/Library/LaunchDaemons/s.plist"),
        Run(("sudo", "-n", "sysctl", "-w", "k=0")))
    assert plan.record == record_for("c", [kept])
    assert plan.record["format"] == PLAN_FORMAT == 2
    assert plan.record["resources"] == [{"id": "file:~/kept",
                                         "cleanup": [{"op": "remove", "path": "~/kept"}]}]


def test_a_saved_plan_round_trips_and_a_format_1_plan_is_refused() -> None:
    change = Change("file:~/f", Action.CREATE, (FieldChange("sha256", None, SHA),),
                    tuple(s for s, _ in EXAMPLES), cleanup=(Remove("~/f"),))
    plan = Plan("c", "c.yml", (HostPlan("n", (change,), record_for("c", [])),))
    raw = json.loads(json.dumps(plan.to_json()))
    assert Plan.from_json(raw) == plan
    with pytest.raises(ValueError, match="plan format 1"):
        Plan.from_json({**raw, "format": 1})


def test_a_run_step_says_check_only_when_it_is_off() -> None:
    """Plans and records written before `check` existed read back unchanged; the agent always
    gets it explicit."""
    checked, unchecked = Run(("a",)), Run(("a",), check=False)
    assert checked.to_json() == {"op": "run", "argv": ["a"]}
    assert unchecked.to_json() == {"op": "run", "argv": ["a"], "check": False}
    assert Run.from_request({"argv": ["a"]}) == checked
    assert Run.from_request({"argv": ["a"], "check": False}) == unchecked
    assert checked.agent_request() == {"argv": ["a"], "check": True}
    assert unchecked.agent_request() == {"argv": ["a"], "check": False}
