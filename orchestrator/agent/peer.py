"""Model bytes between nodes and from the Hub: ``fetch``, ``serve`` and ``serve_stop``.

The HTTP code lives in transfer.py and is imported on first use only (``load_transfer``), so
``facts`` never pays for it and a streamed read-only agent (which has no transfer.py) still
answers every read-only op.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH103, PTH108
# ruff: noqa: PTH110, PTH119
# ruff: noqa: PTH116, PTH118, PTH120, PTH123, PTH208
import contextlib
import errno
import importlib
import os
import re
import sys
import threading
import time

from .common import (
    RUN_TIMEOUT,
    AgentError,
    dump_json_atomic,
    expand,
    fields,
    json_file,
    orch_dir,
    string_map,
)
from .hashcache import HashCache, cached_sha256

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import IO, Any

    from .common import Request, Response


def load_transfer() -> Any:
    """The ``transfer`` module of this package (in the zip, or the source tree).

    Imported on first use only, so ``facts`` never pays for it and a streamed agent (which
    has no transfer.py) still answers every read-only op.
    """
    try:
        return importlib.import_module(".transfer", __package__)
    except ImportError:
        raise AgentError("this op needs the installed agent (transfer.py is not beside it); "
                         "it cannot run from a streamed, read-only agent") from None


SYNC_STATE = "sync"  # ~/.orch/sync: which run serves on which port, and stop requests


# `serve` and `fetch` write a blank line this often; a failed write means no controller.
HEARTBEAT_S = 2.0
HANGUP_EXIT = 75  # the status of a `fetch` that ended because its controller was gone


BIND_WAIT_S = 10.0  # how long `serve` waits for a previous run's server to free the port


STALE_STOP_S = 86400.0  # stop requests older than this are swept by the next `serve`


READ_TIMEOUT_S = 60.0  # a connection silent this long is cut and the fetch resumed on a new one


RUN_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def op_fetch(req: Request, _stdin: IO[bytes]) -> Response:
    """Download one file into place, resumably and verified (see transfer.py), then record
    its hash in the cache so the next ``facts`` reads none of its bytes.

    Header values (the Hub token, the per-run peer token) come only in this request, on
    stdin; transfer keeps them out of every message. A file the cache already vouches for is
    not fetched again (a retried apply). ``timeout`` bounds the whole fetch; ``read_timeout``
    how long one connection may stay silent before it is cut and the fetch resumed on a new
    one (a LAN peer that stops sending is given up on sooner than the Hub)."""
    path, size, sha256, url, git_sha1, headers, timeout, retries, backoff, read_timeout = fields(
        req,
        ("path", "size", "sha256", "url"),
        {"git_sha1": None, "headers": {}, "timeout": RUN_TIMEOUT, "retries": 8, "backoff": 0.5,
         "read_timeout": READ_TIMEOUT_S},
    )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise AgentError("size must be a non-negative int")
    if not isinstance(read_timeout, (int, float)) or isinstance(read_timeout, bool) \
            or not read_timeout > 0:
        raise AgentError("read_timeout must be a positive number of seconds")
    headers = string_map(headers, "headers")
    full = expand(str(path))
    cache = HashCache()
    if sha256 is not None and cached_sha256(cache, full) == sha256:
        return {"path": full, "size": size, "sha256": sha256, "skipped": True,
                "bytes_downloaded": 0, "bytes_resumed": 0, "requests": 0, "retries": 0,
                "mismatches": 0, "seconds": 0.0}
    transfer = load_transfer()
    limit = float(timeout)
    deadline = time.monotonic() + limit
    stop_watching = threading.Event()
    threading.Thread(target=watch_controller, args=(stop_watching,), daemon=True).start()

    def progress(have: int, total: int) -> None:
        if time.monotonic() > deadline:
            raise AgentError(f"{os.path.basename(full)}: not complete after {limit:g}s "
                             f"({have} of {total} bytes kept for the next run)")

    try:
        result = transfer.fetch(str(url), full, sha256=sha256, size=size, git_sha1=git_sha1,
                                headers=headers, retries=int(retries), backoff=float(backoff),
                                progress=progress, timeout=float(read_timeout))
    except transfer.TransferError as exc:  # its message names the file, never a header value
        raise AgentError(str(exc)) from None
    except ValueError as exc:
        raise AgentError(f"bad fetch request: {exc}") from None
    finally:
        stop_watching.set()
    cache.record(os.path.realpath(full), os.stat(full), result.sha256)
    cache.save()
    answer: Response = result.to_json()
    answer["skipped"] = False
    return answer


def watch_controller(stop: threading.Event) -> None:
    """End this process at once when its controller is gone.

    Why: a fetch runs on an SSH channel of its own. When the controller dies (killed, its
    machine lost), sshd closes the channel but nothing stops the process: it would go on
    downloading a 5 GB file for minutes that nobody will use, holding the partial's lock
    against the next run's fetch of the same file ("another fetch of this file is
    running"). Like ``serve``, it writes a blank line (whitespace before the JSON answer)
    every `HEARTBEAT_S`; once a write fails no one is listening, and the process exits
    without unwinding: the partial keeps the bytes written so far, which the next run
    re-hashes and continues with Range."""
    while not stop.wait(HEARTBEAT_S):
        if not heartbeat():
            os._exit(HANGUP_EXIT)


def heartbeat() -> bool:
    """Write one blank line to the controller; False once no one is reading (the channel
    closed). JSON allows whitespace before the answer, so the lines never corrupt it."""
    try:
        sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
    except OSError:
        return False
    return True


def sync_state(*parts: str) -> str:
    return os.path.join(orch_dir(), SYNC_STATE, *parts)


def touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "ab"):
        pass


def sweep_stale_stops(keep: str) -> None:
    """Stop requests for servers that had already ended stay behind; drop the old ones."""
    directory = sync_state()
    now = time.time()
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        try:
            if name.startswith("stop-") and full != keep and \
                    now - os.stat(full).st_mtime > STALE_STOP_S:
                os.unlink(full)
        except OSError:
            pass


def bind_peer_server(transfer: Any, bind: str, port: int, files: dict[str, str], token: str,
                     run_id: str, growing: dict[str, int]) -> Any:
    """Start the peer server; if the port is held by a server an earlier run left behind (its
    controller died), ask that server to stop and wait for the port."""
    record = sync_state(f"serve-{port}.json")
    deadline = time.monotonic() + BIND_WAIT_S
    asked = False
    while True:
        try:
            return transfer.serve_files(bind, port, files, token, growing)
        except ValueError as exc:
            raise AgentError(f"cannot serve: {exc}") from None
        except OSError as exc:
            failure = AgentError(f"cannot serve on {bind}:{port}: "
                                 f"{exc.strerror or type(exc).__name__}")
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise failure from None
        if not asked:
            try:
                previous = json_file(record, {})
            except ValueError:
                previous = {}
            other = previous.get("run_id") if isinstance(previous, dict) else None
            if not isinstance(other, str) or other == run_id or not RUN_ID.fullmatch(other):
                raise failure from None  # not a server orch left behind: waiting won't help
            touch(sync_state("stop-" + other))
            asked = True
        time.sleep(0.1)


def op_serve(req: Request, _stdin: IO[bytes]) -> Response:
    """Serve verified files to peers (transfer.serve_files) until told to stop.

    ``growing`` (``{url_path: size}``): the served files this node is itself fetching in
    this run, relayed from their partials while they arrive (see transfer.serve_files).
    Stops when ``serve_stop`` names this run, when ``timeout`` seconds have passed, or when
    the controller is gone (the heartbeat, a blank line on stdout every few seconds, fails).
    The token comes only in this request, on stdin, never in argv (which ``ps`` shows).
    Answers what was served."""
    files, bind, port, token, run_id, timeout, growing = fields(
        req, ("files", "bind", "port", "token", "run_id"), {"timeout": 86400, "growing": {}})
    files = string_map(files, "files")
    if not isinstance(growing, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for n in growing.values()) or not set(growing) <= set(files):
        raise AgentError("growing must map served URL paths to sizes")
    if not all(u.startswith("/") for u in files):
        raise AgentError("file URL paths must start with '/'")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise AgentError("port must be an int between 0 and 65535")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise AgentError("run_id must be 8 to 64 letters, digits, '-' or '_'")
    if not isinstance(token, str) or not isinstance(bind, str):
        raise AgentError("token and bind must be strings")
    transfer = load_transfer()
    stop = sync_state("stop-" + run_id)
    os.makedirs(sync_state(), mode=0o700, exist_ok=True)
    sweep_stale_stops(stop)
    started = time.monotonic()
    server = bind_peer_server(transfer, bind, port, {u: expand(p) for u, p in files.items()},
                              token, run_id, growing)
    record = sync_state(f"serve-{server.server_address[1]}.json")
    dump_json_atomic(record, {"run_id": run_id, "pid": os.getpid()})
    reason = None
    beat = started
    try:
        while reason is None:
            time.sleep(0.05)
            now = time.monotonic()
            if os.path.exists(stop):
                reason = "stopped"
            elif now - started > float(timeout):
                reason = "deadline"
            elif now - beat >= HEARTBEAT_S:
                beat = now
                if not heartbeat():
                    reason = "hangup"
    finally:
        server.close()
        try:
            if json_file(record, {}).get("run_id") == run_id:
                os.unlink(record)
        except (OSError, ValueError, AttributeError):
            pass
        with contextlib.suppress(OSError):
            os.unlink(stop)
    with server.lock:
        return {"reason": reason, "port": server.server_address[1],
                "requests": server.requests, "refused": server.refused,
                "relayed": server.relayed,
                "bytes_served": dict(sorted(server.bytes_served.items())),
                "seconds": round(time.monotonic() - started, 3)}


def op_serve_stop(req: Request, _stdin: IO[bytes]) -> Response:
    """Ask this run's ``serve`` to stop; it answers on its own channel within ~50 ms.

    Written whether or not the server has started yet: a server that starts later sees the
    request at once and stops, instead of serving until its deadline."""
    (run_id,) = fields(req, ("run_id",), {})
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise AgentError("run_id must be 8 to 64 letters, digits, '-' or '_'")
    touch(sync_state("stop-" + run_id))
    return {"changed": True}
