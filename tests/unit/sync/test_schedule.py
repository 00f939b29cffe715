"""assign_sources, table-style: facts and desired files in, each copy's source out. No SSH."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

from orchestrator.plan import Plan
from orchestrator.plan.sources import assign_sources, holders_of
from orchestrator.resources.model_files import ModelFiles
from orchestrator.resources.steps import Fetch, FromController, FromHub, FromPeer
from tests.unit.sync.helpers import META, WEIGHTS, facts, manifest, node, plans, sources

EVERYTHING = (*WEIGHTS, *META)


def test_fresh_cluster_each_file_leaves_the_origin_once_and_seeds_spread() -> None:
    models = {"a": node(WEIGHTS[:3]), "b": node(WEIGHTS[2:5]), "c": node(WEIGHTS[4:])}
    all_facts = {h: facts(h, m) for h, m in models.items()}
    out = sources(assign_sources(plans(models, all_facts), all_facts, models["a"]))
    for rel in EVERYTHING:
        copies = {h: s for (h, f), s in out.items() if f == rel}
        seeds = [h for h, s in copies.items() if not isinstance(s, FromPeer)]
        assert len(seeds) == 1, (rel, copies)
        assert copies[seeds[0]] == (FromController() if rel in META else FromHub())
        for host, source in copies.items():
            if host != seeds[0]:
                assert isinstance(source, FromPeer) and source.host in copies
                assert source.scheduled and source.fallback == ()
    seeded = Counter(h for (h, _), s in out.items() if not isinstance(s, FromPeer))
    assert set(seeded) == {"a", "b", "c"}, seeded  # every node downloads part of the model


def test_copies_grow_as_a_tree_not_a_chain_or_a_star() -> None:
    models = {f"n{i}": node(WEIGHTS[:1]) for i in range(8)}
    all_facts = {h: facts(h, m) for h, m in models.items()}
    out = sources(assign_sources(plans(models, all_facts), all_facts, models["n0"]))
    rel = WEIGHTS[0]
    parent = {h: s.host if isinstance(s, FromPeer) else None
              for (h, f), s in out.items() if f == rel}

    def depth(host: str) -> int:
        up = parent[host]
        return 0 if up is None else 1 + depth(str(up))

    sends = Counter(p for p in parent.values() if p is not None)
    assert max(depth(h) for h in parent) <= math.ceil(math.log2(8)), parent
    assert max(sends.values()) <= 3, sends


def test_a_repaired_file_comes_from_a_holder_right_away() -> None:
    models = {h: node(WEIGHTS) for h in ("a", "b", "c")}
    bad = WEIGHTS[2]
    all_facts = {"a": facts("a", models["a"], EVERYTHING),
                 "b": facts("b", models["b"], set(EVERYTHING) - {bad}, wrong={bad: "0" * 64}),
                 "c": facts("c", models["c"], EVERYTHING)}
    out = sources(assign_sources(plans(models, all_facts), all_facts, models["a"]))
    assert out == {("b", bad): FromPeer("a", fallback=("c",))}
    assert holders_of(all_facts, models["a"])[bad] == ("a", "c")  # a wrong copy holds nothing


def test_a_new_node_takes_everything_from_its_peers_spread_over_them() -> None:
    models = {h: node(WEIGHTS) for h in ("a", "b", "c")}
    all_facts = {"a": facts("a", models["a"], EVERYTHING), "b": facts("b", models["b"],
                                                                       EVERYTHING),
                 "c": facts("c", models["c"])}
    out = sources(assign_sources(plans(models, all_facts), all_facts, models["a"]))
    assert {k[0] for k in out} == {"c"} and len(out) == len(EVERYTHING)
    peers = [s for s in out.values() if isinstance(s, FromPeer) and not s.scheduled]
    assert len(peers) == len(out)
    assert all(s.fallback == (({"a", "b"} - {s.host}).pop(),) for s in peers)
    load = Counter(s.host for s in peers)
    assert abs(load["a"] - load["b"]) <= 1, load


def test_a_drained_holder_is_still_a_source() -> None:
    man = manifest()
    models = {"a": node(WEIGHTS[:3], man), "d": ModelFiles(node([]).directory, man, frozenset())}
    all_facts = {"a": facts("a", models["a"], META),
                 "d": facts("d", models["d"], WEIGHTS)}  # drained: needs nothing, holds all
    out = sources(assign_sources(plans(models, all_facts), all_facts, models["a"]))
    assert out == {("a", rel): FromPeer("d") for rel in WEIGHTS[:3]}


def test_output_depends_on_the_input_only_not_its_order() -> None:
    models = {h: node(WEIGHTS[i % 3:i % 3 + 4]) for i, h in enumerate("abcdef")}
    all_facts = {h: facts(h, m, META if h in "bd" else ()) for h, m in models.items()}
    expected = assign_sources(plans(models, all_facts), all_facts, models["a"])
    rng = random.Random(7)
    for _ in range(5):
        shuffled = plans(models, all_facts)
        rng.shuffle(shuffled)
        facts_shuffled = dict(rng.sample(sorted(all_facts.items()), len(all_facts)))
        got = assign_sources(shuffled, facts_shuffled, models["a"])
        assert sorted(got, key=lambda h: h.host) == sorted(expected, key=lambda h: h.host)


def test_waits_only_follow_earlier_copies_of_the_same_file() -> None:
    """Every scheduled peer fetches the same file itself, and its own copy does not
    (transitively) wait for this one: the wait graph is acyclic, so apply cannot deadlock."""
    models = {h: node(WEIGHTS) for h in "abcdefg"}
    all_facts = {h: facts(h, m) for h, m in models.items()}
    out = sources(assign_sources(plans(models, all_facts), all_facts, models["a"]))
    for (host, rel), source in out.items():
        seen = {host}
        while isinstance(source, FromPeer) and source.scheduled:
            assert source.host not in seen
            seen.add(source.host)
            source = out[(source.host, rel)]  # the peer's own copy of the same file
        assert isinstance(source, FromHub | FromController) or not source.scheduled


def test_steps_other_than_fetch_are_untouched() -> None:
    models = {"a": node(WEIGHTS[:2])}
    all_facts = {"a": facts("a", models["a"], strays=True)}
    [before] = plans(models, all_facts)
    [after] = assign_sources([before], all_facts, models["a"])
    assert [s for s in after.changes[0].steps if not isinstance(s, Fetch)] == \
        [s for s in before.changes[0].steps if not isinstance(s, Fetch)]
    assert after.changes[0].steps[0].op == "prune"


def test_hosts_named_hub_and_local_are_scheduled_as_peers_not_origins() -> None:
    """Validation allows host names ``hub`` and ``local``: each copy between them is planned
    from the other *host*, and stays so through a saved plan's JSON."""
    models = {h: node(WEIGHTS) for h in ("hub", "local")}
    all_facts = {"hub": facts("hub", models["hub"], [*WEIGHTS[:3], *META]),
                 "local": facts("local", models["local"], WEIGHTS[3:])}
    planned = assign_sources(plans(models, all_facts), all_facts, models["hub"])
    expected = {("local", rel): FromPeer("hub") for rel in (*WEIGHTS[:3], *META)}
    expected |= {("hub", rel): FromPeer("local") for rel in WEIGHTS[3:]}
    assert sources(planned) == expected
    saved = Plan.from_json(json.loads(json.dumps(Plan("t", "t.yml", planned).to_json())))
    assert sources(saved.hosts) == expected
