#!/usr/bin/env python3
"""orch agent: the only code orch runs on a node. This module is its entry point and op table.

Shipped by the controller as one zip of this package's node-side modules (this file is also
the zip's ``__main__.py``), cached on the node as ``~/.orch/agent/<sha256-prefix>.pyz``, which
the upload also unpacks beside it (``<sha256-prefix>/``) and compiles with the node's Python;
run from that directory's bytecode (RUN_SCRIPT's bootstrap in orchestrator/executor/agentcall.py
makes it the package and calls ``main``) for one call (OP) or for every call of a run over one
channel (``session``), or from the zip itself where no compiled directory is; protocol.py
describes both. Read-only runs that find no
cached agent stream the modules instead and import them from memory (see
orchestrator/executor/agentcall.py): nothing is written on the node.

Why stdlib only, Python >= 3.9: the node's Python is whatever macOS or the user installed; the
agent must never need the controller's packages. Why ops instead of shell snippets: argv lists
and JSON never pass through a shell, so no value is ever shell syntax, and ``facts`` gathers
everything a plan needs in one SSH round trip.

The modules, one concern each: common (request checking, paths, atomic files), hashcache,
facts, files (write/mkdir/remove/rmdir/read/prune/sizes/install_system), command (``run``),
launchd, lock, managed (the managed record), peer (fetch/serve; the HTTP code is transfer.py,
imported only by them), protocol (one-shot, session, batch), spawn (the facts call's probes,
without subprocess), jsonc (JSON through the C accelerator, without json's imports).

Every path in a request may start with ``~/``; it is expanded with ``$HOME`` on the node.
Requests are strict: an unknown key is an error, so controller/agent skew fails loudly.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # run as a file, or as the zip's __main__.py: become orch_agent
    import importlib
    import os
    import types

    _package = types.ModuleType("orch_agent")
    here = os.path.dirname(os.path.abspath(__file__))  # noqa: PTH100, PTH120 (3.9, no pathlib)
    _package.__path__ = [here]  # the source directory, or the zip
    sys.modules["orch_agent"] = _package
    sys.exit(importlib.import_module("orch_agent.agent").main(sys.argv))

# The package's own modules, imported only once it is a package (above). The test is __name__,
# not __package__: Python 3.9's zipimport leaves __package__ unset while a module runs.
from .common import AgentError
from .jsonc import dumps, loads
from .protocol import ProtocolError, answer, run_batch, serve_session

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import IO, Any

    from .common import Request, Response
    from .protocol import Op

__all__ = ["OPS", "main"]

# Where each op lives: (module, function). A module is imported at the first call of one of
# its ops, not at start: even from bytecode each import costs, and from the zip (zipimport
# keeps no bytecode: streamed or not yet compiled) it is compiled from source at every start;
# a no-op's session (facts, lock, unlock) needs neither files, command, launchd nor peer.
# Every op still goes through OPS.
OP_HOMES = {
    "facts": ("facts", "op_facts"),
    "install_system": ("files", "op_install_system"),
    "remove_system": ("files", "op_remove_system"),
    "lock_acquire": ("lock", "op_lock_acquire"),
    "lock_release": ("lock", "op_lock_release"),
    "read": ("files", "op_read"),
    "write": ("files", "op_write"),
    "mkdir": ("files", "op_mkdir"),
    "remove": ("files", "op_remove"),
    "rmdir": ("files", "op_rmdir"),
    "run": ("command", "op_run"),
    "managed_write": ("managed", "op_managed_write"),
    "launchd_bootstrap": ("launchd", "op_launchd_bootstrap"),
    "launchd_bootout": ("launchd", "op_launchd_bootout"),
    "launchd_kickstart": ("launchd", "op_launchd_kickstart"),
    "fetch": ("peer", "op_fetch"),
    "serve": ("peer", "op_serve"),
    "serve_stop": ("peer", "op_serve_stop"),
    "prune": ("files", "op_prune"),
    "sizes": ("files", "op_sizes"),
}
PACKAGE = __name__.rpartition(".")[0]  # orch_agent on a node, orchestrator.agent here


def sibling(module: str) -> Any:
    """importlib.import_module, without importing importlib (a no-op's session has no use
    for it otherwise)."""
    name = f"{PACKAGE}.{module}"
    __import__(name)
    return sys.modules[name]


def lazy_op(module: str, function: str) -> Op:
    """An op that imports its module at its first call."""

    def op(req: Request, stdin: IO[bytes]) -> Response:
        result: Response = getattr(sibling(module), function)(req, stdin)
        return result

    op.__name__ = op.__qualname__ = function
    return op


def op_batch(req: Request, stdin: IO[bytes]) -> Response:
    """Run several ops in order, stopping at the first failure (see protocol.run_batch)."""
    return run_batch(OPS, req, stdin)


OPS: dict[str, Op] = {
    "batch": op_batch,
    **{name: lazy_op(*home) for name, home in OP_HOMES.items()},
}


def emit(value: Response) -> None:
    sys.stdout.buffer.write(dumps(value).encode("utf-8") + b"\n")  # ASCII
    sys.stdout.buffer.flush()


def main(argv: list[str]) -> int:
    """``agent.py session`` serves a session; ``agent.py OP`` answers one request."""
    if len(argv) == 2 and argv[1] == "session":
        return serve_session(OPS)
    if len(argv) != 2 or argv[1] not in OPS:
        emit({"error": "usage: agent.py OP (one of {})".format(", ".join(sorted(OPS)))})
        return 2
    stdin = sys.stdin.buffer
    try:
        line = stdin.readline()
        req = loads(line.decode("utf-8")) if line.strip() else {}
        if not isinstance(req, dict):
            raise AgentError("the request must be a JSON object")
        response = answer(OPS, argv[1], req, stdin)
    except (AgentError, ProtocolError) as exc:
        response = {"error": str(exc)}
    except Exception as exc:  # a request line that is not JSON: report it, never a traceback
        response = {"error": f"{type(exc).__name__}: {exc}"}
    emit(response)
    return 1 if "error" in response else 0
