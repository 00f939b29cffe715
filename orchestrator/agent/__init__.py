"""The node-side agent, seen from the controller: its source, its hash, how it is invoked.

The agent itself (`agent.py`) is a stdlib-only script that runs on the node; this module only
reads it as bytes. It is addressed on the node by a prefix of its sha256, so a changed agent is
a new file and a converged node never needs an upload.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["AGENT_FILE", "agent_file_id", "agent_source", "agent_source_hash"]

AGENT_FILE = Path(__file__).with_name("agent.py")


@functools.cache
def agent_source() -> bytes:
    """The exact bytes shipped to nodes."""
    return AGENT_FILE.read_bytes()


def agent_source_hash() -> str:
    """sha256 (hex) of the agent's source: what the node reports as `agent.version`."""
    return hashlib.sha256(agent_source()).hexdigest()


def agent_file_id() -> str:
    """The cache name on the node: `~/.orch/agent/<id>.py` (a 16-hex prefix of the hash)."""
    return agent_source_hash()[:16]
