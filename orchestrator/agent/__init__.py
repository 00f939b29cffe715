"""The node-side agent, seen from the controller: what is shipped, its hash, how it is named.

The agent is a package of stdlib-only modules that run on the node (`NODE_MODULES`: agent.py
is its entry point and op table; see its docstring for the others); this module only reads
them as bytes. They are shipped as one zip (``python3 -I -S <id>.pyz OP`` runs its
``__main__.py``, which is agent.py's exact content and makes the zip the package
``orch_agent``). The zip is built deterministically — sorted entries, fixed timestamps and
modes, stored uncompressed (zlib's output may differ between builds; storing never does) — so
its hash depends only on the sources, and every controller with the same orch ships the same
bytes under the same name.

It is addressed on the node by a prefix of its sha256, so a changed agent is a new file and a
converged node never needs an upload. The upload also unpacks it beside the zip and compiles
it there with the node's Python, once, so a start loads bytecode instead of compiling every
module (see RUN_SCRIPT in orchestrator/executor/agentcall.py). Read-only runs that find no
cached agent stream the modules instead (`streamed_sources`, imported from memory on the node, see
orchestrator/executor/agentcall.py) and write nothing; transfer.py is left out of that
stream: no read-only op needs it, and it is most of the bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zipfile
from pathlib import Path

__all__ = [
    "AGENT_FILE",
    "AGENT_SUFFIX",
    "NODE_MODULES",
    "STREAM_EXCLUDED",
    "TRANSFER_FILE",
    "agent_file_id",
    "agent_source",
    "agent_source_hash",
    "agent_stream",
    "streamed_sources",
]

HERE = Path(__file__).parent
AGENT_FILE = HERE / "agent.py"
TRANSFER_FILE = HERE / "transfer.py"
AGENT_SUFFIX = ".pyz"  # the cached file on the node: ~/.orch/agent/<id>.pyz
# Every module that runs on the node (stdlib only; they import each other relatively).
NODE_MODULES = (
    "agent",
    "command",
    "common",
    "facts",
    "files",
    "hashcache",
    "interpreters",
    "jsonc",
    "launchd",
    "lock",
    "managed",
    "peer",
    "protocol",
    "spawn",
    "transfer",
)
STREAM_EXCLUDED = ("transfer",)  # only fetch and serve import it; they never run read-only
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can record


@functools.cache
def _read(name: str) -> bytes:
    return (HERE / f"{name}.py").read_bytes()


@functools.cache
def agent_source() -> bytes:
    """The exact bytes shipped to nodes: the deterministic zip of every node module."""
    members = {"__main__.py": _read("agent"), **{f"{m}.py": _read(m) for m in NODE_MODULES}}
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


def streamed_sources() -> dict[str, str]:
    """Module name -> source of what a read-only run streams (every module but transfer)."""
    return {m: _read(m).decode("utf-8") for m in NODE_MODULES if m not in STREAM_EXCLUDED}


@functools.cache
def agent_stream() -> bytes:
    """`streamed_sources` as the bytes the stream bootstrap reads (sorted JSON, UTF-8)."""
    return json.dumps(streamed_sources(), sort_keys=True).encode("utf-8")
