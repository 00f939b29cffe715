"""The managed record (``~/.orch/managed/<cluster>.json``): what orch put on this node.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH103
# ruff: noqa: PTH118, PTH120
import os
import re
from typing import IO, Any

from .common import AgentError, Request, Response, dump_json_atomic, fields, orch_dir


def record_path(cluster: Any) -> str:
    """One managed record per cluster: two clusters sharing a Mac never remove each other's."""
    if not isinstance(cluster, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cluster):
        raise AgentError(f"bad cluster name {cluster!r}")
    return os.path.join(orch_dir(), "managed", cluster + ".json")


def op_managed_write(req: Request, _stdin: IO[bytes]) -> Response:
    record, cluster = fields(req, ("record",), {"cluster": "default"})
    if not isinstance(record, dict):
        raise AgentError("record must be an object")
    path = record_path(cluster)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return {"changed": dump_json_atomic(path, record)}
