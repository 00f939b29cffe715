"""`orch status --watch`'s frame, rendered from `gather_status` over fake nodes (no SSH)."""

from __future__ import annotations

import asyncio
import io

from rich.console import Console

from orchestrator.errors import HostUnreachable
from orchestrator.status import gather_status
from orchestrator.watch import frame
from tests.unit.serving.fakes import FakeAPI, FakeNode
from tests.unit.serving.helpers import cluster, placement, status


def render(**gone: HostUnreachable) -> str:
    c = cluster(3)
    p = placement(c)
    nodes = {n.name: gone.get(n.name) or FakeNode(n.name, status=status(n.rank, pid=100,
                                                                         split=p.split))
             for n in p.nodes}
    result = asyncio.run(gather_status(c, nodes, p, transport=FakeAPI()))  # type: ignore[arg-type]
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(frame(result, p, at="12:00:00"))
    return console.export_text()


def test_a_frame_has_every_node_its_rss_beside_the_prediction_and_the_api_latency() -> None:
    c = cluster(3)
    p = placement(c)
    text = render()
    for node in p.nodes:
        row = next(line for line in text.splitlines() if f" {node.name} " in line)
        assert f" {node.rank} " in row and "serving" in row and "running" in row
        predicted = node.bytes / 2**30
        assert f"200 MiB / {predicted:.1f} GiB" in row, row  # ps: 204800 KiB
    assert "ring: serving — 3/3 ranks serving, size 3" in text
    assert "api: http://10.0.0.1:8080 — probe completion" in text
    assert "12:00:00" in text


def test_an_unreachable_node_shows_as_such_with_the_reason() -> None:
    text = render(mac2=HostUnreachable("mac2", "connection refused"))
    row = next(line for line in text.splitlines() if " mac2 " in line)
    assert "NO" in row
    assert "mac2: connection refused" in text
