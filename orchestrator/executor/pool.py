"""Running one coroutine per host, concurrently under a limit, failures kept per host.

Why a helper: every stage (connect, facts, apply) has the same shape, and the rule that one
host's failure is recorded rather than raised through the others belongs in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from orchestrator.errors import HostError

__all__ = ["for_each_host"]

T = TypeVar("T")
C = TypeVar("C")


async def for_each_host(
    conns: Mapping[str, C | HostError],
    fn: Callable[[C], Awaitable[T]],
    limit: int,
) -> dict[str, T | HostError]:
    """`fn(conn)` for every host at most `limit` at a time, as {host: result or HostError}.

    A host already failed (its value is a HostError) is passed through untouched. A HostError
    raised by `fn` is recorded for that host. Any other exception is a bug, not a host problem:
    it is raised, but only after every other host has finished, so no host is left half-done.
    Results come back in the order of `conns`.
    """
    if limit < 1:
        raise ValueError(f"concurrency limit must be at least 1, not {limit}")
    gate = asyncio.Semaphore(limit)

    async def one(conn: C) -> T:
        async with gate:
            return await fn(conn)

    live: list[tuple[str, C]] = [(n, c) for n, c in conns.items() if not isinstance(c, HostError)]
    outcomes = await asyncio.gather(*(one(c) for _, c in live), return_exceptions=True)
    done = dict(zip((n for n, _ in live), outcomes, strict=True))
    results: dict[str, T | HostError] = {}
    for name, conn in conns.items():
        if isinstance(conn, HostError):
            results[name] = conn
            continue
        outcome = done[name]
        if isinstance(outcome, HostError):
            results[name] = outcome
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            results[name] = outcome
    return results
