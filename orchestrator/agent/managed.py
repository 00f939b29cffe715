"""The managed record (``~/<runtime.dir>/managed/<cluster>.json``): what orch put on this node.

It lives under the cluster's own ``runtime.dir`` (the request's ``dir``). What stays under
``~/.orch`` whatever a cluster says is machine-wide and deliberately shared: the agent's own
cache (content-addressed), the hash cache (a cache of file hashes) and the peer servers' state
(keyed by port, which is the machine's).
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH103, PTH111
# ruff: noqa: PTH118, PTH120
import os

from .common import AgentError, dump_json_atomic, fields, orch_dir

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import IO, Any

    from .common import Request, Response


# [A-Za-z0-9][A-Za-z0-9._-]* without re, which a no-op session otherwise never imports.
NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def state_dir(directory: Any) -> str:
    """``~/<directory>``: a cluster's runtime.dir, relative to HOME and inside it."""
    if directory is None:
        return orch_dir()
    parts = str(directory).strip("/").split("/") if isinstance(directory, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts) or str(directory).startswith("/"):
        raise AgentError(f"bad runtime dir {directory!r}: expected a path relative to HOME")
    return os.path.join(os.path.expanduser("~"), *parts)


def record_path(cluster: Any, directory: Any = None) -> str:
    """One managed record per cluster: two clusters sharing a Mac never remove each other's."""
    if not isinstance(cluster, str) or not cluster or cluster[0] not in NAME_START \
            or not all(c in NAME_START or c in "._-" for c in cluster):
        raise AgentError(f"bad cluster name {cluster!r}")
    return os.path.join(state_dir(directory), "managed", cluster + ".json")


def op_managed_write(req: Request, _stdin: IO[bytes]) -> Response:
    record, cluster, directory = fields(req, ("record",), {"cluster": "default", "dir": None})
    if not isinstance(record, dict):
        raise AgentError("record must be an object")
    path = record_path(cluster, directory)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return {"changed": dump_json_atomic(path, record)}
