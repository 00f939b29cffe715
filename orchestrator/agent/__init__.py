"""The node-side agent, seen from the controller: what is shipped, its hash, how it is named.

The agent (`agent.py`) and the transfer code it uses (`transfer.py`) are stdlib-only modules
that run on the node; this module only reads them as bytes. They are shipped as one zip
(``python3 -I <id>.pyz OP`` runs its ``__main__.py``, which is agent.py's exact content, with
the zip itself on ``sys.path`` so ``transfer`` imports from it). The zip is built
deterministically — sorted entries, fixed timestamps and modes, stored uncompressed (zlib's
output may differ between builds; storing never does) — so its hash depends only on the two
sources, and every controller with the same orch ships the same bytes under the same name.

It is addressed on the node by a prefix of its sha256, so a changed agent is a new file and a
converged node never needs an upload. Read-only runs that find no cached agent stream
agent.py's source alone (`agent_script`): `facts` never imports transfer.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from pathlib import Path

__all__ = [
    "AGENT_FILE",
    "AGENT_SUFFIX",
    "TRANSFER_FILE",
    "agent_file_id",
    "agent_script",
    "agent_source",
    "agent_source_hash",
]

AGENT_FILE = Path(__file__).with_name("agent.py")
TRANSFER_FILE = Path(__file__).with_name("transfer.py")
AGENT_SUFFIX = ".pyz"  # the cached file on the node: ~/.orch/agent/<id>.pyz
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can record


@functools.cache
def agent_script() -> bytes:
    """agent.py's bytes: the zip's ``__main__.py``, and what a read-only run streams."""
    return AGENT_FILE.read_bytes()


@functools.cache
def agent_source() -> bytes:
    """The exact bytes shipped to nodes: the deterministic zip of agent.py and transfer.py."""
    members = {"__main__.py": agent_script(), "transfer.py": TRANSFER_FILE.read_bytes()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            info.create_system = 3  # unix, whatever the controller's OS
            archive.writestr(info, members[name])
    return buffer.getvalue()


def agent_source_hash() -> str:
    """sha256 (hex) of the shipped zip: what the node reports as `agent.version`."""
    return hashlib.sha256(agent_source()).hexdigest()


def agent_file_id() -> str:
    """The cache name on the node: ``~/.orch/agent/<id>.pyz`` (a 16-hex prefix of the hash)."""
    return agent_source_hash()[:16]
