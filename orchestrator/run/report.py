"""What an apply adds to its per-host outcomes: typed, so every reader (the renderer, drain, the
exit code) reads fields the type checker knows, and the JSON report is built in one place.

The byte accounting stays a `TypedDict`: it is JSON by nature (it is printed as is by
``--json`` and by drain), and a TypedDict types it without a second, parallel shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

__all__ = ["ByteCounts", "HostBytes", "LockLeft", "RingCheck", "Route", "TransferSummary"]

# How a file's bytes travelled: from the Hub, from a peer over the LAN, from the controller.
Route = Literal["hub", "lan", "local"]


class ByteCounts(TypedDict):
    hub: int
    lan: int
    local: int
    resumed: int
    refetched: int


class HostBytes(TypedDict):
    files: int
    hub: int
    lan: int
    local: int


class TransferSummary(TypedDict):
    """The model sync's accounting of one apply (no token, no URL)."""

    files: int
    failed: int
    bytes: ByteCounts
    mismatches: int
    retries: int
    hosts: dict[str, HostBytes]
    served: dict[str, int]
    serve_errors: dict[str, str]
    started_at: float | None
    finished_at: float | None
    fetches: list[dict[str, Any]]


@dataclass(frozen=True)
class LockLeft:
    """Hosts where this run's cluster lock could not be released, and the command that frees
    them: until it is run, every apply there is refused."""

    not_released: Mapping[str, str]  # host -> why
    unlock: str

    def to_json(self) -> dict[str, Any]:
        return {"not_released": dict(self.not_released), "unlock": self.unlock}


@dataclass(frozen=True)
class RingCheck:
    """The health check after an apply: every rank up, the ring's size, a real completion."""

    ok: bool
    message: str
    api_url: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "message": self.message, "api_url": self.api_url}
