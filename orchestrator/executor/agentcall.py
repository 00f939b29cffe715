"""Calling the agent over any `run`: ship it on demand, run an op, turn its answer into data.

Why optimistic: the agent is cached on the node under its content hash, so the run script simply
tries it. Only when the file is absent (a distinctive exit status) is it uploaded, verified and
retried. A converged host therefore pays exactly one round trip per agent call. The scripts are
constants and every variable part travels as a positional argument or on stdin, so no value ever
becomes shell syntax.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog

from orchestrator.agent import (
    AGENT_SUFFIX,
    agent_file_id,
    agent_script,
    agent_source,
    agent_source_hash,
)
from orchestrator.errors import ActionFailed

from .base import CommandResult

__all__ = ["AGENT_MISSING", "RUN_SCRIPT", "UPLOAD_SCRIPT", "agent_timeout", "call_agent"]

log = structlog.get_logger(__name__)

AGENT_GRACE = 30.0  # seconds the controller waits beyond an agent-side timeout
AGENT_MISSING = 97  # the run script's "not cached here" status; the agent itself never uses it

# sh -c RUN_SCRIPT sh <file id> <op> <python>. Python runs isolated (-I): the node's PYTHONPATH,
# PYTHONHOME or user site-packages can never change what the agent imports.
RUN_SCRIPT = (
    f'a="${{HOME:?}}/.orch/agent/$1{AGENT_SUFFIX}"; '
    'if [ -f "$a" ]; then exec "$3" -I "$a" "$2"; fi; '
    f"exit {AGENT_MISSING}"
)

# <python> -I -c UPLOAD_SCRIPT <sha256> <file id>, the agent's zip on stdin. Verified before the
# atomic rename, so a cut connection can never leave a truncated agent in the cache.
UPLOAD_SCRIPT = f"""\
import hashlib, os, sys, tempfile
data = sys.stdin.buffer.read()
if hashlib.sha256(data).hexdigest() != sys.argv[1]:
    sys.stderr.write("orch agent upload: sha256 mismatch\\n")
    sys.exit(98)
d = os.path.join(os.path.expanduser("~"), ".orch", "agent")
os.makedirs(d, mode=0o700, exist_ok=True)
fd, tmp = tempfile.mkstemp(dir=d, prefix=".upload-")
with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.chmod(tmp, 0o600)
os.replace(tmp, os.path.join(d, sys.argv[2] + "{AGENT_SUFFIX}"))
"""

# <python> -I -c STREAM_SCRIPT <n> <op> <version>, agent.py's n bytes then the request on stdin:
# runs the agent without writing it to the host, for read-only runs (plan, apply --check). Only
# agent.py travels (not the zip): the ops a read-only run uses never import transfer. <version>
# is the zip's hash, so facts report the same agent version whichever way the agent ran.
STREAM_SCRIPT = """\
import sys
_, size, op, version = sys.argv
source = sys.stdin.buffer.read(int(size))
sys.argv = ["orch-agent", op]
namespace = {"__name__": "__main__", "__file__": "<orch-agent>", "ORCH_AGENT_VERSION": version}
exec(compile(source, "orch-agent", "exec"), namespace)
"""

Runner = Callable[..., Awaitable[CommandResult]]


def _tail(data: bytes, limit: int = 2000) -> str:
    return data[-limit:].decode("utf-8", "replace").strip()


async def call_agent(
    host: str,
    run: Runner,
    op: str,
    request: Mapping[str, Any],
    *,
    stdin: bytes | None,
    python: str,
    command_timeout: float,
    install: bool = True,
) -> dict[str, Any]:
    """Run agent `op` through `run` (a Connection.run), uploading the agent once if needed.

    With `install` False the agent is never written to the host: when it is not cached there
    already, its source is streamed on stdin for this one call (read-only runs).
    """
    timeout = agent_timeout(request, command_timeout)
    payload = json.dumps(dict(request), separators=(",", ":")).encode() + b"\n" + (stdin or b"")
    argv: Sequence[str] = ["sh", "-c", RUN_SCRIPT, "sh", agent_file_id(), op, python]
    result = await run(argv, stdin=payload, timeout=timeout)
    if result.exit_status == AGENT_MISSING and install:
        await _upload(host, run, python)
        result = await run(argv, stdin=payload, timeout=timeout)
    elif result.exit_status == AGENT_MISSING:
        source = agent_script()
        stream = [python, "-I", "-c", STREAM_SCRIPT, str(len(source)), op, agent_source_hash()]
        result = await run(stream, stdin=source + payload, timeout=timeout)
    return _decode(host, op, python, result)


def agent_timeout(request: Mapping[str, Any], command_timeout: float) -> float:
    """How long the controller waits for one agent call.

    An op with its own `timeout` (run, guards, launchd waits) enforces it on the node and answers
    with a proper result; the controller waits that long plus a grace period, so the node's
    answer, not the controller's cut, is what the user sees.
    """
    own = request.get("timeout")
    own_seconds = float(own) if isinstance(own, int | float) and not isinstance(own, bool) else 0.0
    return max(command_timeout, own_seconds) + AGENT_GRACE


async def _upload(host: str, run: Runner, python: str) -> None:
    log.info("agent_upload", host=host, agent=agent_file_id())
    argv = [python, "-I", "-c", UPLOAD_SCRIPT, agent_source_hash(), agent_file_id()]
    result = await run(argv, stdin=agent_source())
    if result.exit_status == 127:
        raise ActionFailed(host, _no_python(python))
    if result.exit_status != 0:
        raise ActionFailed(
            host,
            f"could not install the orch agent (exit {result.exit_status}): {_tail(result.stderr)}",
        )


def _no_python(python: str) -> str:
    return (
        f"cannot run the orch agent: {python!r} was not found on the host's PATH "
        "(install Python 3.9+ or set agent_python to its full path)"
    )


def _decode(host: str, op: str, python: str, result: CommandResult) -> dict[str, Any]:
    """The agent's JSON answer, or ActionFailed saying what went wrong and where."""
    if result.exit_status == 127:
        raise ActionFailed(host, _no_python(python))
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ActionFailed(
            host,
            f"agent {op} exited {result.exit_status} without a JSON answer: "
            f"{_tail(result.stderr) or _tail(result.stdout)}",
        )
    if result.exit_status != 0 or "error" in answer:
        raise ActionFailed(host, f"agent {op} failed: {answer.get('error', answer)}")
    return answer
