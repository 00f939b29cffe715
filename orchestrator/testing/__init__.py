"""Test doubles that speak the real protocols, so the code under test runs unmodified against them.

`TestHub` (in `orchestrator.testing.hub`) is a local HTTP server answering the subset of the
Hugging Face Hub API the model sync uses — revision, tree, resolve with Range and the CDN
redirect — with deterministic fault injection (cut bodies, 503s, a bandwidth limit) and counters
of what it served. It is used by the unit tests and by `orch sandbox up`; it binds to loopback.
"""

from __future__ import annotations

from orchestrator.testing.faults import Faults
from orchestrator.testing.hub import HubStats, TestHub

__all__ = ["Faults", "HubStats", "TestHub"]
