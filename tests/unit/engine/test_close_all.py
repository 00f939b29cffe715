"""The end of a run closes every host's connection at once, and all of them even if one fails."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from orchestrator.errors import HostError, HostUnreachable
from orchestrator.executor import Connection
from orchestrator.run.engine import close_all


class Closing:
    """A connection whose close takes a turn of the loop (as waiting for the agent does)."""

    def __init__(self, name: str, events: list[str], fails: bool = False) -> None:
        self.name, self.events, self.fails = name, events, fails

    async def close(self) -> None:
        self.events.append(f"{self.name} closing")
        await asyncio.sleep(0)
        self.events.append(f"{self.name} closed")
        if self.fails:
            raise RuntimeError(f"{self.name} failed to close")


def conns(*items: Any) -> list[Connection | HostError]:
    return cast(list[Connection | HostError], list(items))


def test_every_close_starts_before_any_ends() -> None:
    events: list[str] = []
    asyncio.run(close_all(conns(*(Closing(n, events) for n in "abc"),
                                HostUnreachable("d", "refused"))))
    assert events[:3] == ["a closing", "b closing", "c closing"]
    assert sorted(events[3:]) == ["a closed", "b closed", "c closed"]


def test_a_failed_close_is_raised_after_the_others_closed() -> None:
    events: list[str] = []
    with pytest.raises(RuntimeError, match="a failed to close"):
        asyncio.run(close_all(conns(Closing("a", events, fails=True), Closing("b", events))))
    assert "b closed" in events
