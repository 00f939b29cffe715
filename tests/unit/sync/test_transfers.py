"""TransferContext on local "hosts" (a HOME each, the real agent, real peer servers, the test
hub): every copy arrives verified, each file leaves the hub once, and failures reroute."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import HostError
from orchestrator.executor import Connection
from orchestrator.executor.fake import LocalConnection
from orchestrator.facts import HostFacts
from orchestrator.model.hub import HubClient
from orchestrator.model.manifest import Manifest, hub_manifest
from orchestrator.plan import Plan, diff_host
from orchestrator.plan.sources import assign_sources
from orchestrator.render import summary_text
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.model_files import ModelFiles, model_files_by_host
from orchestrator.resources.steps import FromPeer, Run, Source
from orchestrator.run.apply import ApplyReport, HostStatus, apply_plan
from orchestrator.run.engine import close_all
from orchestrator.run.progress import EventProgress, Progress, RichProgress, Tracker
from orchestrator.run.transfers import Peer, TransferContext
from orchestrator.simulator.faults import Faults
from orchestrator.simulator.hub import TestHub
from tests.fixtures.facts import read_facts

REPO = "org/tiny"
TOKEN = "hf_transfers_secret_55aa66bb77cc"
DIRECTORY = "~/.orch/models/org--tiny"
WEIGHTS = [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)]
SPLIT = {"a": WEIGHTS[:3], "b": WEIGHTS[2:5], "c": WEIGHTS[4:]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for i, name in enumerate(WEIGHTS):
        (root / name).write_bytes(os.urandom(150_000 + 1000 * i))
    (root / "config.json").write_text('{"model_type": "tiny"}\n')
    (root / "tokenizer.json").write_text('{"model": {}}\n')
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"t{i}": n for i, n in enumerate(WEIGHTS)}}))
    return root


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class Cluster:
    hub: TestHub
    manifest: Manifest
    homes: dict[str, Path]
    conns: dict[str, LocalConnection]
    models: dict[str, ModelFiles]
    peers: dict[str, Peer]

    def facts(self) -> dict[str, HostFacts]:
        async def one(host: str) -> HostFacts:
            return await read_facts(self.conns[host], [self.models[host]])

        async def everyone() -> dict[str, HostFacts]:
            got = await asyncio.gather(*(one(h) for h in sorted(self.models)))
            return dict(zip(sorted(self.models), got, strict=True))

        return asyncio.run(everyone())

    def plan(self) -> Plan:
        facts = self.facts()
        host_plans = [diff_host("t", [self.models[h]], facts[h]) for h in sorted(self.models)]
        some = next(iter(self.models.values()))
        return Plan("t", "t.yml", assign_sources(host_plans, facts, some))

    def apply(self, plan: Plan, *, token: str | None = None, progress: Progress | None = None,
              **options: Any) -> tuple[ApplyReport, TransferContext]:
        ctx = TransferContext(plan, self.manifest, self.peers, hub_token=token,
                              progress=progress, poll_interval=0.2)
        conns: Mapping[str, Connection | HostError] = self.conns

        async def run() -> ApplyReport:
            async with ctx.serving(conns):
                return await apply_plan(plan, conns, transfers=ctx, **options)

        return asyncio.run(run()), ctx

    def holds(self, host: str) -> set[str]:
        root = self.homes[host] / DIRECTORY.removeprefix("~/")
        return {p.name for p in root.iterdir() if p.is_file()} if root.is_dir() else set()


def make_cluster(tmp_path: Path, model_dir: Path, split: Mapping[str, Sequence[str]], *,
                 faults: Faults | None = None, token: str | None = None) -> Iterator[Cluster]:
    # With a token, the CDN is on another address: the token must not follow the redirect.
    cdn = "127.0.0.2" if token else None
    with TestHub({REPO: model_dir}, faults=faults, token=token, cdn_host=cdn) as hub:
        client = HubClient(endpoint=hub.endpoint, token=token)
        manifest = hub_manifest(client, REPO, None, cache=tmp_path / "cache")
        homes = {h: tmp_path / h for h in split}
        conns = {h: LocalConnection(homes[h], name=h) for h in split}
        ports = free_ports(len(split))
        try:
            yield Cluster(hub, manifest, homes, conns,
                          model_files_by_host(manifest, DIRECTORY, split),
                          {h: Peer("127.0.0.1", p) for h, p in zip(sorted(split), ports,
                                                                    strict=True)})
        finally:  # each host's agent session ends with its test, not with the whole run
            asyncio.run(close_all(conns.values()))


@pytest.fixture
def cluster(tmp_path: Path, model_dir: Path) -> Iterator[Cluster]:
    yield from make_cluster(tmp_path, model_dir, SPLIT)


def needed(c: Cluster, host: str) -> set[str]:
    return set(c.models[host].needed)


def assert_verified(c: Cluster, model_dir: Path) -> None:
    for host, home in c.homes.items():
        assert c.holds(host) == needed(c, host), host
        for rel in needed(c, host):
            data = (home / DIRECTORY.removeprefix("~/") / rel).read_bytes()
            assert data == (model_dir / rel).read_bytes(), (host, rel)


def test_each_file_leaves_the_hub_once_and_every_node_gets_exactly_its_files(
    cluster: Cluster, model_dir: Path
) -> None:
    stats_before = cluster.hub.stats()  # the manifest fetched the small git files
    plan = cluster.plan()
    progress = EventProgress()
    report, ctx = cluster.apply(plan, progress=progress)
    assert report.by_status(HostStatus.CHANGED) == ["a", "b", "c"], report
    done = progress.tracker.snapshot()
    assert done["bytes_done"] == done["bytes_total"] > 0
    assert_verified(cluster, model_dir)
    stats = cluster.hub.stats()
    assert stats.complete_serves == {f"{REPO}/{rel}": 1 for rel in cluster.manifest.files}
    assert stats.total_bytes_served == cluster.manifest.total_bytes
    summary = ctx.summary()
    lfs = sum(cluster.manifest.files[r].size for r in WEIGHTS)
    assert summary["bytes"]["hub"] == lfs
    assert summary["bytes"]["local"] == stats_before.total_bytes_served
    copies = sum(cluster.manifest.bytes_of(needed(cluster, h)) for h in SPLIT)
    assert summary["bytes"]["hub"] + summary["bytes"]["lan"] + summary["bytes"]["local"] == copies
    assert summary["failed"] == 0 and summary["files"] == sum(len(needed(cluster, h))
                                                              for h in SPLIT)
    assert sum(summary["served"].values()) == summary["bytes"]["lan"]
    assert all(r.finished_at >= r.started_at for r in ctx.records)
    assert used_as_planned(plan, ctx)
    assert not cluster.plan().has_changes


def used_as_planned(plan: Plan, ctx: TransferContext) -> bool:
    """Every copy came from its planned source: the peer's host (kind "lan"), or the origin."""
    def named(source: Source | None) -> tuple[str, str]:
        assert source is not None
        return (source.host, "lan") if isinstance(source, FromPeer) else (source.kind,
                                                                           source.kind)

    planned = {(h.host, f.file): named(f.source)
               for h in plan.hosts for c in h.changes for f in c.fetches}
    return {(r.host, r.file): (r.source, r.kind) for r in ctx.records} == planned


def test_hosts_named_hub_and_local_serve_each_other_as_peers(
    tmp_path: Path, model_dir: Path
) -> None:
    """Validation allows these names; a copy planned from the peer `hub` must not be fetched
    from the Hub, nor one from the peer `local` be looked up among the controller's copies."""
    for c in make_cluster(tmp_path, model_dir, {"hub": WEIGHTS, "local": WEIGHTS}):
        plan = c.plan()
        peers = {f.source.host for h in plan.hosts for ch in h.changes for f in ch.fetches
                 if isinstance(f.source, FromPeer)}
        assert peers == {"hub", "local"}  # each seeds part and takes the rest from the other
        report, ctx = c.apply(plan)
        assert report.by_status(HostStatus.CHANGED) == ["hub", "local"], report
        assert_verified(c, model_dir)
        assert used_as_planned(plan, ctx)
        assert set(c.hub.stats().complete_serves.values()) == {1}  # each left the Hub once
        assert ctx.summary()["bytes"]["lan"] == sum(
            c.manifest.files[r.file].size for r in ctx.records if r.kind == "lan") > 0


def test_a_repair_falls_back_to_another_holder_when_the_planned_one_cannot_serve(
    tmp_path: Path, model_dir: Path
) -> None:
    split = dict.fromkeys("abc", WEIGHTS)
    for c in make_cluster(tmp_path, model_dir, split):
        c.apply(c.plan())
        bad = c.homes["b"] / DIRECTORY.removeprefix("~/") / WEIGHTS[1]
        bad.write_bytes(bad.read_bytes()[:-1] + b"!")
        plan = c.plan()
        [(host, change)] = plan.changes
        [step] = change.fetches
        assert (host, step.source) == ("b", FromPeer("a", fallback=("c",)))
        with socket.socket() as squatter:  # a's port is taken: its server cannot start
            squatter.bind(("127.0.0.1", c.peers["a"].port))
            c.hub.reset_stats()
            report, ctx = c.apply(plan)
        assert report.by_status(HostStatus.CHANGED) == ["b"], report
        assert bad.read_bytes() == (model_dir / WEIGHTS[1]).read_bytes()
        assert [(r.source, r.ok) for r in ctx.records] == [("a", False), ("c", True)]
        assert "cannot serve" in ctx.summary()["serve_errors"]["a"]
        assert c.hub.stats().total_bytes_served == 0


def test_serial_batches_never_wait_for_a_host_not_yet_applying(
    cluster: Cluster, model_dir: Path
) -> None:
    report, _ = cluster.apply(cluster.plan(), serial=1)
    assert report.by_status(HostStatus.CHANGED) == ["a", "b", "c"], report
    assert_verified(cluster, model_dir)
    complete = cluster.hub.stats().complete_serves
    assert set(complete.values()) == {1}, complete  # still once per file


def test_a_host_failing_before_its_fetches_does_not_strand_the_others(
    cluster: Cluster, model_dir: Path
) -> None:
    plan = cluster.plan()
    boom = Change("command:boom", Action.CREATE, (FieldChange("ran", None, True),),
                  (Run(("false",)),))
    hosts = tuple(replace(h, changes=(boom, *h.changes)) if h.host == "a" else h
                  for h in plan.hosts)
    report, _ = cluster.apply(replace(plan, hosts=hosts))
    assert report.by_status(HostStatus.FAILED) == ["a"]
    assert report.by_status(HostStatus.CHANGED) == ["b", "c"], report
    for host in ("b", "c"):
        assert cluster.holds(host) == needed(cluster, host)
    assert cluster.holds("a") == set()


def test_the_token_goes_only_to_the_hub(tmp_path: Path, model_dir: Path,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    for c in make_cluster(tmp_path, model_dir, SPLIT, token=TOKEN):
        plan = c.plan()
        report, ctx = c.apply(plan, token=TOKEN)
        assert not report.by_status(HostStatus.FAILED), report
        assert c.hub.stats().cdn_requests_with_authorization == 0
        out = capfd.readouterr()
        text = json.dumps([plan.to_json(), ctx.summary()]) + out.out + out.err
        assert TOKEN not in text
        for home in c.homes.values():
            for path in home.rglob("*"):
                if path.is_file():
                    assert TOKEN.encode() not in path.read_bytes(), path
        # A failing fetch: the error travels up; the token does not.
        for home in c.homes.values():
            for path in (home / DIRECTORY.removeprefix("~/")).iterdir():
                path.unlink()
        report, ctx = c.apply(c.plan(), token="hf_a_wrong_token_1234567890")
        assert report.by_status(HostStatus.FAILED)
        errors = json.dumps([o.error for o in report.outcomes]) + json.dumps(ctx.summary())
        assert "HTTP 401" in errors and "hf_a_wrong_token" not in errors


def test_tracker_rates_and_eta() -> None:
    now = [100.0]
    tracker = Tracker(clock=lambda: now[0])
    tracker.begin({"a": 1000, "b": 3000})
    tracker.advance("a", "f", 500)
    now[0] += 1
    assert tracker.snapshot("a") == {"bytes_done": 500, "bytes_total": 1000, "rate_bps": 500,
                                     "eta_s": 1.0}
    tracker.finished("a", "f", 1000)
    tracker.advance("b", "g", 1000)
    now[0] += 1
    assert tracker.snapshot() == {"bytes_done": 2000, "bytes_total": 4000, "rate_bps": 1000,
                                  "eta_s": 2.0}


def test_rich_bars_and_the_summary_line(capsys: pytest.CaptureFixture[str]) -> None:
    bars = RichProgress()
    bars.begin({"a": 1000, "b": 2000})
    bars.started("a", "f", 1000, "hub")
    bars.advance("a", "f", 500)
    bars.finished("a", "f", 1000, "hub", 0.5)
    bars.failed("b", "g", "cut [redacted] off")  # brackets are text, not markup
    bars.end()
    assert "cut [redacted] off" in capsys.readouterr().err
    line = summary_text({"files": 3, "failed": 1, "bytes": {
        "hub": 2_500_000, "lan": 5_000_000_000, "local": 900, "resumed": 0, "refetched": 0}})
    assert line == ("Model files: 3 fetched — 2.5 MB from the Hub, 5.0 GB over the LAN, "
                    "900 B from the controller; 0 B resumed, 0 B re-fetched. 1 failed.")


def test_a_relay_cut_by_its_source_restarting_waits_for_that_source_not_the_hub(
    tmp_path: Path, model_dir: Path
) -> None:
    """Every Range request is answered with the whole file, so a seeder whose body is cut
    starts its partial over, and a copy relayed from that partial breaks off. The receiver
    takes the file from the seeder once it holds it: each file still leaves the Hub whole
    once, and every byte the Hub sent is in the report."""
    split = dict.fromkeys("abc", WEIGHTS[:1])
    faults = Faults(cut_fraction=0.9, ignore_range_fraction=1.0, seed=0,
                    files=frozenset(WEIGHTS))
    for c in make_cluster(tmp_path, model_dir, split, faults=faults):
        report, ctx = c.apply(c.plan())
        assert report.by_status(HostStatus.CHANGED) == ["a", "b", "c"], report
        assert_verified(c, model_dir)
        stats = c.hub.stats()
        weights = {f"{REPO}/{rel}" for rel in WEIGHTS[:1]}
        assert {k: n for k, n in stats.complete_serves.items() if k in weights} == dict.fromkeys(
            weights, 1)
        summary = ctx.summary()
        sent = sum(stats.bytes_served[f"{REPO}/{rel}"] for rel in WEIGHTS[:1])
        assert summary["bytes"]["hub"] == sent
        assert summary["bytes"]["refetched"] == sent - c.manifest.bytes_of(set(WEIGHTS[:1]))


def test_a_host_whose_relay_broke_off_is_taken_whole_once_it_holds_the_file(
    cluster: Cluster,
) -> None:
    """The scheduling decision behind the test above, without its timing: ``b``'s relay from
    the seeder ``a`` broke off; ``b`` waits for ``a`` rather than going to the Hub, and takes
    the whole file from ``a`` when ``a`` has it."""
    ctx = TransferContext(cluster.plan(), cluster.manifest, cluster.peers)
    rel = WEIGHTS[2]
    origin = ctx._origin(rel)

    async def run() -> tuple[Source, bool] | None:
        ctx._serving.update(dict.fromkeys("abc", True))
        ctx._started.update("ab")
        ctx._seeding[rel] = {"a"}
        ctx._via[("a", rel)] = origin
        ctx._begun_event("a", rel).set()
        choosing = asyncio.create_task(ctx._choose("b", rel, origin, set(), {FromPeer("a")}))
        await asyncio.sleep(0.05)
        assert not choosing.done()  # not the Hub: a is still fetching it
        ctx._seeding[rel].discard("a")
        ctx._holding.setdefault(rel, set()).add("a")
        ctx._event("a", rel).set()
        return await asyncio.wait_for(choosing, 5)

    assert asyncio.run(run()) == (FromPeer("a"), False)
