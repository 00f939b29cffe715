"""An `agent_python` for tests: runs the real agent, and sees each lock op as the host does.

Since the agent serves a whole run on one channel (framed requests on stdin), a wrapper can no
longer tell ops apart by its argv; this one reads the frames as they pass. Before forwarding a
``lock_acquire``/``lock_release`` request (or a batch that starts with one: an apply's lock and
facts) it waits (``--delay`` seconds, or ``random``: 0-0.25 s) and, for an acquire, touches
``--touch`` under HOME; it logs ``HOME op start end`` to ``--log`` when the answer comes back.
One-shot calls (the op in argv) are handled the same way.

Usage (as the first line of a shell wrapper): ``agent_proxy.py [options] -- <python argv>``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from orchestrator.agent.protocol import BODY as RESPONSE
from orchestrator.agent.protocol import HEADER as REQUEST
from orchestrator.agent.protocol import read_exact

LOCK_OPS = ("lock_acquire", "lock_release")


def lock_op(frame: dict[str, object]) -> str:
    """The frame's op; a batch that starts with a lock op (an apply's lock and facts travel
    together) counts as that lock op."""
    op = str(frame.get("op"))
    request = frame.get("request")
    if op == "batch" and isinstance(request, dict):
        steps = request.get("steps")
        if isinstance(steps, list) and steps and isinstance(steps[0], dict) \
                and steps[0].get("op") in LOCK_OPS:
            return str(steps[0]["op"])
    return op


class Watch:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pending: tuple[str, float] | None = None

    def before(self, op: str) -> None:
        if op not in LOCK_OPS:
            return
        if op == "lock_acquire" and self.args.touch:
            Path(os.environ["HOME"], self.args.touch).touch()
        delay = random.uniform(0, 0.25) if self.args.delay == "random" else float(self.args.delay)
        start = time.time()
        time.sleep(delay)
        self.pending = (op, start)

    def after(self) -> None:
        if self.pending is None or not self.args.log:
            self.pending = None
            return
        op, start = self.pending
        self.pending = None
        with open(self.args.log, "a") as f:
            f.write(f"{os.environ['HOME']} {op} {start} {time.time()}\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", default="0")
    parser.add_argument("--log", default="")
    parser.add_argument("--touch", default="")
    parser.add_argument("python", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.python if a != "--"]
    watch = Watch(args)
    if argv[-1] != "session":  # one-shot: the op is the last argument
        watch.before(argv[-1])
        code = subprocess.call(["python3", *argv[1:]])
        watch.after()
        return code
    child = subprocess.Popen(["python3", *argv[1:]], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def answers() -> None:  # child -> controller, frame by frame
        assert child.stdout is not None
        while head := read_exact(child.stdout, RESPONSE.size):
            (size,) = RESPONSE.unpack(head)
            body = read_exact(child.stdout, size)
            out.write(head + body)
            out.flush()
            if b'"hello"' not in body[:40]:
                watch.after()

    reader = threading.Thread(target=answers, daemon=True)
    reader.start()
    while head := read_exact(inp, REQUEST.size):
        header_size, payload_size = REQUEST.unpack(head)
        raw = read_exact(inp, header_size)
        watch.before(lock_op(json.loads(raw)))
        child.stdin.write(head + raw + read_exact(inp, payload_size))
        child.stdin.flush()
    child.stdin.close()
    code = child.wait()
    reader.join(timeout=5)
    return code


if __name__ == "__main__":
    sys.exit(main())
