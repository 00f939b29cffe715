"""Where each copy of each model file comes from: the planner's half of the sync. Pure.

`assign_sources` fills the ``source`` of every `Fetch` step in a plan:

* `FromHub` or `FromController` (the controller's copy) for the one *seed* copy of a file that
  no host holds verified — so each file leaves the Hub (or the controller) at most once for
  the whole cluster;
* `FromPeer` ``(H)`` for every other copy; when H does not hold the file yet but fetches it in
  the same apply, ``scheduled`` says apply waits for that fetch; ``fallback`` (when not
  empty): the other hosts holding a verified copy now, which apply turns to, in the order
  they are listed, if the planned source cannot serve.

A source is a type, not a string: a host may be named ``hub`` or ``local`` and is still a peer.

The rule, per file (files in sorted order, hosts in sorted order, so the output is a function
of the input alone):

1. *holders* are the hosts whose facts show a verified copy, whether or not they still need it
   (a drained node, a node whose layers moved); they are ready at round 0.
2. With no holder, the seed is the host needing the file that has been given the fewest seeds
   so far (ties: the lower serving load, then the name), ready at round 1: seeds spread the
   Hub downloads across the nodes instead of queueing them all on one.
3. Every other host needing the file takes it from the holder or scheduled holder whose copy
   would be ready soonest — ``ready round + copies of this file it already sends + 1`` — ties
   broken by the fewest copies served overall, then the name. That grows a binomial tree
   (every copy at once sends on) instead of a chain or a star, and balances uplinks.
   The new copy is itself a scheduled holder from then on.

Apply follows these sources and only deviates when one fails (see `transfers`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace

from orchestrator.facts import HostFacts
from orchestrator.plan.core import HostPlan
from orchestrator.resources.base import Change
from orchestrator.resources.model_files import ModelFiles
from orchestrator.resources.steps import Fetch, FromPeer, Source, origin

__all__ = ["assign_sources", "holders_of"]


def holders_of(facts: Mapping[str, object], model: ModelFiles) -> dict[str, tuple[str, ...]]:
    """file -> hosts holding a verified copy (sorted); hosts without facts hold nothing."""
    holders: dict[str, list[str]] = {}
    for host in sorted(facts):
        fact = facts[host]
        if isinstance(fact, HostFacts):
            for rel in model.verified(fact):
                holders.setdefault(rel, []).append(host)
    return {rel: tuple(hosts) for rel, hosts in sorted(holders.items())}


def assign_sources(host_plans: Sequence[HostPlan], facts: Mapping[str, object],
                   model: ModelFiles) -> tuple[HostPlan, ...]:
    """The plans with every fetch step's ``source`` set; see the module docstring."""
    holders = holders_of(facts, model)
    needers: dict[str, list[str]] = {}
    for host_plan in sorted(host_plans, key=lambda h: h.host):
        for change in host_plan.changes:
            for fetch in change.fetches:
                needers.setdefault(fetch.file, []).append(host_plan.host)

    served: Counter[str] = Counter()  # copies each host sends, all files together
    seeded: Counter[str] = Counter()  # seed copies each host fetches from the origin
    sources: dict[tuple[str, str], Source] = {}
    for rel in sorted(needers):
        ready = dict.fromkeys(holders.get(rel, ()), 0)
        sends: Counter[str] = Counter()
        wanting = sorted(set(needers[rel]) - set(ready))
        if not ready:
            seed = min(wanting, key=lambda h: (seeded[h], served[h], h))
            seeded[seed] += 1
            sources[(seed, rel)] = origin(model.manifest.seed_kind(rel))
            ready[seed] = 1
            wanting.remove(seed)
        for host in wanting:
            src = min(ready, key=lambda s: (ready[s] + sends[s] + 1, served[s], s))
            sends[src] += 1
            served[src] += 1
            ready[host] = ready[src] + sends[src]
            others = [h for h in holders.get(rel, ()) if h not in (src, host)]
            sources[(host, rel)] = FromPeer(
                src, scheduled=src not in holders.get(rel, ()),
                fallback=tuple(sorted(others, key=lambda h: (served[h], h))))

    def with_source(host: str, change: Change) -> Change:
        if not change.fetches:
            return change
        steps = tuple(replace(s, source=sources[(host, s.file)]) if isinstance(s, Fetch) else s
                      for s in change.steps)
        return replace(change, steps=steps)

    return tuple(replace(h, changes=tuple(with_source(h.host, c) for c in h.changes))
                 for h in host_plans)
