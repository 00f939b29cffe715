"""The Hub misbehaving during `orch apply` on the three sshd test hosts (issue #13 item 13, #16).

Each test injects one kind of fault in the test hub (`Faults`, keyed and reproducible), runs
the real CLI against the real agent on the hosts, and checks what the user sees: the exit
code, the file named in the error, the byte accounting in ``--json``, the files on every node,
and the hub's own counters. The cluster, fixtures and helpers are test_sync.py's.

A body stalled past the read timeout is tested at the fetch level only
(tests/unit/test_transfer.py): the agent's ``fetch`` op leaves `transfer.fetch`'s read timeout
at its 60 s default, and no request field or environment variable sets it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from orchestrator.model.meta import ModelMeta
from orchestrator.simulator.faults import Faults
from orchestrator.simulator.hosts import RunningHost
from orchestrator.simulator.hub import TestHub
from tests.integration import test_sync
from tests.integration.test_sync import (
    REPO,
    assert_exact,
    held,
    model_root,
    needed_by,
    orch,
    transfers_of,
    wipe,
    write_cluster,
)

# test_sync's fixtures: its tiny model, served by a gated hub with the CDN on 127.0.0.2.
model_dir = test_sync.model_dir
meta = test_sync.meta
hub = test_sync.hub
sync_env = test_sync.sync_env

pytestmark = pytest.mark.usefixtures("sync_env")


@pytest.fixture
def faulty(hub: TestHub, test_hosts: list[RunningHost]) -> Iterator[TestHub]:
    """The module's hub, its counters zeroed and the nodes' model directories empty; its
    faults and size limit are put back afterwards."""
    wipe(test_hosts)
    hub.reset_stats()
    hub.log.clear()
    try:
        yield hub
    finally:
        hub.set_faults(Faults())
        hub.plain_http_limit = None


def apply(hosts: Sequence[RunningHost], hub: TestHub, tmp_path: Path) -> tuple[int, str, str, Path]:
    cluster = write_cluster(tmp_path, hosts, hub, [h.name for h in hosts])
    ran = orch("apply", cluster, "--yes", "--json", known=hosts[0].known_hosts_file)
    return ran.returncode, ran.stdout, ran.stderr, cluster


def weights(model_dir: Path) -> frozenset[str]:
    return frozenset(p.name for p in model_dir.glob("*.safetensors"))


def needed_by_one(needed: Mapping[str, set[str]], model_dir: Path) -> tuple[str, str]:
    """(a weight file exactly one host needs, that host)."""
    for name in sorted(weights(model_dir)):
        hosts = [h for h, files in needed.items() if name in files]
        if len(hosts) == 1:
            return name, hosts[0]
    raise AssertionError(f"every weight file is on several hosts: {needed}")


def nowhere(hosts: Sequence[RunningHost], name: str) -> None:
    """No node has ``name`` in place, nor a partial of it that holds the whole file."""
    for host in hosts:
        assert not (model_root(host) / name).exists(), host.name
        partial = model_root(host) / f"{name}.partial"
        assert not partial.exists() or partial.stat().st_size == 0, host.name


def failed_hosts(out: str) -> dict[str, str]:
    """The hosts apply reports failed, with the error it prints for each."""
    return {h["host"]: h["error"] for h in json.loads(out)["outcome"]["hosts"]
            if h["status"] == "failed"}


def hub_requests(hub: TestHub, name: str) -> list[tuple[str, int, tuple[str, ...]]]:
    return [
        ("cdn" if e.path.startswith("/cdn/") else "resolve", e.status, e.faults)
        for e in hub.log
        if e.file == name
    ]


def test_a_resume_answered_with_the_whole_file_is_restarted_and_counted_refetched(
    test_hosts: list[RunningHost], faulty: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path,
) -> None:
    """Half the weight bodies are cut; every Range request that follows is answered 200 with
    the whole file. Every file arrives verified, no partial is left, and what the hub sent
    beyond the model's bytes is exactly what apply reports as re-fetched."""
    faulty.set_faults(Faults(cut_fraction=0.5, ignore_range_fraction=1.0, seed=4,
                             files=weights(model_dir)))
    code, out, err, cluster = apply(test_hosts, faulty, tmp_path)
    assert code == 0, err
    assert_exact(test_hosts, needed_by(meta, cluster), model_dir)
    for host in test_hosts:
        assert not list(model_root(host).glob("*.partial")), host.name
    stats = faulty.stats()
    assert stats.faults["cut"] > 0 and stats.faults["range_ignored"] > 0, stats.faults
    weight_bytes = sum((model_dir / n).stat().st_size for n in weights(model_dir))
    sent = sum(stats.bytes_served[f"{REPO}/{n}"] for n in weights(model_dir))
    summary = transfers_of(out)
    assert summary["bytes"]["refetched"] == sent - weight_bytes > 0
    assert summary["bytes"]["resumed"] == 0
    restarted = {f["file"] for f in summary["fetches"] if f["bytes_refetched"]}
    ignored = {e.file for e in faulty.log if "range_ignored" in e.faults}
    assert restarted == ignored


def test_wrong_bytes_on_every_answer_fail_naming_the_file_and_nothing_is_put_in_place(
    test_hosts: list[RunningHost], faulty: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path,
) -> None:
    """One weight file comes with its first byte flipped on every answer: apply exits 1
    naming it, no node has it (or a partial of it) in place, every other file arrived, and
    the hub served it exactly twice (a download, then one from zero)."""
    cluster = write_cluster(tmp_path, test_hosts, faulty, [h.name for h in test_hosts])
    needed = needed_by(meta, cluster)
    bad, owner = needed_by_one(needed, model_dir)
    faulty.set_faults(Faults(corrupt_fraction=1.0, files=frozenset({bad})))
    code, out, err, _ = apply(test_hosts, faulty, tmp_path)
    assert code == 1, err
    [(host, error)] = failed_hosts(out).items()
    assert host == owner
    assert f"1 of {len(needed[owner])} model files not fetched" in error
    assert f"{bad}: content does not match its hash, even fetched again from zero" in error
    nowhere(test_hosts, bad)
    for node in test_hosts:  # every other file arrived
        assert set(held(node)) == needed[node.name] - {bad}, node.name
    assert hub_requests(faulty, bad) == [("resolve", 302, ()), ("cdn", 200, ("corrupt",))] * 2
    assert faulty.stats().complete_serves[f"{REPO}/{bad}"] == 2
    summary = transfers_of(out)
    # Only the bad file failed for good. (Under load a relay of another file can break off
    # and be taken again elsewhere: a failed attempt, not a failed file.)
    assert [(f["host"], f["source"]) for f in summary["fetches"]
            if f["file"] == bad and not f["ok"]] == [(owner, "hub")]
    assert summary["failed"] == 1


def test_a_404_for_one_file_fails_naming_it(
    test_hosts: list[RunningHost], faulty: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path,
) -> None:
    cluster = write_cluster(tmp_path, test_hosts, faulty, [h.name for h in test_hosts])
    missing, owner = needed_by_one(needed_by(meta, cluster), model_dir)
    faulty.set_faults(Faults(not_found_fraction=1.0, files=frozenset({missing})))
    code, out, err, _ = apply(test_hosts, faulty, tmp_path)
    assert code == 1, err
    [(host, error)] = failed_hosts(out).items()
    assert host == owner
    assert f"{missing}: " in error and f"/{missing} answered HTTP 404 (EntryNotFound)" in error
    nowhere(test_hosts, missing)
    assert hub_requests(faulty, missing) == [("resolve", 404, ("not_found",))]  # not retried
    assert transfers_of(out)["failed"] == 1


def test_429_with_retry_after_is_waited_for_and_counted(
    test_hosts: list[RunningHost], faulty: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path,
) -> None:
    """A third of the weight requests are rate limited (429, Retry-After: 1): each file's next
    request comes at least 1 s after its 429 (by the hub's clock), every file arrives, and
    every 429 is one of the retries apply reports (a loaded machine may add a retry of its
    own, e.g. a peer connection reset, so the report counts at least the 429s)."""
    faulty.set_faults(Faults(rate_limit_fraction=0.3, retry_after=1, seed=6,
                             files=weights(model_dir)))
    code, out, err, cluster = apply(test_hosts, faulty, tmp_path)
    assert code == 0, err
    assert_exact(test_hosts, needed_by(meta, cluster), model_dir)
    limited = faulty.stats().faults["rate_limited"]
    assert limited > 0
    summary = transfers_of(out)
    assert summary["retries"] >= limited
    for name in weights(model_dir):
        log = [e for e in faulty.log if e.file == name]
        for before, after in itertools.pairwise(log):
            if before.status == 429:
                assert after.at - before.at >= 1.0, (name, before, after)
    assert json.loads(out)["outcome"]["transfers"]["bytes"]["refetched"] == 0


def test_a_file_over_the_plain_http_limit_fails_naming_it(
    test_hosts: list[RunningHost], faulty: TestHub, model_dir: Path, meta: ModelMeta,
    tmp_path: Path,
) -> None:
    """The biggest weight file is over the hub's plain-HTTP limit (the real Hub's is 50 GB):
    exit 1 naming the file and the refusal, after one request to the CDN, nothing in place.
    and the limit the Hub gave."""
    cluster = write_cluster(tmp_path, test_hosts, faulty, [h.name for h in test_hosts])
    needed = needed_by(meta, cluster)
    big = max(weights(model_dir), key=lambda n: (model_dir / n).stat().st_size)
    [owner] = [host for host, files in needed.items() if big in files]
    faulty.plain_http_limit = (model_dir / big).stat().st_size - 1  # only it is over
    code, out, err, _ = apply(test_hosts, faulty, tmp_path)
    assert code == 1, err
    [(host, error)] = failed_hosts(out).items()
    assert host == owner
    assert f"{big}: " in error and f"/{big} answered HTTP 400 (FileTooLarge)" in error
    assert f"{faulty.plain_http_limit}-byte limit" in error, error
    nowhere(test_hosts, big)
    assert hub_requests(faulty, big) == [("resolve", 302, ()), ("cdn", 400, ())]
