"""Ring coupling over plan fixtures, and spotting a ring that cannot serve any more."""

from __future__ import annotations

import json

from orchestrator.facts import FileKind, JobState, LaunchdJob
from orchestrator.plan import Plan, diff_host, record_for
from orchestrator.plan.ring import RESTART_FIELD, RankView, couple_ring, ring_restart_reasons
from orchestrator.resources.base import Action, Change, FieldChange, Resource
from orchestrator.resources.files import File
from orchestrator.resources.launchd import HASH_ENV, LaunchdService, render_plist
from orchestrator.resources.steps import LaunchdBootstrap
from orchestrator.worker.status import WorkerState
from tests.unit.serving.helpers import facts, file_fact, job, status

LABEL = "com.orch.lab.worker"
PLIST_PATH = f"~/Library/LaunchAgents/{LABEL}.plist"
HOSTS = ("mac1", "mac2", "mac3")


def worker(rank: int, config: str = "v1") -> LaunchdService:
    plist = render_plist(LABEL, ["/venv/bin/python", "/w.py", "/w.json"],
                         env={"MLX_RANK": str(rank)}, inputs=[config])
    return LaunchdService(LABEL, PLIST_PATH, plist)


def running(service: LaunchdService, *, state: JobState = JobState.RUNNING,
            hash_of: LaunchdService | None = None) -> LaunchdJob:
    """launchd's view of a job loaded from `hash_of`'s plist (default: `service`'s)."""
    from orchestrator.resources.launchd import config_hash

    env = {HASH_ENV: config_hash((hash_of or service).plist)}
    return LaunchdJob(state, 100 if state is JobState.RUNNING else None, 0, env)


def host_plan_for(host: str, service: LaunchdService, job: LaunchdJob, *,
                  extra: tuple[File, ...] = ()) -> Plan:
    import hashlib

    sha = hashlib.sha256(service.plist.encode()).hexdigest()
    files = {PLIST_PATH: file_fact(sha)} | {f.path: file_fact(None, FileKind.MISSING)
                                            for f in extra}  # extra files are to be written
    resources: list[Resource] = [*extra, service]
    f = facts(host, files=files, launchd={service.ref.key: job},
              managed=record_for("lab", resources))  # orch applied these before
    return Plan("lab", "/lab.yml", (diff_host("lab", resources, f),))


def plan_of(*parts: Plan) -> Plan:
    return Plan("lab", "/lab.yml", tuple(h for p in parts for h in p.hosts))


def converged_ring() -> tuple[Plan, dict[str, LaunchdService]]:
    workers = {h: worker(r) for r, h in enumerate(HOSTS)}
    plan = plan_of(*(host_plan_for(h, s, running(s)) for h, s in workers.items()))
    return plan, workers


def changes(plan: Plan) -> dict[str, list[tuple[str, list[str]]]]:
    return {h.host: [(c.resource, [f.name for f in c.fields]) for c in h.changes]
            for h in plan.hosts}


def test_a_converged_ring_stays_untouched() -> None:
    plan, workers = converged_ring()
    assert not plan.has_changes
    assert couple_ring(plan, workers) is plan


def test_one_changed_rank_restarts_every_other_rank_once() -> None:
    _, workers = converged_ring()
    new = worker(1, "v2")  # mac2's config changed: its plist and hash differ
    workers["mac2"] = new
    plan = plan_of(host_plan_for("mac1", workers["mac1"], running(workers["mac1"])),
                   host_plan_for("mac2", new, running(new, hash_of=worker(1))),
                   host_plan_for("mac3", workers["mac3"], running(workers["mac3"])))
    assert changes(plan)["mac2"] == [(new.id, ["config_hash"])]
    coupled = couple_ring(plan, workers)
    assert changes(coupled) == {
        "mac1": [(new.id, [RESTART_FIELD])],
        "mac2": [(new.id, ["config_hash"])],
        "mac3": [(new.id, [RESTART_FIELD])],
    }
    restart = coupled.hosts[0].changes[0]
    assert restart.action is Action.UPDATE
    assert restart.fields[0] == FieldChange(RESTART_FIELD, None, "mac2 changed (config_hash)")
    assert restart.steps == (LaunchdBootstrap("user", LABEL, PLIST_PATH),)
    assert restart.cleanup == workers["mac1"].cleanup()
    # coupling twice is coupling once; the saved plan round-trips
    assert couple_ring(coupled, workers) == coupled
    assert Plan.from_json(json.loads(json.dumps(coupled.to_json()))) == coupled


def test_a_rank_that_is_not_running_or_not_loaded_restarts_the_ring() -> None:
    _, workers = converged_ring()
    waiting = running(workers["mac3"], state=JobState.WAITING)
    plan = plan_of(host_plan_for("mac1", workers["mac1"], running(workers["mac1"])),
                   host_plan_for("mac2", workers["mac2"], running(workers["mac2"])),
                   host_plan_for("mac3", workers["mac3"], waiting))
    coupled = couple_ring(plan, workers)
    assert changes(coupled)["mac1"] == [(workers["mac1"].id, [RESTART_FIELD])]
    assert coupled.hosts[0].changes[0].fields[0].after == "mac3 changed (state)"

    not_loaded = LaunchdJob(JobState.NOT_LOADED, None, None, {})
    plan = plan_of(host_plan_for("mac1", workers["mac1"], running(workers["mac1"])),
                   host_plan_for("mac2", workers["mac2"], not_loaded))
    coupled = couple_ring(plan, workers)
    assert changes(coupled)["mac1"] == [(workers["mac1"].id, [RESTART_FIELD])]


def test_the_restart_comes_after_the_host_own_other_changes() -> None:
    _, workers = converged_ring()
    config = File("~/.orch/serve/lab/extra.txt", "x")
    mac1 = host_plan_for("mac1", workers["mac1"], running(workers["mac1"]), extra=(config,))
    # mac1's plist is unchanged here: the file is not one of its inputs in this fixture
    mac1_plan = Plan("lab", "/lab.yml", (mac1.hosts[0],))
    new = worker(1, "v2")
    plan = plan_of(mac1_plan, host_plan_for("mac2", new, running(new, hash_of=worker(1))))
    coupled = couple_ring(plan, {**workers, "mac2": new})
    assert [c.resource for c in coupled.hosts[0].changes] == [config.id, workers["mac1"].id]


def test_broken_ring_restarts_everything_even_with_no_change() -> None:
    plan, workers = converged_ring()
    coupled = couple_ring(plan, workers, broken={"mac2": "rank 1 restarted after the ring "
                                                          "formed"})
    assert changes(coupled) == {h: [(workers[h].id, [RESTART_FIELD])] for h in HOSTS}
    assert coupled.hosts[0].changes[0].fields[0].after == \
        "mac2 rank 1 restarted after the ring formed"


def test_removed_worker_and_unreachable_host() -> None:
    plan, workers = converged_ring()
    gone = Change(workers["mac3"].id, Action.DELETE, (FieldChange("declared", True, False),),
                  workers["mac3"].cleanup())
    hosts = (plan.hosts[0], plan.hosts[1].__class__(
        "mac3", (gone,), plan.hosts[2].record))
    partial = Plan("lab", "/lab.yml", hosts, unreachable={"mac2": "connection refused"})
    coupled = couple_ring(partial, workers)
    assert changes(coupled) == {"mac1": [(workers["mac1"].id, [RESTART_FIELD])],
                                "mac3": [(workers["mac3"].id, ["declared"])]}
    assert coupled.unreachable == {"mac2": "connection refused"}
    assert coupled.hosts[0].changes[0].fields[0].after == "mac3 removed"


# ----------------------------------------------------------------------------- broken rings


def view(rank: int, state: WorkerState = WorkerState.SERVING, *, pid: int = 100,
         started_at: float = 1000.0, updated_at: float = 1010.0,
         job_state: JobState = JobState.RUNNING) -> RankView:
    return RankView(rank, HOSTS[rank], True, job(job_state, pid),
                    status(rank, state, pid=pid, started_at=started_at, updated_at=updated_at))


def test_a_serving_ring_has_no_reasons() -> None:
    assert ring_restart_reasons([view(0), view(1), view(2)], 3) == {}


def test_a_forming_ring_is_not_broken() -> None:
    views = [view(0, WorkerState.RING), view(1, WorkerState.VERIFYING),
             view(2, WorkerState.RING, started_at=1005.0)]
    assert ring_restart_reasons(views, 3) == {}


def test_a_rank_started_after_the_ring_formed_breaks_it() -> None:
    views = [view(0), view(1, WorkerState.RING, pid=200, started_at=2000.0, updated_at=2001.0),
             view(2)]
    reasons = ring_restart_reasons(views, 3)
    assert list(reasons) == ["mac2"]
    assert "rank 1 restarted (now ring) after rank 0 on mac1 formed the ring" in reasons["mac2"]


def test_a_stale_status_file_is_not_evidence() -> None:
    """The new process has not written its status yet: the file is the old process's."""
    stale = RankView(1, "mac2", True, job(JobState.RUNNING, 999),
                     status(1, WorkerState.RING, pid=200, started_at=2000.0))
    assert ring_restart_reasons([view(0), stale, view(2)], 3) == {}


def test_a_ring_of_the_wrong_size_is_left_to_the_plan() -> None:
    old = RankView(0, "mac1", True, job(), status(0, world_size=2, split=(3, 3)))
    views = [old, view(1, WorkerState.RING, pid=200, started_at=2000.0)]
    assert ring_restart_reasons(views, 3) == {}


def test_health_503_from_a_serving_rank_0() -> None:
    views = [view(0), view(1), view(2)]
    assert ring_restart_reasons(views, 3, health_status=200) == {}
    assert ring_restart_reasons(views, 3, health_status=503) == {
        "mac1": "rank 0 serves but /health answers 503: a peer left the ring"}


def test_snapshot_for_explanations() -> None:
    dead = RankView(2, "mac3", True, LaunchdJob(JobState.WAITING, None, 3, {}),
                    status(2, WorkerState.FAILED, pid=300, error="sha256 mismatch"),
                    log_tail="boom\n")
    snap = dead.snapshot()
    assert (snap.running, snap.exit_code, snap.log_tail) == (False, 3, "boom\n")
    assert snap.status is not None and snap.status.error == "sha256 mismatch"
