"""Calling the agent over any `run`: ship it on demand, run an op, turn its answer into data.

This is the one-shot path (one exec channel per call): ``serve`` and ``fetch`` always take it
(see session.py for why); every other op goes through the connection's `AgentSession`, which
starts the agent with the same scripts.

Why optimistic: the agent is cached on the node under its content hash, so the run script
simply tries it. Only when the file is absent (a distinctive exit status) is it uploaded,
verified and retried (or, for a read-only run, streamed). A converged host therefore pays one
round trip per call. The scripts are constants and every variable part travels as a
positional argument or on stdin, so no value ever becomes shell syntax.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog

from orchestrator.agent import (
    AGENT_SUFFIX,
    agent_file_id,
    agent_source,
    agent_source_hash,
    agent_stream,
)
from orchestrator.errors import ActionFailed, NoAgentPython

from .base import CommandResult

__all__ = [
    "AGENT_MISSING",
    "ONE_SHOT_OPS",
    "RUN_SCRIPT",
    "STREAM_SCRIPT",
    "UPLOAD_SCRIPT",
    "agent_timeout",
    "call_agent",
    "decode_answer",
    "no_python",
    "python_failure",
    "stream_argv",
    "upload_agent",
]

log = structlog.get_logger(__name__)

AGENT_GRACE = 30.0  # seconds the controller waits beyond an agent-side timeout
AGENT_MISSING = 97  # the run script's "not cached here" status; the agent itself never uses it

# sh -c RUN_SCRIPT sh <file id> <op> <python>. Python runs isolated (-I): the node's PYTHONPATH,
# PYTHONHOME or user site-packages can never change what the agent imports. -S skips `site`
# as well: the agent is stdlib only, so site-packages and their .pth files are of no use to
# it, and processing them was ~13 of the ~20 ms of CPU an interpreter start costs here.
# The zip (<id>.pyz) is what makes the agent cached; the directory <id>/ beside it is the same
# modules unpacked and compiled by the node's Python at upload (UPLOAD_SCRIPT), run in its
# place when present: zipimport keeps no bytecode, so from the zip every module is compiled
# at every start. -B: a run never writes bytecode (a read-only run writes nothing on a node;
# an interpreter other than the one that compiled the directory compiles in memory instead).
# The directory is started by DIR_BOOTSTRAP (-c), not as `python3 <dir>`, which runs
# <dir>/__main__.py through runpy (runpy, importlib.util, contextlib: ~2 ms of CPU), nor as
# `python3 <dir>/__main__.py`, a script, which is compiled from source at every start (~2 ms):
# the bootstrap makes <dir> the package orch_agent, whose modules then load as bytecode.
DIR_BOOTSTRAP = (
    'import sys; p = type(sys)("orch_agent"); p.__path__ = [sys.argv[1]]; '
    'sys.modules["orch_agent"] = p; from orch_agent.agent import main; '
    "sys.exit(main(sys.argv[1:]))"
)
assert "'" not in DIR_BOOTSTRAP  # it travels single-quoted in RUN_SCRIPT: sh reads it literally
RUN_SCRIPT = (
    'a="${HOME:?}/.orch/agent/$1"; '
    f'if [ -f "$a{AGENT_SUFFIX}" ]; then '
    f"""if [ -f "$a/__main__.py" ]; then exec "$3" -I -S -B -c '{DIR_BOOTSTRAP}' "$a" "$2"; fi; """
    f'exec "$3" -I -S "$a{AGENT_SUFFIX}" "$2"; fi; '
    f"exit {AGENT_MISSING}"
)

# <python> -I -S -c UPLOAD_SCRIPT <sha256> <file id>, the agent's zip on stdin. Verified before the
# atomic rename, so a cut connection can never leave a truncated agent in the cache. Then the
# zip's members are unpacked beside it and compiled by this same interpreter (the one that
# runs the agent), and that directory is renamed into place whole: a run finds either no
# directory (and runs the zip) or a complete one. Compiling is best effort: the zip suffices.
# The directory also keeps the verified sha256 (VERSION), which the agent reports as its
# version instead of hashing the zip at every start (hashlib alone is ~3 ms to import).
# An upload killed half way leaves its temporary file or directory behind: each upload removes
# those at least STALE_UPLOAD seconds old (a younger one may be another run's, in progress).
STALE_UPLOAD = 3600
UPLOAD_SCRIPT = f"""\
import hashlib, os, shutil, sys, tempfile, time
data = sys.stdin.buffer.read()
if hashlib.sha256(data).hexdigest() != sys.argv[1]:
    sys.stderr.write("orch agent upload: sha256 mismatch\\n")
    sys.exit(98)
d = os.path.join(os.path.expanduser("~"), ".orch", "agent")
os.makedirs(d, mode=0o700, exist_ok=True)
for name in os.listdir(d):
    old = os.path.join(d, name)
    try:
        if name.startswith((".upload-", ".unpack-")) and \\
                time.time() - os.lstat(old).st_mtime >= {STALE_UPLOAD}:
            shutil.rmtree(old) if os.path.isdir(old) else os.unlink(old)
    except OSError:
        pass
fd, tmp = tempfile.mkstemp(dir=d, prefix=".upload-")
with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.chmod(tmp, 0o600)
zipped = os.path.join(d, sys.argv[2] + "{AGENT_SUFFIX}")
os.replace(tmp, zipped)
final = os.path.join(d, sys.argv[2])
if not os.path.isdir(final):
    import py_compile, zipfile
    unpack = tempfile.mkdtemp(dir=d, prefix=".unpack-")
    try:
        with zipfile.ZipFile(zipped) as z:
            for name in z.namelist():
                if "/" in name or not name.endswith(".py"):
                    raise ValueError(name)
                with open(os.path.join(unpack, name), "wb") as f:
                    f.write(z.read(name))
        for name in os.listdir(unpack):
            py_compile.compile(os.path.join(unpack, name), dfile=os.path.join(final, name),
                               doraise=True)
        with open(os.path.join(unpack, "VERSION"), "w") as f:
            f.write(sys.argv[1] + "\\n")
        os.rename(unpack, final)
    except (OSError, ValueError, py_compile.PyCompileError) as exc:
        sys.stderr.write("orch agent upload: not compiled (%s); the zip runs\\n" % (exc,))
        shutil.rmtree(unpack, ignore_errors=True)
"""

# <python> -I -S -c STREAM_SCRIPT <n> <version> <op>, then on stdin n bytes of JSON {module: source}
# (orchestrator.agent.agent_stream) and after them what the op itself reads. It runs the agent
# without writing anything on the host, for read-only runs (plan, apply --check): the modules
# are imported from memory by a meta-path finder as the package orch_agent, the same package
# the cached zip becomes. transfer.py is not streamed (only fetch and serve need it). <version>
# is the zip's hash, so facts report the same agent version whichever way the agent ran. The
# sources are read with os.read so no buffered read-ahead swallows the bytes after them.
STREAM_SCRIPT = """\
import importlib, importlib.abc, importlib.util, json, os, sys, types
size, version, op = int(sys.argv[1]), sys.argv[2], sys.argv[3]
blob = bytearray()
while len(blob) < size:
    chunk = os.read(0, size - len(blob))
    if not chunk:
        sys.exit("orch agent: the streamed sources were cut short")
    blob += chunk
sources = json.loads(bytes(blob).decode("utf-8"))

class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        head, _, tail = name.partition(".")
        if head == "orch_agent" and tail in sources:
            return importlib.util.spec_from_loader(name, self, origin="<orch-agent>/" + tail)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        tail = module.__name__.partition(".")[2]
        code = compile(sources[tail], "<orch-agent>/" + tail + ".py", "exec", dont_inherit=True)
        exec(code, module.__dict__)

package = types.ModuleType("orch_agent")
package.__path__ = []
package.STREAMED_VERSION = version
sys.modules["orch_agent"] = package
sys.meta_path.insert(0, Finder())
sys.exit(importlib.import_module("orch_agent.agent").main(["orch-agent", op]))
"""

# Ops that never run in a session: `serve` lasts the whole apply and heartbeats on stdout, and
# `fetch` downloads for minutes; on channels of their own they cannot hold up other calls.
ONE_SHOT_OPS = frozenset({"fetch", "serve"})

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
        await upload_agent(host, run, python)
        result = await run(argv, stdin=payload, timeout=timeout)
    elif result.exit_status == AGENT_MISSING:
        result = await run(stream_argv(python, op), stdin=agent_stream() + payload, timeout=timeout)
    return _decode(host, op, python, result)


def stream_argv(python: str, op: str) -> list[str]:
    """The argv that runs `op` from streamed sources (`agent_stream()` first on stdin)."""
    return [python, "-I", "-S", "-c", STREAM_SCRIPT, str(len(agent_stream())),
            agent_source_hash(), op]


def agent_timeout(request: Mapping[str, Any], command_timeout: float) -> float:
    """How long the controller waits for one agent call.

    An op with its own `timeout` (run, guards, launchd waits) enforces it on the node and answers
    with a proper result; the controller waits that long plus a grace period, so the node's
    answer, not the controller's cut, is what the user sees.
    """
    own = request.get("timeout")
    own_seconds = float(own) if isinstance(own, int | float) and not isinstance(own, bool) else 0.0
    return max(command_timeout, own_seconds) + AGENT_GRACE


async def upload_agent(host: str, run: Runner, python: str) -> None:
    """Install the agent's zip in the host's cache (verified, atomic); ActionFailed if not."""
    log.info("agent_upload", host=host, agent=agent_file_id())
    argv = [python, "-I", "-S", "-c", UPLOAD_SCRIPT, agent_source_hash(), agent_file_id()]
    result = await run(argv, stdin=agent_source())
    missing = python_failure(host, python, result.exit_status, result.stderr)
    if missing is not None:
        raise missing
    if result.exit_status != 0:
        raise ActionFailed(
            host,
            f"could not install the orch agent (exit {result.exit_status}): {_tail(result.stderr)}",
        )


def no_python(python: str) -> str:
    """The message for exit status 127: the node has no such interpreter."""
    return (
        f"cannot run the orch agent: {python!r} was not found on the host's PATH "
        "(install Python 3.9+ or set agent_python to its full path)"
    )


# What the Command Line Tools' stub (a stock Mac's /usr/bin/python3 without them) prints.
CLT_STUB_NOTE = b"xcode-select: note: No developer tools were found"


def python_failure(host: str, python: str, status: int | None,
                   stderr: bytes) -> NoAgentPython | None:
    """NoAgentPython when `python` could not run the agent at all: not found (127), or the
    Command Line Tools' stub, which exits 1 asking for their installation."""
    if status == 127:
        return NoAgentPython(host, no_python(python))
    if status == 1 and CLT_STUB_NOTE in stderr:
        return NoAgentPython(host, (
            f"{python!r} is the Command Line Tools stub (the Command Line Tools are not "
            "installed), so there is no Python to run orch's agent, and the venv needs "
            "Python >= 3.11. Fix: install the Command Line Tools (`xcode-select --install` "
            "at the Mac) for the agent's python3, then plan again: orch names the Python the "
            "venv still needs (`brew install python@3.12`)"))
    return None


def _decode(host: str, op: str, python: str, result: CommandResult) -> dict[str, Any]:
    """The agent's JSON answer, or ActionFailed saying what went wrong and where."""
    missing = python_failure(host, python, result.exit_status, result.stderr)
    if missing is not None:
        raise missing
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
    if result.exit_status != 0:
        raise ActionFailed(host, f"agent {op} failed: {answer.get('error', answer)}")
    return decode_answer(host, op, answer)


def decode_answer(host: str, op: str, answer: dict[str, Any]) -> dict[str, Any]:
    """The answer itself, or ActionFailed with the agent's message (the same either path)."""
    if "error" in answer:
        raise ActionFailed(host, f"agent {op} failed: {answer['error']}")
    return answer
