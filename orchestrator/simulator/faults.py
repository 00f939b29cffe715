"""What can go wrong on a link, decided reproducibly: cut, stalled, corrupt or whole-file bodies,
404s, 429s, 503s and a bandwidth limit.

Why decisions are keyed by the request rather than drawn from one shared random stream: the hub
serves several clients on several threads, so the order in which requests arrive is not
reproducible, but each request's identity is. A request's fate depends only on the seed, what it
asks for (method, path, Range) and how many identical requests came before it — the same run
against the same seed injects the same faults, and a retry of a failed request gets a fresh draw
instead of failing forever. Each kind of fault draws from its own stream (the seed, the kind and
the request), so turning one on never changes where another strikes.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

# The counter keys of `HubStats.faults`, one per kind of fault, in the order they are decided.
FAULT_KINDS = ("not_found", "error", "rate_limited", "range_ignored", "stall", "cut", "corrupt")


@dataclass(frozen=True)
class Faults:
    """The fault configuration of a `TestHub`; all zero means a perfect link.

    Each ``*_fraction`` is the share of eligible requests that get that fault (1.0: every one).
    Answers instead of the file (a HEAD too):

    * ``not_found_fraction``: 404 ``EntryNotFound``, as for a file missing from the revision.
    * ``error_fraction``: 503 with ``Retry-After: retry_after``.
    * ``rate_limit_fraction``: 429 ``Too Many Requests`` with ``Retry-After: retry_after``, as
      the Hub's rate limits answer.

    Bodies (GET only; the redirect to the CDN has none):

    * ``ignore_range_fraction``: a Range request is answered 200 with the whole body, as a CDN
      with gzip in front does (the other body faults then apply to that body).
    * ``stall_fraction``: headers and a random part of the body are sent, then nothing for
      ``stall_seconds`` (set it beyond the client's read timeout), then the connection closes.
    * ``cut_fraction``: headers and a random part of the body are sent, then the connection is
      closed.
    * ``corrupt_fraction``: the body is sent whole but its first byte is flipped: the right
      length, the wrong bytes, on whatever range was asked for.

    ``bytes_per_second``: one limit shared by every response (the hub's uplink), None for none.
    ``files``: the repository paths (``"model-00001-of-00002.safetensors"``) whose requests get
    faults, None for every file. ``api``: whether the JSON API endpoints get the answer faults
    too (by default only file requests do: the API answers are small and a cut there tests JSON
    parsing, not resume).
    """

    cut_fraction: float = 0.0
    error_fraction: float = 0.0
    bytes_per_second: float | None = None
    retry_after: int = 1
    seed: int = 0
    api: bool = False
    rate_limit_fraction: float = 0.0
    not_found_fraction: float = 0.0
    ignore_range_fraction: float = 0.0
    corrupt_fraction: float = 0.0
    stall_fraction: float = 0.0
    stall_seconds: float = 5.0
    files: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in (
            "cut_fraction",
            "error_fraction",
            "rate_limit_fraction",
            "not_found_fraction",
            "ignore_range_fraction",
            "corrupt_fraction",
            "stall_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], not {value}")
        if self.bytes_per_second is not None and self.bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive (or None for no limit)")
        if self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.stall_seconds < 0:
            raise ValueError("stall_seconds must be >= 0")
        if self.files is not None:
            object.__setattr__(self, "files", frozenset(self.files))


@dataclass(frozen=True)
class Fate:
    """What happens to one request.

    ``status``: answered 404, 503 or 429 instead (None: answered as asked). ``whole``: a Range
    request answered 200 with the whole file. ``cut_at``: the body stops after that many bytes
    (None: sent whole); with ``stall`` the link first goes quiet for ``Faults.stall_seconds``.
    ``corrupt``: the body's first byte is flipped."""

    status: int | None = None
    whole: bool = False
    cut_at: int | None = None
    stall: bool = False
    corrupt: bool = False

    @property
    def error(self) -> bool:
        """Answered 503 (the ``error_fraction`` fault)."""
        return self.status == 503

    @property
    def kinds(self) -> tuple[str, ...]:
        """The `FAULT_KINDS` this fate injects."""
        found = {
            "not_found": self.status == 404,
            "error": self.status == 503,
            "rate_limited": self.status == 429,
            "range_ignored": self.whole,
            "stall": self.stall,
            "cut": self.cut_at is not None and not self.stall,
            "corrupt": self.corrupt,
        }
        return tuple(kind for kind in FAULT_KINDS if found[kind])


class FaultPlan:
    """Turns a `Faults` configuration into per-request decisions (see the module docstring)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def applies_to(self, path: str | None) -> bool:
        """Whether requests for the repository file ``path`` get faults (`Faults.files`)."""
        return self.faults.files is None or (path is not None and path in self.faults.files)

    def fate(self, request_key: str, body_length: int, whole_length: int | None = None) -> Fate:
        """Decide one request. ``body_length`` is 0 when there is no body (a HEAD, a redirect);
        ``whole_length`` is the whole file's length when the request asked for a range of it
        (None otherwise): the size of the body if the range is ignored."""
        with self._lock:
            nth = self._seen[request_key]
            self._seen[request_key] += 1
        f = self.faults

        def rng(kind: str = "") -> random.Random:
            # A str seed is hashed with sha512 by `random`: stable across runs and
            # PYTHONHASHSEED. The 503/cut stream keeps its original key, so that seeds chosen
            # before the other kinds existed inject the same faults.
            tag = f"{kind}|" if kind else ""
            return random.Random(f"{f.seed}|{tag}{request_key}|{nth}")  # noqa: S311

        base = rng()
        if _draw(rng("not_found"), f.not_found_fraction):
            return Fate(status=404)
        if base.random() < f.error_fraction:
            return Fate(status=503)
        if _draw(rng("rate_limit"), f.rate_limit_fraction):
            return Fate(status=429)
        whole = (
            body_length > 0
            and whole_length is not None
            and _draw(rng("range"), f.ignore_range_fraction)
        )
        length = whole_length if whole and whole_length is not None else body_length
        if length <= 0:
            return Fate(whole=whole)
        corrupt = _draw(rng("corrupt"), f.corrupt_fraction)
        stall = rng("stall")
        if _draw(stall, f.stall_fraction):
            return Fate(whole=whole, cut_at=stall.randrange(length), stall=True, corrupt=corrupt)
        if base.random() < f.cut_fraction:
            return Fate(whole=whole, cut_at=base.randrange(length), corrupt=corrupt)
        return Fate(whole=whole, corrupt=corrupt)


def _draw(rng: random.Random, fraction: float) -> bool:
    """One decision of a fault kind; no draw at all when the kind is off."""
    return fraction > 0 and rng.random() < fraction


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
