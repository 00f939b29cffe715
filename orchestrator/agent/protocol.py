"""How the controller speaks to the agent: one-shot answers, framed sessions, and ``batch``.

One-shot (``agent.py OP``): the request is the first line of stdin and the op's payload (the
bytes ``write`` stores) follows it; the agent prints one JSON object and exits 0, or prints
``{"error": ...}`` and exits 1. ``serve`` and ``fetch`` always run this way, on a channel of
their own (they last minutes, and ``serve`` heartbeats on stdout).

Session (``agent.py session``): one interpreter answers every other call of a run, so a host
pays one exec channel and one Python start per run instead of one per call (Mitogen's model
for Ansible). Both directions are length-prefixed frames, so payload bytes travel as they
are, never JSON-encoded::

    request  = ">II" (header length, payload length) + header + payload
               header = JSON {"op": str, "request": {...}}; payload = the op's stdin bytes
    response = ">I" (body length) + body; body = JSON: the op's answer, or {"error": ...}

The agent speaks first: a hello frame ``{"hello": "orch-agent", "version": ..., "pid": ...}``
tells the controller the agent really runs (a shell that found no cached agent exits before
it). Requests are answered strictly in order. A clean end of stdin between frames ends the
session (exit 0); one inside a frame means the controller went away mid-request (exit 1).
Why fds 0 and 1 are moved aside: the frames own the channel's stdin and stdout, so a stray
``print`` or a child process that inherited them must not read or write the stream; fd 0
becomes /dev/null and fd 1 goes to stderr for the rest of the session.

``batch`` runs a list of steps in order and stops at the first failure; it is an op like any
other, so it works one-shot and in a session alike. In a session it also stops between steps
when the controller has gone (its end of the channel closed: a killed run), so a batch cut
short leaves the host as a run killed between two single calls would, not finished behind
the user's back.
"""

from __future__ import annotations

import io
import os
import select
import struct
import sys

from .common import CHUNK, AgentError, fields, own_version
from .jsonc import dumps, loads

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

    from .common import Request, Response

    Op = Callable[[Request, IO[bytes]], Response]

HEADER = struct.Struct(">II")  # a request frame: header length, payload length
BODY = struct.Struct(">I")  # a response frame: body length
MAX_HEADER = 64 << 20  # a request header larger than this is a broken stream, not a request
NOT_IN_SESSION = ("serve",)  # runs for a whole apply and heartbeats on stdout: its own channel
NOT_IN_BATCH = ("batch", "serve")


def _always() -> bool:
    return True


# Whether the controller still waits for the answer; the session replaces it (a one-shot call's
# stdin is only its payload, closed on purpose, so there is nothing to watch).
controller_waits: Callable[[], bool] = _always


def _watching(stream: io.BufferedReader[io.FileIO]) -> Callable[[], bool]:
    """During a request the controller sends nothing (it waits for the answer), so a request
    stream that turns readable and yields end-of-file means the controller is gone."""

    def waits() -> bool:
        ready, _, _ = select.select([stream.fileno()], [], [], 0)
        return not ready or bool(stream.peek(1))

    return waits


class ProtocolError(Exception):
    """The byte stream itself is broken (truncated or oversized frame): the session ends."""


class Bounded(io.RawIOBase):
    """At most `size` bytes of `stream`: one frame's payload, read without copying it whole."""

    def __init__(self, stream: IO[bytes], size: int) -> None:
        super().__init__()
        self.stream = stream
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.left)
        if want == 0:
            return 0
        data = self.stream.read(want)
        if not data:
            raise ProtocolError("the stream ended inside a payload")
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


def payload(stream: IO[bytes], size: int) -> IO[bytes]:
    """A file-like view of the next `size` bytes, as an op's ``stdin``."""
    return io.BufferedReader(Bounded(stream, size), CHUNK)


def drain(reader: IO[bytes]) -> None:
    """Skip what an op left unread of its payload, so the next frame starts where it should."""
    while reader.read(CHUNK):
        pass


def answer(ops: dict[str, Op], op: str, req: Any, stdin: IO[bytes]) -> Response:
    """Run one op; every failure becomes ``{"error": ...}`` (never a bare traceback)."""
    try:
        if op not in ops:
            raise AgentError("unknown op {!r} (one of {})".format(op, ", ".join(sorted(ops))))
        if not isinstance(req, dict):
            raise AgentError("the request must be a JSON object")
        return ops[op](req, stdin)
    except ProtocolError:
        raise
    except AgentError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # report, never a traceback the controller cannot parse
        import traceback  # only here: it imports linecache, tokenize, ... at every start

        trace = traceback.format_exc()[-4000:]
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": trace}


def run_batch(ops: dict[str, Op], req: Request, stdin: IO[bytes]) -> Response:
    """Run ``steps`` in order, stopping at the first that fails.

    Request: ``{"steps": [{"op": str, "request": {...}, "stdin": n}, ...]}``; the steps'
    payloads follow on stdin, concatenated in order (``stdin`` is each one's byte count).
    Answer: ``{"steps": [answer, ...], "failed": index | null}``: the answers of the steps that
    ran, the last one being the failure's ``{"error": ...}`` when ``failed`` is set. The batch
    is checked whole before any step runs, so a malformed batch changes nothing.
    """
    (steps,) = fields(req, ("steps",), {})
    if not isinstance(steps, list):
        raise AgentError("steps must be a list")
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise AgentError(f"step {i} must be an object")
        op, request, size = fields(step, ("op", "request"), {"stdin": 0})
        if op not in ops or op in NOT_IN_BATCH:
            raise AgentError(f"step {i}: op {op!r} cannot run in a batch")
        if not isinstance(request, dict):
            raise AgentError(f"step {i}: the request must be a JSON object")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise AgentError(f"step {i}: stdin must be a byte count")
    # Every payload is read before the first step runs: the frame is then wholly consumed, so
    # anything readable on the stream while the steps run can only be the controller leaving.
    blobs = []
    for i, step in enumerate(steps):
        blob = read_exact(stdin, step.get("stdin", 0))
        if len(blob) < step.get("stdin", 0):
            raise AgentError(f"step {i}: stdin ended before its {step['stdin']} bytes")
        blobs.append(blob)
    answers: list[Response] = []
    for i, step in enumerate(steps):
        if i and not controller_waits():
            answers.append({"error": "the controller went away; the batch stopped here"})
            return {"steps": answers, "failed": i}
        result = answer(ops, step["op"], step["request"], io.BytesIO(blobs[i]))
        answers.append(result)
        if "error" in result:
            return {"steps": answers, "failed": i}
    return {"steps": answers, "failed": None}


def read_exact(stream: IO[bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def write_frame(out: IO[bytes], value: Response) -> None:
    # jsonc.dumps escapes every non-ASCII character, so this is ASCII; "utf-8" is the codec
    # the interpreter has loaded already ("ascii" would import encodings.ascii at every start).
    body = dumps(value).encode("utf-8")
    out.write(BODY.pack(len(body)) + body)
    out.flush()


def serve_session(ops: dict[str, Op]) -> int:
    """Answer framed requests on fd 0 with framed responses on fd 1 until fd 0 ends."""
    global controller_waits
    inp = io.BufferedReader(io.FileIO(os.dup(0), "rb"), CHUNK)
    controller_waits = _watching(inp)
    out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout.flush()
    try:
        write_frame(out, {"hello": "orch-agent", "version": own_version(), "pid": os.getpid()})
        while True:
            head = read_exact(inp, HEADER.size)
            if not head:
                return 0
            if len(head) < HEADER.size:
                raise ProtocolError("the stream ended inside a frame header")
            header_size, payload_size = HEADER.unpack(head)
            if header_size > MAX_HEADER:
                raise ProtocolError(f"a request header of {header_size} bytes")
            raw = read_exact(inp, header_size)
            if len(raw) < header_size:
                raise ProtocolError("the stream ended inside a request header")
            reader = payload(inp, payload_size)
            try:
                header = loads(raw.decode("utf-8"))
                op, req = header["op"], header["request"]
            except (ValueError, KeyError, TypeError):
                result: Response = {"error": "a request frame must hold {op, request}"}
            else:
                if op in NOT_IN_SESSION:
                    result = {"error": f"{op} runs on a channel of its own, not in a session"}
                else:
                    result = answer(ops, op, req, reader)
            drain(reader)
            write_frame(out, result)
    except ProtocolError as exc:
        sys.stderr.write(f"orch agent session: {exc}\n")
        return 1
    except BrokenPipeError:  # the controller went away; nobody is left to answer
        return 1
