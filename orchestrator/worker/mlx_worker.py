#!/usr/bin/env python3
"""orch's MLX worker: one rank of a distributed ``mlx_lm.server``, pipeline (with orch's layer
split) or tensor-parallel, over MLX's ring or jaccl (RDMA) backend.

orch copies this single file to each node (like a rendered config) and launchd runs it as::

    MLX_RANK=<r> MLX_HOSTFILE=<hostfile.json> <venv>/bin/python mlx_worker.py <worker.json>

(for the jaccl backends, ``MLX_IBV_DEVICES=<devices.json> MLX_JACCL_COORDINATOR=<ip:port>``
[``MLX_JACCL_RING=1``] instead of ``MLX_HOSTFILE``, as ``mlx.launch --backend jaccl`` sets them).

Why a script of its own: the nodes have Python, mlx and mlx-lm, never orch; and mlx-lm's CLI
cannot take an uneven layer split, which a cluster of unequal Macs needs. It imports only the
standard library, mlx and mlx_lm, and runs on any Python mlx-lm runs on (>= 3.11).

It does, in this order, and refuses to go on (exit code below, reason on stderr) at any failure:

1. reads the config (unknown keys are errors)::

       {"model_dir": "/abs/path", "split": [layers per rank, rank 0 first],
        "host": "127.0.0.1", "port": 8080, "expected_world_size": 3,
        "files": {"relative/path": "<sha256>" or {"sha256": "<hex>", "size": <bytes>}},
        "status_path": "/abs/status.json",   optional; default <model_dir>/../worker-status-<r>.json
        "server_args": ["--log-level", "INFO"],  optional; appended to the server's command line
        "parallelism": "pipeline" | "tensor",   optional, default pipeline; tensor: every rank
                                                holds 1/N of every layer, ``split`` is the
                                                layer count per rank ([L, L, ...])
        "backend": "ring" | "jaccl" | "jaccl-ring",   optional, default ring
        "rendezvous": "ip:port"}   optional; ring backend: where rank 0 gathers the ranks

2. verifies every listed file (size, then sha256) — **a missing weight file does not fail
   mlx-lm's load: those layers silently keep random weights**. A verified file gets a stamp in
   ``<model_dir>/.orch-verified/`` keyed by (size, mtime_ns, inode), so a restart re-reads no
   data. It also checks, from ``model.safetensors.index.json``, that the list covers every weight
   file mlx-lm will read for this rank's layers (the same rule as ``mlx_lm.utils.sharded_load``;
   in tensor mode that is every weight file, which ``sharded_load`` reads on every rank);
3. pipeline: makes mlx-lm apply ``split`` (see `install_split_hook`) and checks after loading
   that this rank holds exactly its layers; both: pins requests to the loaded model (see
   `install_load_guard`) — or exits if this mlx-lm lacks what those hooks rely on;
4. on the ring backend with a ``rendezvous``, waits until every rank is ready to form it
   (`rendezvous`, so that no rank's first connect is refused and backs off for seconds), then
   forms the group with ``mx.distributed.init(strict=True, backend=...)`` (``ring``, or
   ``jaccl`` for both RDMA backends: ``MLX_JACCL_RING`` picks the ring) and checks its size
   (the default backend silently falls back to a group of 1). A one-node service (world size
   1) forms no group and ignores ``MLX_HOSTFILE``;
5. runs ``mlx_lm.server`` ``main()`` with ``--model DIR [--pipeline] --host H --port P`` — the
   same command line on every rank (without ``--pipeline`` mlx-lm shards every layer with
   ``model.shard(group)``: tensor parallelism); rank 0 serves HTTP;
6. on the ring backend, watches its ring connections (`watch_ring`) and exits (code 4) when a
   peer closes one (after `RING_BREAK_GRACE`, so that orch's own ring restart stops it first).
   jaccl's connections are RDMA queue pairs, not sockets: a broken jaccl group is not watched.
   A rank other than 0 also waits for the ring's next bytes in the kernel between requests
   (`install_idle_wait`), where mlx's ring would poll a core while the service is idle.

Why 6: a ring forms once. A rank that dies (its Mac rebooted, its process crashed) and is
started again by launchd can never rejoin the old ring, and the surviving ranks neither notice
nor exit: rank 0 keeps answering ``/health`` 503 (FACTS.md). Exiting when a ring connection
closes turns one lost rank into every rank restarting — each by its own launchd ``KeepAlive``
— so the whole ring forms again with no orch command.

A status file (JSON, replaced atomically) tells the agent where the rank is: ``state`` is
``verifying`` → ``ring`` → ``loading`` → ``serving``, or ``failed`` with ``error``; plus rank,
world size, split, layer range [start, end), parameter bytes held, pid and start time.

Exit codes (launchd keeps the last one): 2 bad config or environment, 3 a file is missing or
wrong, 4 the ring did not form or has the wrong size, 5 this mlx-lm lacks a hook the worker
needs or loading failed.
"""

from __future__ import annotations

# os.path on purpose, like the agent: paths travel as JSON strings.
# ruff: noqa: PTH103, PTH105, PTH116, PTH117, PTH118, PTH120, PTH123, PTH208
import contextlib
import hashlib
import inspect
import json
import os
import re
import selectors
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_CONFIG = 2
EXIT_FILES = 3
EXIT_RING = 4
EXIT_MLX = 5

CHUNK = 1 << 20
RACY_SECONDS = 1.0  # a file modified this recently may still change within one mtime tick
STAMP_DIR = ".orch-verified"
INDEX = "model.safetensors.index.json"
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # mlx_lm.utils.sharded_load's rule
CONFIG_KEYS = {"model_dir", "split", "host", "port", "expected_world_size", "files",
               "status_path", "server_args", "parallelism", "backend", "rendezvous"}
REQUIRED_KEYS = CONFIG_KEYS - {"status_path", "server_args", "parallelism", "backend",
                               "rendezvous"}
PARALLELISMS = ("pipeline", "tensor")
BACKENDS = ("ring", "jaccl", "jaccl-ring")

FileSpec = tuple[int | None, str]  # (size or None, sha256)


class WorkerError(Exception):
    """A reason to refuse to start; carries the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------- status


class Status:
    """The rank's status file: rewritten atomically at every state change."""

    def __init__(self, path: str, fields: dict[str, Any]) -> None:
        self.path = path
        self.fields: dict[str, Any] = {"pid": os.getpid(), "started_at": time.time(), **fields}

    def set(self, **fields: Any) -> None:
        self.fields.update(fields, updated_at=time.time())
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.fields, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # the status is a report; never a reason to stop serving
            log(f"cannot write status file {self.path}: {exc}")


def log(message: str) -> None:
    rank = os.environ.get("MLX_RANK", "?")
    print(f"orch-worker rank {rank}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- config


def load_config(path: str) -> dict[str, Any]:
    """Read and check the worker config; raise WorkerError(EXIT_CONFIG) naming what is wrong."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise WorkerError(EXIT_CONFIG, f"cannot read config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise WorkerError(EXIT_CONFIG, f"{path}: the config must be a JSON object")
    problems = [f"unknown key {k!r}" for k in sorted(set(config) - CONFIG_KEYS)]
    problems += [f"missing key {k!r}" for k in sorted(REQUIRED_KEYS - set(config))]
    if not problems:
        problems = _config_problems(config)
    if problems:
        raise WorkerError(EXIT_CONFIG, f"{path}: " + "; ".join(problems))
    return config


def _config_problems(c: dict[str, Any]) -> list[str]:
    problems = []
    if not (isinstance(c["model_dir"], str) and os.path.isabs(c["model_dir"])):
        problems.append("model_dir must be an absolute path")
    split, size = c["split"], c["expected_world_size"]
    if not (isinstance(size, int) and size >= 1):
        problems.append("expected_world_size must be a positive integer")
    if not (isinstance(split, list) and all(isinstance(n, int) and n > 0 for n in split)):
        problems.append("split must be a list of positive layer counts")
    elif len(split) != size:
        problems.append(f"split has {len(split)} entries for expected_world_size {size}")
    if not isinstance(c["host"], str) or not c["host"]:
        problems.append("host must be a non-empty string")
    if not (isinstance(c["port"], int) and 0 < c["port"] < 65536):
        problems.append("port must be an integer in 1..65535")
    if not isinstance(c["files"], dict) or not c["files"]:
        problems.append("files must be a non-empty object {relative path: sha256}")
    else:
        for rel, spec in c["files"].items():
            if os.path.isabs(rel) or ".." in rel.split("/") or _file_spec(spec) is None:
                problems.append(f"bad files entry {rel!r}: {spec!r}")
    status = c.get("status_path")
    if status is not None and not (isinstance(status, str) and os.path.isabs(status)):
        problems.append("status_path must be an absolute path")
    args = c.get("server_args", [])
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        problems.append("server_args must be a list of strings")
    if c.get("parallelism", "pipeline") not in PARALLELISMS:
        problems.append(f"parallelism must be one of {', '.join(PARALLELISMS)}")
    elif c.get("parallelism") == "tensor" and isinstance(split, list) and len(set(split)) > 1:
        problems.append("tensor parallelism: split must give every rank every layer")
    if c.get("backend", "ring") not in BACKENDS:
        problems.append(f"backend must be one of {', '.join(BACKENDS)}")
    point = c.get("rendezvous")
    if point is not None and not (isinstance(point, str)
                                  and re.fullmatch(r"[0-9.]+:[0-9]{1,5}", point)):
        problems.append("rendezvous must be \"ipv4:port\"")
    return problems


def _file_spec(spec: Any) -> FileSpec | None:
    """A files entry as (size or None, sha256), or None when malformed."""
    if isinstance(spec, dict) and set(spec) == {"sha256", "size"}:
        size, sha = spec["size"], spec["sha256"]
        ok = isinstance(size, int) and size >= 0
        return (size, sha) if ok and _is_sha256(sha) else None
    return (None, spec) if _is_sha256(spec) else None


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def rank_from_env(expected_world_size: int, backend: str = "ring") -> int:
    """MLX_RANK as an int in range; the backend's rank list (MLX_HOSTFILE for the ring,
    MLX_IBV_DEVICES for jaccl) must list expected_world_size ranks."""
    raw = os.environ.get("MLX_RANK", "")
    if not raw.isdigit() or int(raw) >= expected_world_size:
        raise WorkerError(EXIT_CONFIG,
                          f"MLX_RANK={raw!r} is not a rank in 0..{expected_world_size - 1}")
    if expected_world_size == 1:
        return 0
    variable = "MLX_HOSTFILE" if backend == "ring" else "MLX_IBV_DEVICES"
    if backend != "ring" and ":" not in os.environ.get("MLX_JACCL_COORDINATOR", ""):
        raise WorkerError(EXIT_CONFIG, "MLX_JACCL_COORDINATOR must be rank 0's ip:port")
    path = os.environ.get(variable, "")
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError) as exc:
        raise WorkerError(EXIT_CONFIG, f"{variable}={path!r} is unreadable: {exc}") from exc
    if not (isinstance(hosts, list) and len(hosts) == expected_world_size):
        raise WorkerError(EXIT_CONFIG, f"{variable} {path} does not list "
                                       f"{expected_world_size} ranks: {hosts!r}")
    return int(raw)


def layer_range(split: list[int], rank: int, parallelism: str = "pipeline") -> tuple[int, int]:
    """[start, end) of the layers rank holds: rank 0 the last ones (mlx-lm's convention); in
    tensor mode every rank holds (a slice of) every layer."""
    if parallelism == "tensor":
        return 0, split[rank]
    start = sum(split[rank + 1:])
    return start, start + split[rank]


# -------------------------------------------------------------------------------------- files


def verify_files(model_dir: str, files: dict[str, Any]) -> None:
    """Check every listed file's size and sha256; raise WorkerError naming every bad file."""
    problems = []
    for rel in sorted(files):
        size, sha = _file_spec(files[rel]) or (None, "")
        path = os.path.join(model_dir, rel)
        try:
            st = os.stat(path)
        except OSError:
            problems.append(f"missing file {path}")
            continue
        if size is not None and st.st_size != size:
            problems.append(f"wrong size {path}: {st.st_size} bytes, expected {size}")
            continue
        actual = _cached_sha256(model_dir, rel, st)
        if actual != sha:
            problems.append(f"sha256 mismatch {path}: got {actual}, expected {sha}")
    if problems:
        raise WorkerError(EXIT_FILES, "refusing to start, its layers would run with random "
                                      "weights: " + "; ".join(problems))


def _cached_sha256(model_dir: str, rel: str, st: os.stat_result) -> str:
    """sha256 of a file, trusting a stamp written after an earlier check of the same bytes."""
    stamp = os.path.join(model_dir, STAMP_DIR, rel + ".json")
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    try:
        with open(stamp) as f:
            saved = json.load(f)
        if isinstance(saved, dict) and saved.get("key") == key:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    started = time.time()
    digest = hashlib.sha256()
    with open(os.path.join(model_dir, rel), "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    after = os.stat(os.path.join(model_dir, rel))
    if [after.st_size, after.st_mtime_ns, after.st_ino] == key and \
            st.st_mtime < started - RACY_SECONDS:
        try:
            os.makedirs(os.path.dirname(stamp), exist_ok=True)
            with open(stamp + ".tmp", "w") as f:
                json.dump({"key": key, "sha256": sha}, f)
            os.replace(stamp + ".tmp", stamp)
        except OSError:
            pass  # a read-only model dir only costs re-hashing next start
    return sha


def check_coverage(model_dir: str, files: dict[str, Any], start: int, end: int) -> None:
    """Every weight file mlx-lm will read for layers [start, end) must be in the verified list."""
    if INDEX not in files:
        raise WorkerError(EXIT_FILES, f"files must include {INDEX} (mlx-lm reads it to load)")
    with open(os.path.join(model_dir, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    needed = set()
    for tensor, name in weight_map.items():
        m = LAYER_RE.search(tensor)
        if m is None or start <= int(m.group(1)) < end:
            needed.add(name)
    unlisted = sorted(needed - set(files))
    if unlisted:
        raise WorkerError(EXIT_FILES, f"layers {start}..{end - 1} need {', '.join(unlisted)}, "
                                      "which the config does not list, so nothing verified them")
    extra = sorted(n for n in os.listdir(model_dir)
                   if n.endswith(".safetensors") and n not in files)
    if extra:
        log(f"unlisted weight files in {model_dir} (mlx-lm globs them): {', '.join(extra)}")


# ----------------------------------------------------------------------------------- mlx hooks


# Why a rendezvous before mlx's ring forms: mlx's rank N-1 connects to rank 0 first and the
# others accept first, and a connect that finds no listener is retried only after 1, 2, 4 then
# 8 s (FACTS.md). Ranks started together reach ``init`` within milliseconds of each other, so
# about every other ring start lost a second, and a loaded Mac two or three. So rank 0 first
# listens on a port of its own (``rendezvous`` in the config: rank 0's ring IP and
# ``runtime.rendezvous_port``, never a ring port, so that no check-in can ever reach mlx's
# listener); every other rank checks in there, and once all have, rank 0 closes it and says
# go: the ranks that accept first enter ``init`` at once, rank N-1 a moment later
# (`LAST_RANK_DELAY`), rank 0 right away. Three short lines: rank 0's hello names the ring
# (`ring_digest`), so a rank of an older ring (one node fewer, before an undrain) never counts.
# A rank waits for rank 0 as long as it takes, as mlx's ranks that accept first do.
RENDEZVOUS_VERSION = "1"
RENDEZVOUS_RETRY = 0.05  # seconds between a rank's attempts to reach rank 0's rendezvous
RENDEZVOUS_HELLO_WAIT = 2.0  # seconds a joining rank waits for rank 0's hello on a connection
RENDEZVOUS_NOTICE = 30.0  # seconds between "still waiting" lines in the worker's log
RENDEZVOUS_BIND_WAIT = 10.0  # seconds rank 0 tries to bind the rendezvous port before exiting
# Rank N-1's head start for rank 0, which listens once it has closed its own listener: a few
# milliseconds, unless the machine is so busy that rank 0 waits for a core (a miss costs mlx's 1 s).
LAST_RANK_DELAY = 0.2
MESSAGE_LIMIT = 128  # bytes: every message is one short line


def ring_digest(endpoints: list[tuple[str, int]]) -> str:
    """Names one ring: its ranks' endpoints, in order."""
    canonical = json.dumps([f"{ip}:{port}" for ip, port in endpoints]).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def read_line(sock: socket.socket) -> bytes:
    """One message without its newline; b"" when the peer closed first."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            return b""
        line += byte
        if len(line) > MESSAGE_LIMIT:
            raise OSError("rendezvous message too long")
    return line[:-1]


def hello(digest: str) -> bytes:
    return f"orch-ring {RENDEZVOUS_VERSION} {digest}\n".encode()


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalive (`KEEPALIVE`): a peer gone without a FIN (power, cable) is seen in ~25 s."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in KEEPALIVE:
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        pass


class Gathering:
    """Rank 0's side: who has checked in, on which connection, and what each has sent."""

    def __init__(self, size: int, digest: str) -> None:
        self.size, self.greeting = size, hello(digest)
        self.selector = selectors.DefaultSelector()
        self.joined: dict[int, socket.socket] = {}
        self.unread: dict[socket.socket, bytes] = {}

    def complete(self) -> bool:
        return len(self.joined) == self.size - 1

    def accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
            conn.setblocking(True)
            keep_alive(conn)
            conn.sendall(self.greeting)
        except OSError:  # gone between its connect and this accept
            return
        self.unread[conn] = b""
        self.selector.register(conn, selectors.EVENT_READ)

    def drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        sock.close()
        self.unread.pop(sock, None)
        for rank, member in list(self.joined.items()):
            if member is sock:
                del self.joined[rank]

    def read(self, sock: socket.socket) -> None:
        """A check-in line, or a member's close (it died, or restarted: it checks in again)."""
        try:
            data = sock.recv(MESSAGE_LIMIT)
        except OSError:
            data = b""
        if sock not in self.unread or not data:  # a member says nothing until go
            self.drop(sock)
            return
        self.unread[sock] += data
        if b"\n" not in self.unread[sock]:
            if len(self.unread[sock]) > MESSAGE_LIMIT:
                self.drop(sock)
            return
        line = self.unread.pop(sock).partition(b"\n")[0].decode("ascii", "replace")
        word, _, number = line.partition(" ")
        if word != "ready" or not number.isdigit() or not 0 < int(number) < self.size:
            self.drop(sock)
            return
        previous = self.joined.get(int(number))
        if previous is not None:  # that rank restarted: its new check-in counts
            self.drop(previous)
        self.joined[int(number)] = sock

    def close(self) -> None:
        for sock in [*self.joined.values(), *self.unread]:
            sock.close()
        self.selector.close()


def gather_ranks(point: tuple[str, int], size: int, digest: str) -> None:
    """Rank 0: listen at the rendezvous until ranks 1..size-1 of this ring have all checked in,
    close it, and tell each to go. A rank whose connection closes before go is forgotten until
    it checks in again."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    gathering = Gathering(size, digest)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bound_by = time.monotonic() + RENDEZVOUS_BIND_WAIT
        while True:  # the rank 0 just stopped may hold the port for a moment
            try:
                listener.bind(point)
                break
            except OSError:
                if time.monotonic() > bound_by:
                    raise
                time.sleep(RENDEZVOUS_RETRY)
        listener.listen(size)
        listener.setblocking(False)
        gathering.selector.register(listener, selectors.EVENT_READ)
        while not gathering.complete():
            for key, _ in gathering.selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is listener:
                    gathering.accept(listener)
                elif sock.fileno() != -1:  # not dropped earlier in this same batch
                    gathering.read(sock)
        gathering.selector.unregister(listener)
        listener.close()
        for _, sock in sorted(gathering.joined.items()):  # rank N-1, which connects first, last
            with contextlib.suppress(OSError):  # gone since: mlx's connect or accept fails
                sock.sendall(b"go\n")
    except OSError as exc:
        raise WorkerError(EXIT_RING, f"the rendezvous at {point[0]}:{point[1]} failed: "
                                     f"{exc}") from exc
    finally:
        gathering.close()
        listener.close()


def check_in(point: tuple[str, int], rank: int, digest: str,
             give_up: float | None = None) -> None:
    """A rank other than 0: check in at rank 0's rendezvous and return on its go. Waits for
    rank 0 as long as it takes, unless `give_up` (seconds without a hello) says otherwise."""
    expected = hello(digest)[:-1]
    started = last_hello = last_notice = time.monotonic()
    while True:
        try:
            with socket.create_connection(point, timeout=RENDEZVOUS_HELLO_WAIT) as sock:
                if read_line(sock) == expected:
                    last_hello = time.monotonic()
                    sock.sendall(f"ready {rank}\n".encode())
                    sock.settimeout(None)  # rank 0 waits for the others as long as it takes
                    keep_alive(sock)
                    if read_line(sock) == b"go":
                        return
        except OSError:  # not listening yet, or rank 0 went away (it restarted, or died)
            pass
        now = time.monotonic()
        if give_up is not None and now - last_hello > give_up:
            raise WorkerError(EXIT_RING, f"rank 0's rendezvous at {point[0]}:{point[1]} did "
                                         f"not answer for {give_up:g} s")
        if now - last_notice > RENDEZVOUS_NOTICE:
            last_notice = now
            log(f"still waiting for rank 0 at {point[0]}:{point[1]} "
                f"({now - started:.0f} s)")
        time.sleep(RENDEZVOUS_RETRY)


def rendezvous(point: tuple[str, int], endpoints: list[tuple[str, int]], rank: int) -> None:
    """Hold this rank until every rank is ready to form the ring; see the comment above."""
    digest = ring_digest(endpoints)
    started = time.monotonic()
    if rank == 0:
        log(f"waiting at {point[0]}:{point[1]} for ranks 1..{len(endpoints) - 1} to be ready")
        gather_ranks(point, len(endpoints), digest)
    else:
        check_in(point, rank, digest)
        if rank == len(endpoints) - 1:
            time.sleep(LAST_RANK_DELAY)
    log(f"every rank ready after {time.monotonic() - started:.2f} s; forming the ring")


def init_ring(expected_world_size: int, rank: int, backend: str = "ring") -> Any:
    """The global group, formed strictly over the backend and of the expected size and rank.
    Both RDMA backends are MLX's ``jaccl``; ``MLX_JACCL_RING=1`` in the environment makes it
    use a ring of cables instead of a mesh (what ``mlx.launch --backend jaccl-ring`` does)."""
    import mlx.core as mx

    try:
        group = mx.distributed.init(strict=True, backend="ring" if backend == "ring" else "jaccl")
    except RuntimeError as exc:
        raise WorkerError(EXIT_RING, f"the {backend} group did not form: {exc}") from exc
    # mlx_lm.server calls mx.distributed.init() again; it must get this same group.
    size, got_rank = group.size(), group.rank()
    if size != expected_world_size or got_rank != rank or mx.distributed.init().size() != size:
        raise WorkerError(EXIT_RING, f"the ring has size {size} and rank {got_rank}, "
                                     f"expected size {expected_world_size} and rank {rank}")
    return group


RING_WATCH_INTERVAL = 1.0  # seconds between checks of the ring's connections
# Seconds between noticing a broken ring and exiting. When orch restarts the ring itself it
# boots every rank out within a few seconds; exiting at once would let KeepAlive start the old
# job again in between (a wasted start, and a second restart of that rank). A rank that is
# booted out meanwhile simply dies with its SIGTERM.
RING_BREAK_GRACE = 10.0
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPALIVE", 10), ("TCP_KEEPINTVL", 5),
             ("TCP_KEEPCNT", 3))  # a peer gone without a FIN (power, cable) is seen in ~25 s


def hostfile_endpoints(path: str) -> list[tuple[str, int]]:
    """The ``(ip, port)`` of every rank, from mlx's hostfile (``[["ip:port"], ...]``)."""
    with open(path) as f:
        entries = json.load(f)
    endpoints = []
    for entry in entries:
        for address in entry:
            endpoints.append(parse_endpoint(str(address)))
    return endpoints


def ring_sockets(endpoints: list[tuple[str, int]], mine: tuple[str, int]) -> list[socket.socket]:
    """This process's TCP connections of the ring: accepted on its own endpoint, or made to
    a peer's. Each is a dup of mlx's descriptor (closing it leaves mlx's open)."""
    found = []
    for name in os.listdir("/dev/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue
        try:
            peer = tuple(sock.getpeername()[:2])  # first: a listener has no peer
            ring = sock.type == socket.SOCK_STREAM and (
                tuple(sock.getsockname()[:2]) == mine or peer in endpoints)
        except (OSError, TypeError):  # not connected (a listener), or not an IP socket
            ring = False
        if ring:
            found.append(sock)
        else:
            sock.close()
    return found


def peer_gone(sock: socket.socket) -> str | None:
    """Why this ring connection is dead, or None while it is open. MSG_PEEK leaves any
    pending bytes to mlx; an orderly close reads as b"" and a reset as an error."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return f"{exc.strerror or exc}"
    return "closed by the peer" if data == b"" else None


def watch_ring(status: Status, socks: list[socket.socket]) -> None:
    """Exit (code 4) as soon as a ring connection dies; see the module docstring, 6."""
    if not socks:
        log("no ring connection found to watch; a broken ring will not be noticed")
        return
    for sock in socks:
        keep_alive(sock)

    peers = []
    for sock in socks:
        try:
            ip, port = sock.getpeername()[:2]
            peers.append(f"{ip}:{port}")
        except OSError:
            peers.append("a peer")

    def run() -> None:
        while True:
            time.sleep(RING_WATCH_INTERVAL)
            for sock, peer in zip(socks, peers, strict=True):
                why = peer_gone(sock)
                if why is not None:
                    message = f"ring broken: the connection with {peer} was {why}; exiting " \
                              "so launchd restarts this rank and the ring forms again"
                    log(f"{message} (in {RING_BREAK_GRACE:g} s)")
                    status.set(state="failed", error=message, exit_code=EXIT_RING)
                    time.sleep(RING_BREAK_GRACE)
                    os._exit(EXIT_RING)

    threading.Thread(target=run, name="orch-ring-watch", daemon=True).start()
    log(f"watching {len(socks)} ring connections")


def install_idle_wait(socks: list[socket.socket]) -> bool:
    """On a rank other than 0: before mlx-lm's next request is shared, sleep until a ring
    connection has bytes to read (or was closed), instead of spinning in mlx's collective.

    Why: rank 0 waits for HTTP requests (0.1 s at a time), then shares "a request, or none"
    with every rank through ``mx.distributed.all_sum``; the other ranks wait inside that
    all_sum, where the ring backend's communication thread polls without sleeping — about a
    core per idle rank, for as long as the service is idle. Every rank runs the same
    collectives in the same order and mlx reads a socket only inside one, so bytes on a ring
    connection here are the next collective's, which every rank enters by sending: rank 0
    (never waiting here) wakes its neighbours, they wake theirs. The wait only moves where a
    rank waits, from the poll loop into the kernel; the collective and its data are unchanged.
    A closed or reset connection is readable too, so a broken ring still reaches mlx (and
    `watch_ring`) as before.

    Relies on ``mlx_lm.server.ResponseGenerator._share_object(self, obj)`` (mlx-lm 0.32.2);
    on an mlx-lm without it nothing is installed (the rank then spins, as it always did) and
    False is returned.
    """
    import mlx_lm.server as server

    generator = getattr(server, "ResponseGenerator", None)
    original = getattr(generator, "_share_object", None)
    if generator is None or original is None or not socks or \
            list(inspect.signature(original).parameters) != ["self", "obj"]:
        return False
    ready = selectors.DefaultSelector()
    for sock in socks:
        ready.register(sock, selectors.EVENT_READ)

    def share_object(self: Any, obj: Any) -> Any:
        ready.select()
        return original(self, obj)

    generator._share_object = share_object
    return True


def install_split_hook(split: list[int]) -> Callable[[], None]:
    """Make mlx-lm's pipeline loading use ``split``; return a function that undoes it.

    Relies on mlx-lm 0.32.2's ``mlx_lm.models.pipeline.PipelineMixin.pipeline(self, group,
    split=None)``, which ``mlx_lm.utils.sharded_load`` (what ``mlx_lm.server`` loads with under
    ``--pipeline``) calls twice without ``split``: once to choose the rank's weight files, once
    on the model it returns. Defaulting ``split`` there changes both consistently and nothing
    else. Models that override ``pipeline`` would escape it; `install_load_guard` checks the
    loaded layer range so that cannot pass silently.
    """
    try:
        from mlx_lm.models.pipeline import PipelineMixin
    except ImportError as exc:
        raise WorkerError(EXIT_MLX, f"this mlx-lm has no mlx_lm.models.pipeline: {exc}") from exc
    original = PipelineMixin.__dict__.get("pipeline")
    if original is None or "split" not in inspect.signature(original).parameters:
        raise WorkerError(EXIT_MLX, "this mlx-lm's PipelineMixin.pipeline takes no split "
                                    "(orch's worker needs mlx-lm 0.32.2's signature)")
    wanted = list(split)

    def pipeline(self: Any, group: Any, split: list[int] | None = None) -> Any:
        return original(self, group, wanted if split is None else split)

    PipelineMixin.pipeline = pipeline  # type: ignore[method-assign]

    def undo() -> None:
        PipelineMixin.pipeline = original  # type: ignore[method-assign]

    return undo


def install_load_guard(status: Status, start: int, end: int, distributed: bool,
                       tensor: bool = False) -> None:
    """Check the loaded layer range (pipeline) and report it; pin every request to the loaded
    model.

    Relies on the names ``mlx_lm.server.ModelProvider._load`` calls — ``sharded_load`` under a
    ring, ``load`` alone — and on ``mlx_lm.server.ModelProvider.load(self, model_path,
    adapter_path, draft_model_path)``. Pinning matters: a request naming another model makes
    every rank reload from that name, and a rank whose directory lacks that model's files would
    load random weights. A load failure ends the process (exit 5), so launchd restarts the rank
    instead of leaving rank 0 answering HTTP with a dead generator.
    """
    import mlx_lm.server as server
    from mlx.utils import tree_flatten

    name = "sharded_load" if distributed else "load"
    original_load = getattr(server, name, None)
    provider = getattr(server, "ModelProvider", None)
    provider_load = getattr(provider, "load", None)
    if original_load is None or provider_load is None or \
            list(inspect.signature(provider_load).parameters)[:2] != ["self", "model_path"]:
        raise WorkerError(EXIT_MLX, f"this mlx-lm's server lacks {name} or "
                                    "ModelProvider.load(self, model_path, ...)")

    def guarded_load(*args: Any, **kwargs: Any) -> Any:
        try:
            result = original_load(*args, **kwargs)
            if distributed and not tensor:
                inner = result[0].model
                held = (inner.start_idx, inner.end_idx)
                if held != (start, end):
                    raise WorkerError(EXIT_MLX, f"mlx-lm loaded layers {held}, not "
                                                f"{(start, end)}: the split hook did not apply")
            leaves: Any = tree_flatten(result[0].parameters())
            nbytes = sum(v.nbytes for _, v in leaves)
            status.set(state="serving", param_bytes=nbytes)
            log(f"loaded layers {start}..{end - 1} ({nbytes} bytes of parameters)")
            return result
        except BaseException as exc:  # in the server's generation thread: end the process
            traceback.print_exc()
            code = exc.code if isinstance(exc, WorkerError) else EXIT_MLX
            status.set(state="failed", error=f"loading failed: {exc}", exit_code=code)
            os._exit(code)

    def pinned_load(self: Any, model_path: str, adapter_path: Any = None,
                    draft_model_path: Any = None) -> Any:
        return provider_load(self, "default_model", None, "default_model")

    setattr(server, name, guarded_load)
    provider.load = pinned_load  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------- main


def fail(status: Status | None, code: int, message: str) -> NoReturn:
    log(message)
    if status is not None:
        status.set(state="failed", error=message, exit_code=code)
    sys.exit(code)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        fail(None, EXIT_CONFIG, "usage: mlx_worker.py CONFIG.json (with MLX_RANK, MLX_HOSTFILE)")
    status = None
    try:
        config = load_config(argv[1])
        size, split, model_dir = config["expected_world_size"], config["split"], config["model_dir"]
        parallelism = config.get("parallelism", "pipeline")
        backend = config.get("backend", "ring")
        rank = rank_from_env(size, backend)
        start, end = layer_range(split, rank, parallelism)
        status_path = config.get("status_path") or os.path.join(
            os.path.dirname(model_dir.rstrip("/")), f"worker-status-{rank}.json")
        status = Status(status_path, {"rank": rank, "world_size": size, "split": split,
                                      "layers": [start, end], "num_layers": end - start,
                                      "model_dir": model_dir, "host": config["host"],
                                      "port": config["port"], "error": None,
                                      "parallelism": parallelism, "backend": backend})
        status.set(state="verifying")
        verify_files(model_dir, config["files"])
        if size > 1 or INDEX in config["files"]:
            check_coverage(model_dir, config["files"], start, end)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never download
        hub_cache = os.environ.get("HF_HUB_CACHE")
        if hub_cache:
            os.makedirs(hub_cache, exist_ok=True)  # /v1/models fails without it
        # Hooks before the ring: an mlx-lm without them fails here, not after peers joined.
        if size > 1 and parallelism == "pipeline":
            install_split_hook(split)
        install_load_guard(status, start, end, distributed=size > 1,
                           tensor=parallelism == "tensor")
        import mlx_lm.server as server

        if size == 1:  # no ring: a one-entry hostfile would make mlx wait for it forever
            os.environ.pop("MLX_HOSTFILE", None)
            os.environ.pop("MLX_RANK", None)
        else:
            status.set(state="ring")
            log(f"verified {len(config['files'])} files; forming a {backend} group of {size}")
            if backend == "ring":
                endpoints = hostfile_endpoints(os.environ["MLX_HOSTFILE"])
                if config.get("rendezvous"):
                    rendezvous(parse_endpoint(config["rendezvous"]), endpoints, rank)
            init_ring(size, rank, backend)
            if backend == "ring":
                socks = ring_sockets(endpoints, endpoints[rank])
                watch_ring(status, socks)
                if rank > 0 and install_idle_wait(socks):
                    log("idle: waiting for the ring's next bytes in the kernel, not polling")
    except WorkerError as exc:
        fail(status, exc.code, str(exc))
    status.set(state="loading")
    log(f"group of {size} formed; loading layers {start}..{end - 1} of split {split} "
        f"({parallelism})")
    pipeline = ["--pipeline"] if parallelism == "pipeline" else []
    sys.argv = ["mlx_lm.server", "--model", model_dir, *pipeline, "--host", config["host"],
                "--port", str(config["port"]), *config.get("server_args", [])]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main(sys.argv)
