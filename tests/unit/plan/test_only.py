"""`Plan.only`: a plan narrowed to some changes (`orch drain`'s pre-stage) ends with a record
that still owes the rest, so the next plan makes them."""

from __future__ import annotations

from orchestrator.plan import HostPlan, Plan
from orchestrator.plan.core import RECORD_ID, widened_record
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.steps import LaunchdBootout, LaunchdBootstrap, Mkdir, Remove

JOB = "launchd:user/com.example.job"
FINAL = {"format": 2, "cluster": "c", "resources": [
    {"id": "directory:~/data", "cleanup": [{"op": "remove", "path": "~/data"}]},
    {"id": JOB, "cleanup": [{"op": "launchd_bootout", "domain": "user",
                             "label": "com.example.job"}]}]}
MADE = Change("directory:~/data", Action.CREATE, (FieldChange("kind", "missing", "dir"),),
              (Mkdir("~/data", 0o755),))
RELOAD = Change(JOB, Action.UPDATE, (FieldChange("reload", None, "x"),),
                (LaunchdBootstrap("user", "com.example.job", "~/job.plist"),),
                cleanup=(LaunchdBootout("user", "com.example.job"),))
GONE = Change("file:~/old", Action.DELETE, (FieldChange("declared", True, False),),
              (Remove("~/old"),))


def test_the_changes_left_out_stay_owed_in_the_record() -> None:
    plan = Plan("c", "c.yml", (HostPlan("a", (GONE, MADE, RELOAD), FINAL),))
    [narrowed] = plan.only(lambda _host, change: change is MADE).hosts
    assert narrowed.changes == (MADE,)
    assert narrowed.record["pending"] == [JOB]  # the next plan reloads the job
    assert narrowed.record["resources"] == [  # and still removes ~/old
        {"id": "file:~/old", "cleanup": [{"op": "remove", "path": "~/old"}]},
        *FINAL["resources"]]


def test_keeping_every_change_keeps_the_final_record() -> None:
    plan = Plan("c", "c.yml", (HostPlan("a", (GONE, MADE, RELOAD), FINAL),))
    assert plan.only(lambda _host, _change: True) == plan


def test_a_run_widens_the_record_with_what_it_set_out_to_do() -> None:
    record_only = Change(RECORD_ID, Action.UPDATE, (FieldChange("record", "stale", "current"),),
                         ())
    widened = widened_record(FINAL, (GONE, MADE, RELOAD, record_only))
    assert widened["pending"] == ["directory:~/data", JOB]
    assert [e["id"] for e in widened["resources"]] == ["file:~/old", "directory:~/data", JOB]
    assert "pending" not in widened_record(FINAL, (GONE,))  # nothing pending: no key
    # a narrowed record widened again (the pre-stage's own run) keeps what it already owed
    owed = widened_record(FINAL, (RELOAD,))
    assert widened_record(owed, (MADE,))["pending"] == [JOB, "directory:~/data"]
