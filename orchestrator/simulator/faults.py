"""What can go wrong on a link, decided reproducibly: cut bodies, 503s and a bandwidth limit.

Why decisions are keyed by the request rather than drawn from one shared random stream: the hub
serves several clients on several threads, so the order in which requests arrive is not
reproducible, but each request's identity is. A request's fate depends only on the seed, what it
asks for (method, path, Range) and how many identical requests came before it — the same run
against the same seed injects the same faults, and a retry of a failed request gets a fresh draw
instead of failing forever.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    """The fault configuration of a `TestHub`; all zero means a perfect link.

    ``cut_fraction``: share of bodies cut short (headers and a random part of the body are sent,
    then the connection is closed). ``error_fraction``: share of requests answered 503 with
    ``Retry-After: retry_after``. ``bytes_per_second``: one limit shared by every response (the
    hub's uplink), None for none. ``api``: whether the JSON API endpoints get faults too (by
    default only file bytes do: the API answers are small and a cut there tests JSON parsing,
    not resume).
    """

    cut_fraction: float = 0.0
    error_fraction: float = 0.0
    bytes_per_second: float | None = None
    retry_after: int = 1
    seed: int = 0
    api: bool = False

    def __post_init__(self) -> None:
        for name in ("cut_fraction", "error_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], not {value}")
        if self.bytes_per_second is not None and self.bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive (or None for no limit)")
        if self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")


@dataclass(frozen=True)
class Fate:
    """What happens to one request: a 503, or a body cut after ``cut_at`` of its bytes."""

    error: bool
    cut_at: int | None  # None: the body is sent whole


class FaultPlan:
    """Turns a `Faults` configuration into per-request decisions (see the module docstring)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def fate(self, request_key: str, body_length: int) -> Fate:
        """Decide one request; ``body_length`` is 0 when there is no body to cut."""
        with self._lock:
            nth = self._seen[request_key]
            self._seen[request_key] += 1
        # A str seed is hashed with sha512 by `random`: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"{self.faults.seed}|{request_key}|{nth}")  # noqa: S311 (not crypto)
        if rng.random() < self.faults.error_fraction:
            return Fate(error=True, cut_at=None)
        if body_length > 0 and rng.random() < self.faults.cut_fraction:
            return Fate(error=False, cut_at=rng.randrange(body_length))
        return Fate(error=False, cut_at=None)


class Pacer:
    """A bandwidth limit shared by all connections: each chunk books the next free slot of the
    link and is sent when its slot begins. A sender that fell behind (the write itself takes
    time) may catch up by at most ``SLACK_S`` of the link's time, so idle time earns no burst."""

    SLACK_S = 0.05

    def __init__(self) -> None:
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, nbytes: int, bytes_per_second: float | None) -> None:
        if bytes_per_second is None or nbytes <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.SLACK_S)
            self._next = start + nbytes / bytes_per_second
        if start > now:
            time.sleep(start - now)

    @staticmethod
    def chunk_size(bytes_per_second: float | None, default: int) -> int:
        """Small enough chunks that a throttled stream is smooth (about 20 slots a second)."""
        if bytes_per_second is None:
            return default
        return max(1024, min(default, int(bytes_per_second / 20)))
