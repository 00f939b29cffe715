"""`TestHub`: a local server speaking the Hugging Face Hub endpoints the model sync uses.

Endpoints (``{repo}`` is ``org/name`` or ``name``; ``{rev}`` a branch name or the commit sha,
URL-quoted as one segment; ``{path}`` a file path with its ``/`` kept)::

    GET  /api/models/{repo}/revision/{rev}[?blobs=true]   {"id", "sha", "siblings": [...], ...}
    GET  /api/models/{repo}/tree/{rev}[/{dir}][?recursive=true]
         [{"type": "file", "path", "size", "oid", "lfs": {"oid", "size", "pointerSize"}}, ...]
         paginated with ``Link: <...&cursor=...>; rel="next"`` when ``tree_page_size`` is set
    HEAD|GET /{repo}/resolve/{rev}/{path}
         plain files: 200/206 with ETag (git blob id), X-Repo-Commit, Accept-Ranges
         LFS files:   302 to /cdn/... with X-Linked-Size, X-Linked-Etag (sha256), ETag,
                      X-Repo-Commit — the client must follow it, as with the real Hub's CDN
    HEAD|GET /cdn/{repo}/{commit}/{path}?expires=..&signature=..   (a presigned URL)
         200/206/416 with Content-Range; 403 when the signature is wrong or expired

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and
``X-Error-Message`` like the real Hub. With ``token`` set every repository is gated: the API and
``resolve`` answer 401 without ``Authorization: Bearer <token>``; the CDN needs no token (its
URLs are signed), and counts requests that carry one anyway, so tests can check that a client
drops the token when it leaves the hub's host (``cdn_host`` puts the CDN on a second address).

Faults (`Faults`) are injected on file requests (resolve and CDN; the API too with ``api=True``;
only some files' with ``Faults.files``): 404s, 503s and 429s with Retry-After, Range ignored
(200 and the whole file), bodies cut, stalled or corrupted (right length, wrong bytes), and a
shared bandwidth limit. ``plain_http_limit`` models the Hub's refusal to serve big files over
plain HTTP (over 50 GB, the real one; Xet only): the CDN answers 400 ``FileTooLarge`` for a file
larger than that, with a message naming the limit. Counters (`HubStats`) say what was served:
bytes per file, complete serves per file (responses that delivered a file's last byte), faults
by kind, 401s; `TestHub.log` has one `LogEntry` per request, with its time. `TestHub.cut`
cuts the bodies of one file that are being sent at that moment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import select
import socket
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from orchestrator.simulator.faults import FAULT_KINDS, Fate, FaultPlan, Faults, Pacer
from orchestrator.simulator.hubrepo import LFS_THRESHOLD, Repo, RepoFile, index_repo

__all__ = ["HubStats", "LogEntry", "TestHub"]

_CHUNK = 64 * 1024
_URL_LIFETIME_S = 3600
_LOG_LENGTH = 10_000


@dataclass(frozen=True)
class HubStats:
    """A snapshot of the hub's counters. File keys are ``"{repo}/{path}"``."""

    requests: int
    bytes_served: Mapping[str, int]  # body bytes of each file sent, cut responses included
    complete_serves: Mapping[str, int]  # responses that delivered the file's last byte
    faults: Mapping[str, int]  # per kind (`FAULT_KINDS`): "error" (503s), "cut", "stall", ...
    unauthorized: int  # 401s
    cdn_requests_with_authorization: int
    stalls_abandoned: int  # stalls the client hung up on before they ended (a read timeout)
    api_bytes: int

    @property
    def total_bytes_served(self) -> int:
        return sum(self.bytes_served.values())


class LogEntry(NamedTuple):
    """One request the hub answered, logged as the answer starts. ``file`` is the repository
    path it concerned (None for the API and unknown paths); ``faults`` the kinds injected
    (`FAULT_KINDS`)."""

    at: float  # time.monotonic() when the answer started
    method: str
    path: str  # the URL path, without the query
    range: str | None
    status: int
    body: int  # body bytes in the answer (up to the cut, for a cut or stalled one)
    file: str | None
    faults: tuple[str, ...]


@dataclass
class _Reply:
    """What to answer: status, headers and a body that is either bytes or a file region."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: RepoFile | None = None
    start: int = 0
    length: int = 0
    key: str | None = None  # the counter key of the file served
    faultable: bool = False
    path: str | None = None  # the repository file the request is about (resolve and CDN)

    @property
    def body_length(self) -> int:
        return self.length if self.file is not None else len(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: TestHub, *, cdn_only: bool) -> None:
        self.hub = hub
        self.cdn_only = cdn_only
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection holds a thread at most this long

    def setup(self) -> None:
        super().setup()
        with self.server.live_lock:
            self.server.live.add(self.connection)

    def finish(self) -> None:
        with self.server.live_lock:
            self.server.live.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def handle(self) -> None:
        with suppress(ConnectionError):  # a client that hangs up is not an error here
            super().handle()

    def do_GET(self) -> None:
        self.server.hub._handle(self, head=False)

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, head=True)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: `TestHub.log` records requests instead of stderr."""


class TestHub:
    """A Hub double on loopback. Use as a context manager, or `start()` / `close()`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        repos: Mapping[str, Path | str] | None = None,
        *,
        token: str | None = None,
        faults: Faults | None = None,
        lfs_threshold: int = LFS_THRESHOLD,
        tree_page_size: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_host: str | None = None,
        plain_http_limit: int | None = None,
    ) -> None:
        self.token = token
        self.plain_http_limit = plain_http_limit
        self.tree_page_size = tree_page_size
        self.lfs_threshold = lfs_threshold
        self.log: deque[LogEntry] = deque(maxlen=_LOG_LENGTH)
        self._repos: dict[str, Repo] = {}
        self._faults = faults or Faults()
        self._plan = FaultPlan(self._faults)
        self._pacer = Pacer()
        self._closing = threading.Event()  # set by close(): a stall cut short is not a hang-up
        self._secret = os.urandom(16)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()
        self._complete: Counter[str] = Counter()
        self._bodies: dict[socket.socket, str] = {}  # connection -> the file it is sending now
        self._servers = [_Server((host, port), self, cdn_only=False)]
        if cdn_host is not None:
            self._servers.append(_Server((cdn_host, 0), self, cdn_only=True))
        self._threads: list[threading.Thread] = []
        for repo_id, directory in (repos or {}).items():
            self.add_repo(repo_id, directory)

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> TestHub:
        if not self._threads:
            for server in self._servers:
                thread = threading.Thread(
                    target=server.serve_forever, args=(0.05,), name="test-hub", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop serving and cut any connection still open (a throttled or stalled body, a
        keep-alive)."""
        self._closing.set()
        for server in self._servers:
            if self._threads:
                server.shutdown()
            with server.live_lock:
                for sock in list(server.live):
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> TestHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------ content

    def add_repo(
        self, repo_id: str, directory: Path | str, branches: tuple[str, ...] = ("main",)
    ) -> str:
        """Serve ``directory`` (hashed now) as ``repo_id``; returns its commit sha."""
        repo = index_repo(repo_id, Path(directory), branches, lfs_threshold=self.lfs_threshold)
        with self._lock:
            self._repos[repo_id] = repo
        return repo.commit

    def repo(self, repo_id: str) -> Repo:
        return self._repos[repo_id]

    @property
    def endpoint(self) -> str:
        return self._base(self._servers[0])

    def resolve_url(self, repo_id: str, path: str, revision: str = "main") -> str:
        return (
            f"{self.endpoint}/{_quote_repo(repo_id)}/resolve/"
            f"{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"
        )

    # ------------------------------------------------------------------------------ faults, stats

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        """Change the link's behaviour mid-run (decisions restart from the new seed; the
        bandwidth limit starts afresh: time booked at the old one does not delay new
        requests)."""
        self._faults, self._plan, self._pacer = faults, FaultPlan(faults), Pacer()

    def stats(self) -> HubStats:
        with self._lock:
            return HubStats(
                requests=self._counts["requests"],
                bytes_served=dict(self._bytes),
                complete_serves=dict(self._complete),
                faults={kind: self._counts[kind] for kind in FAULT_KINDS},
                unauthorized=self._counts["unauthorized"],
                cdn_requests_with_authorization=self._counts["cdn_authorization"],
                stalls_abandoned=self._counts["stalls_abandoned"],
                api_bytes=self._counts["api_bytes"],
            )

    def cut(self, path: str) -> int:
        """Cut every body of the repository file ``path`` being sent now, as a dropped link
        would (counted as a ``cut`` fault); returns how many. Why a call rather than a
        `Faults` fraction: a test that waits until a node holds part of the file can then
        cut the transfer exactly mid-body, whatever the machine's speed."""
        with self._lock:
            sockets = [sock for sock, sending in self._bodies.items() if sending == path]
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._count("cut", len(sockets))
        return len(sockets)

    def sending(self) -> int:
        """How many file bodies are being sent now (a body to a client that has gone is
        counted, as sent, until a write fails: the counters are final once this is 0)."""
        with self._lock:
            return len(self._bodies)

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()
            self._bytes.clear()
            self._complete.clear()

    # ------------------------------------------------------------------------------ requests

    def _handle(self, handler: _Handler, *, head: bool) -> None:
        self._count("requests")
        split = urllib.parse.urlsplit(handler.path)
        segments = [urllib.parse.unquote(s) for s in split.path.split("/")[1:]]
        query = dict(urllib.parse.parse_qsl(split.query))
        reply = self._route(handler, segments, query)
        fate = Fate()
        plan = self._plan
        range_header = handler.headers.get("Range")
        if reply.faultable and plan.applies_to(reply.path):
            key = f"{handler.command}|{split.path}|{range_header or ''}"
            ranged = reply.status == 206 and reply.file is not None
            fate = plan.fate(
                key,
                0 if head else reply.body_length,
                reply.file.size if ranged and reply.file is not None else None,
            )
            faulted = self._apply_fate(reply, fate, plan.faults)
            faulted.path = reply.path
            reply = faulted
            for kind in fate.kinds:
                self._count(kind)
        if reply.status == 401:
            self._count("unauthorized")
        body = 0 if head else reply.body_length if fate.cut_at is None else fate.cut_at
        # Logged before the answer leaves, so a client that has read it finds it logged.
        self.log.append(
            LogEntry(
                time.monotonic(),
                handler.command,
                split.path,
                range_header,
                reply.status,
                body,
                reply.path,
                fate.kinds,
            )
        )
        self._send(handler, reply, head=head, fate=fate, plan=plan)

    @staticmethod
    def _apply_fate(reply: _Reply, fate: Fate, faults: Faults) -> _Reply:
        """The answer a fate turns ``reply`` into (its body faults are applied by `_send`)."""
        retry_after = {"Retry-After": str(faults.retry_after)}
        if fate.status == 404:
            return _error(
                404,
                "EntryNotFound",
                f"{reply.path} does not exist on the revision",
                {"X-Repo-Commit": reply.headers.get("X-Repo-Commit", "")}
                if "X-Repo-Commit" in reply.headers
                else None,
            )
        if fate.status == 503:
            return _error(
                503,
                "ServiceUnavailable",
                "The server is temporarily unable to handle the request",
                retry_after,
            )
        if fate.status == 429:
            return _error(
                429, "RateLimited", "Too many requests: retry after the time given", retry_after
            )
        if fate.whole and reply.file is not None:  # the Range header, ignored
            headers = {k: v for k, v in reply.headers.items() if k != "Content-Range"}
            return _Reply(
                200,
                headers,
                file=reply.file,
                start=0,
                length=reply.file.size,
                key=reply.key,
                faultable=True,
                path=reply.path,
            )
        return reply

    def _route(self, handler: _Handler, segs: list[str], query: dict[str, str]) -> _Reply:
        cdn_only = handler.server.cdn_only
        if segs[:1] == ["cdn"] and (cdn_only or len(self._servers) == 1):
            if handler.headers.get("Authorization"):
                self._count("cdn_authorization")
            return self._cdn(segs[1:], query, handler.headers.get("Range"))
        if cdn_only:
            return _error(404, "EntryNotFound", "Not found")
        api = segs[:2] == ["api", "models"]
        found = self._match_repo(segs[2:] if api else segs)
        if found is None:
            return _error(404, "RepoNotFound", "Repository not found")
        repo, rest = found
        denied = self._check_token(handler.headers.get("Authorization"), repo.repo_id)
        if denied is not None:
            return denied
        if len(rest) < 2:
            return _error(404, "EntryNotFound", "Not found")
        action, revision = rest[0], rest[1]
        if not repo.has_revision(revision):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if api and action == "revision" and len(rest) == 2:
            return self._api_json(
                repo.revision_json(blobs=query.get("blobs") == "true", gated=self.token is not None)
            )
        if api and action == "tree":
            return self._tree(repo, revision, "/".join(rest[2:]), query)
        if not api and action == "resolve" and len(rest) > 2:
            return self._resolve(repo, "/".join(rest[2:]), handler.headers.get("Range"))
        return _error(404, "EntryNotFound", "Not found")

    def _match_repo(self, segs: list[str]) -> tuple[Repo, list[str]] | None:
        for n in (2, 1):
            repo = self._repos.get("/".join(segs[:n])) if len(segs) > n else None
            if repo is not None:
                return repo, segs[n:]
        return None

    def _check_token(self, authorization: str | None, repo_id: str) -> _Reply | None:
        if self.token is None:
            return None
        expected = f"Bearer {self.token}".encode()
        given = (authorization or "").encode("latin-1", "replace")
        if hmac.compare_digest(given, expected):
            return None
        message = (
            f"Access to model {repo_id} is restricted. You must have access to it and "
            "be authenticated to access it. Please log in."
            if not authorization
            else "Invalid credentials in Authorization header"
        )
        return _error(401, "GatedRepo", message, {"WWW-Authenticate": 'Bearer realm="hub"'})

    def _api_json(self, value: Any, extra: dict[str, str] | None = None) -> _Reply:
        body = json.dumps(value).encode()
        return _Reply(
            200,
            {"Content-Type": "application/json; charset=utf-8", **(extra or {})},
            body=body,
            faultable=self._faults.api,
        )

    def _tree(self, repo: Repo, revision: str, subpath: str, query: dict[str, str]) -> _Reply:
        entries = repo.tree_json(subpath, recursive=query.get("recursive") == "true")
        if entries is None:
            return _error(404, "EntryNotFound", f"{subpath} does not exist on {revision}")
        start = _decode_cursor(query.get("cursor"))
        size = self.tree_page_size or max(1, len(entries))
        headers: dict[str, str] = {}
        if start + size < len(entries):
            next_query = urllib.parse.urlencode({**query, "cursor": _encode_cursor(start + size)})
            path = (
                f"/api/models/{_quote_repo(repo.repo_id)}/tree/"
                f"{urllib.parse.quote(revision, safe='')}"
            )
            if subpath:
                path += "/" + urllib.parse.quote(subpath)
            headers["Link"] = f'<{self.endpoint}{path}?{next_query}>; rel="next"'
        return self._api_json(entries[start : start + size], headers)

    def _resolve(self, repo: Repo, path: str, range_header: str | None) -> _Reply:
        f = repo.files.get(path)
        if f is None:
            return _error(
                404,
                "EntryNotFound",
                f"{path} does not exist on the revision",
                {"X-Repo-Commit": repo.commit},
            )
        common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if not f.lfs:
            return self._too_large(f) or _file_reply(
                f, f"{repo.repo_id}/{f.path}", range_header, {**common, "ETag": f'"{f.git_oid}"'}
            )
        return _Reply(
            302,
            {
                **common,
                "Location": self._cdn_url(repo, f),
                "ETag": f'"{f.sha256}"',
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
            },
            faultable=True,
            path=f.path,
        )

    def _cdn_url(self, repo: Repo, f: RepoFile) -> str:
        expires = str(int(time.time()) + _URL_LIFETIME_S)
        target = f"/cdn/{_quote_repo(repo.repo_id)}/{repo.commit}/{urllib.parse.quote(f.path)}"
        signature = self._sign(repo.repo_id, repo.commit, f.path, expires)
        query = urllib.parse.urlencode({"expires": expires, "signature": signature})
        return f"{self._base(self._servers[-1])}{target}?{query}"

    def _sign(self, repo_id: str, commit: str, path: str, expires: str) -> str:
        message = f"{repo_id}\n{commit}\n{path}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def _cdn(self, segs: list[str], query: dict[str, str], range_header: str | None) -> _Reply:
        found = self._match_repo(segs)
        if found is None or len(found[1]) < 2:
            return _error(404, "EntryNotFound", "NoSuchKey")
        repo, (commit, *parts) = found
        path = "/".join(parts)
        expires = query.get("expires", "")
        signature = self._sign(repo.repo_id, commit, path, expires)
        if (
            not hmac.compare_digest(signature, query.get("signature", ""))
            or not expires.isdigit()
            or int(expires) < time.time()
        ):
            return _error(403, "AccessDenied", "Request has expired or its signature is wrong")
        f = repo.files.get(path)
        if commit != repo.commit or f is None:
            return _error(404, "EntryNotFound", "NoSuchKey")
        return self._too_large(f) or _file_reply(
            f,
            f"{repo.repo_id}/{f.path}",
            range_header,
            {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"},
        )

    def _too_large(self, f: RepoFile) -> _Reply | None:
        """The refusal of a file over ``plain_http_limit`` (the Hub's 50 GB: Xet only)."""
        limit = self.plain_http_limit
        if limit is None or f.size <= limit:
            return None
        reply = _error(
            400,
            "FileTooLarge",
            f"{f.path} is {f.size} bytes, over the {limit}-byte limit for plain HTTP "
            "downloads: download it with the Xet protocol",
        )
        reply.path = f.path
        return reply

    # ------------------------------------------------------------------------------ sending

    def _send(
        self, handler: _Handler, reply: _Reply, *, head: bool, fate: Fate, plan: FaultPlan
    ) -> int:
        """Write the reply; returns the body bytes sent. A cut sends ``cut_at`` body bytes and
        then closes the connection, as a dropped link would; a stall waits
        ``stall_seconds`` first (or until the hub closes).

        Counters are updated before the bytes leave (and corrected if the client goes away),
        so a client that has read a response always finds it counted."""
        handler.send_response(reply.status)
        length = reply.body_length
        for name, value in {**reply.headers, "Content-Length": str(length)}.items():
            handler.send_header(name, value)
        if reply.status >= 500:
            handler.send_header("Connection", "close")
        cut_at = fate.cut_at
        limit = 0 if head else length if cut_at is None else cut_at
        to_end = reply.file is not None and reply.start + reply.length == reply.file.size
        complete = not head and cut_at is None and to_end
        self._account(reply, limit, int(complete))
        sent = 0
        sending = reply.path if reply.file is not None and limit else None
        if sending is not None:
            with self._lock:
                self._bodies[handler.connection] = sending
        try:
            handler.end_headers()
            for chunk in self._body_chunks(reply, limit, corrupt=fate.corrupt and not head):
                handler.wfile.write(chunk)
                sent += len(chunk)
            if fate.stall and not head:
                handler.wfile.flush()
                if self._await_hangup(handler.connection, plan.faults.stall_seconds):
                    self._count("stalls_abandoned")
        except OSError:  # the client went away (or `cut` cut it)
            handler.close_connection = True
            self._account(reply, sent - limit, -int(complete))
            return sent
        finally:
            if sending is not None:
                with self._lock:
                    self._bodies.pop(handler.connection, None)
        if not head and cut_at is not None:
            handler.close_connection = True
            with suppress(OSError):
                handler.connection.shutdown(socket.SHUT_WR)
        return sent

    def _await_hangup(self, sock: socket.socket, seconds: float) -> bool:
        """Send nothing for up to ``seconds``; True if the client hung up meanwhile (close()
        shuts the socket down too, which ends the wait but is not the client's doing)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], left)
            if not readable or self._closing.is_set():
                return False
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    return True  # the client closed its end
            except OSError:
                return True  # or reset it
            time.sleep(min(left, 0.05))  # bytes from the client (a pipelined request): wait on
        return False

    def _account(self, reply: _Reply, nbytes: int, complete: int) -> None:
        with self._lock:
            if reply.key is not None:
                self._bytes[reply.key] += nbytes
                self._complete[reply.key] += complete
                if self._complete[reply.key] <= 0:
                    del self._complete[reply.key]
            else:
                self._counts["api_bytes"] += nbytes

    def _body_chunks(self, reply: _Reply, limit: int, *, corrupt: bool = False) -> Iterator[bytes]:
        """The body's first ``limit`` bytes, paced; ``corrupt`` flips the first of them."""
        chunks = self._paced_chunks(reply, limit)
        if corrupt:
            for first in chunks:
                yield bytes([first[0] ^ 0xFF]) + first[1:] if first else first
                break
        yield from chunks

    def _paced_chunks(self, reply: _Reply, limit: int) -> Iterator[bytes]:
        """The body in chunks, each sent at the limit in force then (`set_faults` can slow
        a body already under way)."""
        chunk = Pacer.chunk_size(self._faults.bytes_per_second, _CHUNK)
        if reply.file is None:
            for offset in range(0, limit, chunk):
                data = reply.body[offset : min(limit, offset + chunk)]
                self._pacer.wait(len(data), self._faults.bytes_per_second)
                yield data
            return
        with reply.file.local.open("rb") as f:
            f.seek(reply.start)
            remaining = limit
            while remaining > 0:
                data = f.read(min(chunk, remaining))
                if not data:
                    raise OSError(f"{reply.file.local} shrank while being served")
                self._pacer.wait(len(data), self._faults.bytes_per_second)
                remaining -= len(data)
                yield data

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    @staticmethod
    def _base(server: _Server) -> str:
        host, port = server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"


def _file_reply(f: RepoFile, key: str, range_header: str | None, headers: dict[str, str]) -> _Reply:
    headers = {"Content-Type": "application/octet-stream", **headers}
    wanted = _byte_range(range_header, f.size)
    if isinstance(wanted, str):  # "unsatisfiable"
        return _Reply(416, {**headers, "Content-Range": f"bytes */{f.size}"}, path=f.path)
    if wanted is None:
        return _Reply(
            200, headers, file=f, start=0, length=f.size, key=key, faultable=True, path=f.path
        )
    start, end = wanted
    headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
    return _Reply(
        206,
        headers,
        file=f,
        start=start,
        length=end - start + 1,
        key=key,
        faultable=True,
        path=f.path,
    )


def _byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """A single ``bytes=`` range as (first, last) inclusive; None to serve the whole file (no
    header, or one this server ignores, as RFC 9110 allows); "unsatisfiable" for 416."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[len("bytes=") :].strip().partition("-")
    if (
        not sep
        or not (first.isdigit() or last.isdigit())
        or (first and not first.isdigit())
        or (last and not last.isdigit())
    ):
        return None
    if not first:  # a suffix: the last N bytes
        if int(last) == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, end


def _error(status: int, code: str, message: str, extra: dict[str, str] | None = None) -> _Reply:
    body = json.dumps({"error": message}).encode()
    return _Reply(
        status,
        {
            "Content-Type": "application/json; charset=utf-8",
            "X-Error-Code": code,
            "X-Error-Message": message,
            **(extra or {}),
        },
        body=body,
    )


def _quote_repo(repo_id: str) -> str:
    return "/".join(urllib.parse.quote(p, safe="") for p in repo_id.split("/"))


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        offset = json.loads(base64.urlsafe_b64decode(cursor.encode()))["offset"]
    except (ValueError, KeyError, TypeError):
        return 0
    return offset if isinstance(offset, int) and offset >= 0 else 0
