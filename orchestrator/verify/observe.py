"""Read a rank's state from its node: launchd's view, the status file, the end of the log.

Two or three agent calls per node, all read-only: ``facts`` (the job, plus whatever else the
caller asks for in the same round trip), ``read`` (the status file) and, when asked, ``run``
``tail`` on the log (the agent's ``read`` returns nothing for files over 256 KiB, and a
worker's log grows without rotation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.errors import HostError, HostUnreachable
from orchestrator.executor import Connection
from orchestrator.facts import FactRequest, HostFacts, parse_facts
from orchestrator.placement.choose import Placement
from orchestrator.plan.ring import RankView, rank_fact_request, rank_view
from orchestrator.resources.layout import WorkerLayout

__all__ = ["Observation", "observe_rank", "observe_ring"]


@dataclass(frozen=True)
class Observation:
    view: RankView
    facts: HostFacts | None  # the node's facts for the extra request too (None: unreachable)


async def observe_rank(conn: Connection | HostError | None, host: str, rank: int,
                       layout: WorkerLayout, *, log_lines: int = 0,
                       extra: FactRequest | None = None) -> Observation:
    """One rank's view; never raises for a host problem (it is recorded in the view).

    One facts call answers the job, the status file and `extra`; the log tail, when asked
    for, is a second call.
    """
    if conn is None or isinstance(conn, HostError):
        return Observation(rank_view(host, rank, conn, layout), None)
    request = rank_fact_request(layout)
    if extra is not None:
        request = request.merge(extra)
    try:
        raw = await conn.agent("facts", {**request.to_json(), "read_only": True})
        facts = parse_facts(conn.name, raw, request)
        tail = ""
        if log_lines > 0:
            done = await conn.agent("run", {"argv": ["tail", "-n", str(log_lines),
                                                     layout.log.removeprefix("~/")],
                                            "cwd": "~"})
            tail = str(done.get("stdout") or done.get("stderr") or "")
    except HostUnreachable as exc:
        return Observation(RankView(rank, host, False, None, None, str(exc)), None)
    except HostError as exc:
        return Observation(RankView(rank, host, True, None, None, str(exc)), None)
    return Observation(rank_view(host, rank, facts, layout, log_tail=tail), facts)


async def observe_ring(placement: Placement, layout: WorkerLayout,
                       conns: Mapping[str, Connection | HostError], *, log_lines: int = 0,
                       extra: Mapping[str, FactRequest] | None = None) -> list[Observation]:
    """Every rank of the placement, concurrently, in rank order."""
    return list(await asyncio.gather(*(
        observe_rank(conns.get(node.name), node.name, node.rank, layout, log_lines=log_lines,
                     extra=(extra or {}).get(node.name))
        for node in placement.nodes)))
