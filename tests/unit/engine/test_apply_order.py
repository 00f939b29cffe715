"""apply_plan's scheduling: --serial batches, --fail-fast, one host's failure kept to itself."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.errors import ActionFailed, HostError, HostUnreachable
from orchestrator.executor import (
    AgentStep,
    CommandResult,
    Connection,
    StepOutcome,
    StepState,
)
from orchestrator.plan import HostPlan, Plan
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import Run
from orchestrator.run.apply import HostStatus, apply_plan


class Recorder:
    """A connection that logs (host, op) with a global clock and fails on request."""

    def __init__(self, name: str, log: list[tuple[str, str]], fail: bool = False) -> None:
        self.name, self.log, self.fail, self.round_trips = name, log, fail, 0
        self.batches = 0
        self.records: list[Mapping[str, Any]] = []  # every managed record written, in order

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float | None = None) -> CommandResult:
        raise AssertionError("apply runs agent ops only")

    async def agent(self, op: str, request: Mapping[str, Any], *,
                    stdin: bytes | None = None) -> dict[str, Any]:
        self.log.append((self.name, op))
        await asyncio.sleep(0.01)
        if op == "run" and self.fail:
            return {"skipped": False, "exit_status": 3, "stdout": "", "stderr": "boom"}
        return {"skipped": False, "exit_status": 0, "stdout": "", "stderr": ""}

    async def agent_batch(self, steps: Sequence[AgentStep]) -> list[StepOutcome]:
        """As the agent does: in order, a checked `run` exiting non-zero fails and ends it."""
        self.batches += 1
        await asyncio.sleep(0.01)
        outcomes: list[StepOutcome] = []
        for step in steps:
            self.log.append((self.name, step.op))
            if step.op == "managed_write":
                self.records.append(step.request["record"])
            if step.op == "run" and self.fail and step.request.get("check"):
                outcomes.append(StepOutcome(step, StepState.FAILED, error="`x` exited 3: boom"))
                break
            outcomes.append(StepOutcome(step, StepState.OK, {"skipped": False}))
        return outcomes + [StepOutcome(s, StepState.NOT_RUN) for s in steps[len(outcomes):]]

    async def close(self) -> None:
        return None


def host_plan(name: str) -> HostPlan:
    change = Change("command:x", Action.CREATE, (FieldChange("guard", None, "x"),),
                    (Run(("x",)),))
    return HostPlan(name, (change,), {"format": 1, "cluster": "c", "resources": []})


def run(hosts: list[str], failing: set[str], **kwargs: Any
        ) -> tuple[dict[str, HostStatus], list[tuple[str, str]]]:
    log: list[tuple[str, str]] = []
    conns: dict[str, Connection | HostError] = {
        h: Recorder(h, log, fail=h in failing) for h in hosts}
    conns["gone"] = HostUnreachable("gone", "connection refused")
    plan = Plan("c", "c.yml", tuple(host_plan(h) for h in [*hosts, "gone"]))
    report = asyncio.run(apply_plan(plan, conns, **kwargs))
    return {o.host: o.status for o in report.outcomes}, log


def test_a_failing_host_does_not_stop_the_others() -> None:
    status, _ = run(["a", "b", "c"], {"b"})
    assert status == {"a": HostStatus.CHANGED, "b": HostStatus.FAILED,
                      "c": HostStatus.CHANGED, "gone": HostStatus.UNREACHABLE}


def test_serial_applies_hosts_in_batches_in_order() -> None:
    _, log = run(["a", "b", "c", "d"], set(), serial=2)
    first_c = min(i for i, (h, _) in enumerate(log) if h in ("c", "d"))
    last_ab = max(i for i, (h, _) in enumerate(log) if h in ("a", "b"))
    assert last_ab < first_c, log


def test_fail_fast_starts_no_further_batch() -> None:
    status, log = run(["a", "b", "c", "d"], {"a"}, serial=1, fail_fast=True)
    assert status["a"] is HostStatus.FAILED
    assert {h for h, _ in log} == {"a"}
    assert status["b"] is status["c"] is status["d"] is HostStatus.FAILED


def test_failure_message_names_the_command_and_its_stderr() -> None:
    log: list[tuple[str, str]] = []
    plan = Plan("c", "c.yml", (host_plan("a"),))
    report = asyncio.run(apply_plan(plan, {"a": Recorder("a", log, fail=True)}))
    [outcome] = report.outcomes
    assert outcome.error is not None
    assert "`x` exited 3: boom" in outcome.error and "command:x" in outcome.error
    assert isinstance(ActionFailed("a", "x"), HostError)


def test_a_hosts_steps_go_in_one_batch_between_the_widened_and_the_final_record() -> None:
    """Three changes, one request: the record widened first (listing the changes as pending),
    every step in order, the record narrowed last (nothing pending); nothing through single
    agent calls."""
    log: list[tuple[str, str]] = []
    changes = tuple(Change(f"command:{i}", Action.CREATE, (FieldChange("guard", None, "x"),),
                           (Run((f"c{i}",)), Run((f"d{i}",), check=False))) for i in range(3))
    plan = Plan("c", "c.yml", (HostPlan("a", changes, {"format": 1, "cluster": "c",
                                                        "resources": []}),))
    conn = Recorder("a", log)
    report = asyncio.run(apply_plan(plan, {"a": conn}))
    assert report.outcomes[0].status is HostStatus.CHANGED
    assert report.outcomes[0].applied == ("command:0", "command:1", "command:2")
    assert conn.batches == 1
    assert [op for _, op in log] == ["managed_write", *["run"] * 6, "managed_write"]
    widened, final = conn.records
    assert widened["pending"] == ["command:0", "command:1", "command:2"]
    assert "pending" not in final


def test_a_failed_step_ends_the_batch_and_only_whole_changes_count_as_applied() -> None:
    log: list[tuple[str, str]] = []
    changes = (Change("command:ok", Action.CREATE, (), (Run(("ok",), check=False),)),
               Change("command:x", Action.CREATE, (), (Run(("ok",), check=False), Run(("x",)))),
               Change("command:never", Action.CREATE, (), (Run(("never",)),)))
    plan = Plan("c", "c.yml", (HostPlan("a", changes, {"format": 1, "cluster": "c",
                                                        "resources": []}),))
    conn = Recorder("a", log, fail=True)
    report = asyncio.run(apply_plan(plan, {"a": conn}))
    [outcome] = report.outcomes
    assert outcome.status is HostStatus.FAILED and outcome.applied == ("command:ok",)
    assert outcome.error is not None and "while applying command:x" in outcome.error
    assert [op for _, op in log] == ["managed_write", "run", "run", "run"]
    # the host keeps the widened record: the next plan knows what this run left unfinished
    assert [r["pending"] for r in conn.records] == [["command:ok", "command:x", "command:never"]]
