"""Move one file over HTTP, resumably and verifiably, from the Hub or from a peer on the LAN.

Runs on the nodes, inside the agent: stdlib only, Python >= 3.9, no imports from the rest of
orch (the file may be shipped on its own or next to ``agent.py``).

`fetch` is the only way model bytes reach a node, whoever serves them — the Hub (whose file
reads redirect to a CDN) or a peer running `serve_files` — so resume, retries and
verification live in one place:

* bytes go to ``<dest>.partial`` (locked against a second fetch of the same file); a partial
  left by an earlier run is re-hashed and continued with ``Range: bytes=<have>-``, and every
  cut connection is continued the same way, so no byte is downloaded twice unless the server
  ignores Range or the bytes turn out to be wrong;
* failures that may pass (connection errors, short reads, timeouts, 408/429/5xx) are retried
  with exponential backoff and full jitter, waiting at least what ``Retry-After`` asks;
* the file is renamed into place only when its size and sha256 match (and its git blob id,
  when given: for a file kept in git rather than LFS, the Hub's tree gives only that, so
  ``sha256`` may be None and the result reports the sha256 the peers will check); a mismatch
  discards the partial's bytes, is counted, and the file is fetched once more from zero
  before `IntegrityError` is raised (and the partial deleted).

Secrets: header values (the Hub token, the per-run peer token) never appear in an exception,
a result or a file. Messages are built from the URL without its query and user info, status
codes and reasons; every message is scrubbed of header values anyway, and exceptions are
raised ``from None`` so no lower-level exception (which might quote a header) rides along.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH100, PTH103, PTH105, PTH108, PTH119, PTH120, PTH123
import contextlib
import fcntl
import hashlib
import hmac
import http.client
import os
import random
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FetchResult",
    "IntegrityError",
    "PeerServer",
    "TransferError",
    "fetch",
    "serve_files",
]

CHUNK = 1 << 20
PARTIAL_SUFFIX = ".partial"
MAX_REDIRECTS = 10
RETRY_AFTER_CAP_S = 300.0  # a server asking for longer is treated as asking for this
USER_AGENT = "orch-agent"
RELAY_POLL_S = 0.02  # how often a relayed partial is checked for new bytes
RELAY_STALL_S = 90.0  # a partial that has not grown for this long is given up on (> the
# Hub read timeout, so a relaying node waits out its own source's silence first)
RELAY_OPEN_WAIT_S = 5.0  # how long a relay waits for the fetch to create its partial
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})

Progress = Callable[[int, int], None]  # (bytes present, file size)


class TransferError(Exception):
    """A file could not be fetched. The message names the file and URL, never a header value.

    ``status`` is the last HTTP status seen (None for a network failure)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class IntegrityError(TransferError):
    """The bytes did not match the expected hash, even when fetched again from zero."""


@dataclass(frozen=True)
class FetchResult:
    """What one `fetch` did.

    ``bytes_downloaded + bytes_resumed - size`` is the waste: bytes fetched twice because a
    server ignored Range or the content had to be fetched again after a mismatch."""

    path: str
    size: int
    sha256: str  # of the verified bytes now at ``path``
    bytes_downloaded: int  # body bytes received in this call, every attempt included
    bytes_resumed: int  # bytes kept from a partial left by an earlier run
    requests: int  # GETs sent, redirects included
    retries: int  # failed attempts that were retried
    mismatches: int  # times the finished bytes did not match the expected hash
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Retry(Exception):
    """An attempt failed in a way that may pass; ``retry_after`` is the server's wish (s);
    ``restart``: the partial cannot be continued from this server, so start from zero."""

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        *,
        restart: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.restart = restart
        self.status = status


# ------------------------------------------------------------------------------------- fetch


def fetch(
    url: str,
    dest: str,
    *,
    sha256: str | None,
    size: int,
    git_sha1: str | None = None,
    headers: Mapping[str, str] | None = None,
    retries: int = 8,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    max_attempts: int = 100,
    progress: Progress | None = None,
    timeout: float = 60.0,
    rng: random.Random | None = None,
) -> FetchResult:
    """Download ``url`` to ``dest``, resuming ``dest + ".partial"``; see the module docstring.

    ``retries`` is how many attempts in a row may fail without receiving a byte (an attempt
    that made progress resets the count, so a long file over a flaky link is not doomed by its
    length); ``max_attempts`` bounds the requests for one file regardless. ``git_sha1`` (the
    Hub's ``oid`` for a file kept in git rather than LFS) is checked too when given; ``sha256``
    may then be None, and the result's ``sha256`` is that of the verified bytes.
    """
    _check_args(url, sha256, size, git_sha1, retries, max_attempts)
    job = _Job(url, dest, size, dict(headers or {}), timeout)
    started = time.monotonic()
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(directory, exist_ok=True)
        partial = _Partial(dest + PARTIAL_SUFFIX, size, git_sha1 is not None, job)
    except OSError as exc:
        raise job.error(f"cannot create {dest}{PARTIAL_SUFFIX}: {exc.strerror or exc}") from None
    try:
        _check_space(directory, size - partial.have, job)
        if progress is not None:
            progress(partial.have, size)
        stats = _download(
            job,
            partial,
            sha256,
            git_sha1,
            retries,
            (backoff, max_backoff),
            max_attempts,
            progress,
            rng or random.Random(),  # noqa: S311 (jitter, not secrets)
        )
        partial.commit(dest)
    except IntegrityError:
        os.unlink(partial.path)  # the bytes are wrong: nothing in them is worth resuming
        raise
    except OSError as exc:  # the local side: disk full, permissions, a vanished directory
        partial.drop_if_empty()
        raise job.error(f"cannot write {partial.path}: {exc.strerror or exc}") from None
    except BaseException:
        # A failure that kept no byte (a 404, a refused token, a progress deadline hit at
        # once) leaves nothing to resume: an empty partial would only be litter.
        partial.drop_if_empty()
        raise
    finally:
        partial.close()
    return FetchResult(
        path=dest,
        size=size,
        sha256=partial.sha256.hexdigest(),
        bytes_downloaded=partial.downloaded,
        bytes_resumed=partial.resumed,
        requests=job.requests,
        retries=stats[0],
        mismatches=stats[1],
        seconds=round(time.monotonic() - started, 3),
    )


class _Job:
    """One fetch's fixed inputs, and the only place that turns failures into messages."""

    def __init__(
        self, url: str, dest: str, size: int, headers: dict[str, str], timeout: float
    ) -> None:
        self.url, self.dest, self.size, self.timeout = url, dest, size, timeout
        self.headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        self.secrets = _secret_values(headers)
        self.requests = 0
        for name, value in self.headers.items():
            if any(c in name + value for c in "\r\n\0"):
                raise self.error(f"header {name!r} has a line break or NUL in its value")

    def error(
        self, message: str, status: int | None = None, kind: type[TransferError] = TransferError
    ) -> TransferError:
        text = f"{os.path.basename(self.dest)}: {message}"
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return kind(text, status)


def _check_args(
    url: str, sha256: str | None, size: int, git_sha1: str | None, retries: int, max_attempts: int
) -> None:
    if sha256 is None and git_sha1 is None:
        raise ValueError("give sha256, git_sha1 or both: a file is never taken unverified")
    if sha256 is not None and not _is_hex(sha256, 64):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    if git_sha1 is not None and not _is_hex(git_sha1, 40):
        raise ValueError("git_sha1 must be 40 lowercase hex digits")
    if size < 0 or retries < 0 or max_attempts < 1:
        raise ValueError("size and retries must be >= 0, max_attempts >= 1")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError("url must be http or https")


def _download(
    job: _Job,
    partial: _Partial,
    sha256: str | None,
    git_sha1: str | None,
    retries: int,
    backoff: tuple[float, float],
    max_attempts: int,
    progress: Progress | None,
    rng: random.Random,
) -> tuple[int, int]:
    """The attempt loop; returns (retries, mismatches) once the partial holds the right bytes."""
    retried = mismatches = failures_in_a_row = attempts = 0
    while True:
        if partial.have == job.size:
            if partial.matches(sha256, git_sha1):
                return retried, mismatches
            mismatches += 1
            partial.reset()
            if mismatches > 1:
                raise job.error(
                    f"content does not match its hash, even fetched again from zero "
                    f"({_public(job.url)})",
                    kind=IntegrityError,
                )
            continue
        if attempts >= max_attempts:
            raise job.error(f"gave up after {attempts} attempts ({_public(job.url)})")
        attempts += 1
        before = partial.have
        try:
            _attempt(job, partial, progress)
        except _Retry as failure:
            if failure.restart:
                partial.reset()
            partial.sync()
            failures_in_a_row = 0 if partial.have > before else failures_in_a_row + 1
            if failures_in_a_row > retries:
                raise job.error(
                    f"{failure.reason} (gave up after {failures_in_a_row} failed attempts "
                    "in a row)",
                    failure.status,
                ) from None
            retried += 1
            time.sleep(_delay(failures_in_a_row, backoff, failure.retry_after, rng))


def _delay(
    failures_in_a_row: int,
    backoff: tuple[float, float],
    retry_after: float | None,
    rng: random.Random,
) -> float:
    """Full jitter (uniform in [0, base * 2^n], capped), but never sooner than Retry-After."""
    base, cap = backoff
    jittered = rng.uniform(0, min(cap, base * 2 ** max(0, failures_in_a_row - 1)))
    if retry_after is None:
        return jittered
    return max(jittered, min(retry_after, RETRY_AFTER_CAP_S))


def _attempt(job: _Job, partial: _Partial, progress: Progress | None) -> None:
    """One GET (following redirects) continuing the partial; raises `_Retry` or a failure."""
    headers = dict(job.headers)
    if partial.have:
        headers["Range"] = f"bytes={partial.have}-"
    conn, response, final_url = _open(job, headers)
    try:
        start = _body_start(job, response, final_url, partial.have)
        if start != partial.have:  # the server ignored Range (or restarted us): start over
            partial.reset()
        _receive(job, response, partial, progress)
    finally:
        response.close()
        conn.close()


def _open(
    job: _Job,
    headers: dict[str, str],
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """Send the GET, following redirects. The token goes only to the host it was given for:
    a redirect to another host or to plain http drops ``Authorization`` (the Hub's CDN URLs
    are presigned, and must not carry it)."""
    url = job.url
    for _ in range(MAX_REDIRECTS + 1):
        conn = _connection(url, job.timeout)
        job.requests += 1
        try:
            target = urllib.parse.urlsplit(url)
            path = target.path or "/"
            conn.request(
                "GET", path + ("?" + target.query if target.query else ""), headers=headers
            )
            response = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:  # will not pass by retrying
            conn.close()
            raise job.error(f"cannot verify {_public(url)}: {exc.verify_message}") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _Retry(f"cannot reach {_public(url)}: {_reason(exc)}") from None
        location = response.getheader("Location")
        if response.status not in REDIRECT_STATUS or not location:
            return conn, response, url
        response.close()
        conn.close()
        new_url = urllib.parse.urljoin(url, location)
        if urllib.parse.urlsplit(new_url).scheme not in ("http", "https"):
            raise job.error(f"{_public(url)} redirects to a non-http URL", response.status)
        if not _same_origin(url, new_url):
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = new_url
    raise job.error(f"more than {MAX_REDIRECTS} redirects from {_public(job.url)}")


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    return http.client.HTTPConnection(host, parts.port, timeout=timeout)


def _body_start(job: _Job, response: http.client.HTTPResponse, url: str, have: int) -> int:
    """Where the response's body starts in the file, after checking status and lengths."""
    status = response.status
    where = _public(url)
    if status == 200:
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) != job.size:
            raise job.error(f"{where} has {length} bytes, expected {job.size}", status)
        return 0
    if status == 206:
        first, total = _content_range(response.getheader("Content-Range"))
        if total is not None and total != job.size:
            raise job.error(f"{where} has {total} bytes, expected {job.size}", status)
        if first not in (have, 0):  # 0: the server restarted us; taken like a 200
            raise _Retry(f"{where} answered bytes from {first}, asked for {have}", restart=True)
        return first
    if status == 416:
        raise _Retry(f"{where} cannot serve from byte {have} (HTTP 416)", restart=True)
    if status in RETRYABLE_STATUS:
        raise _Retry(
            f"{where} answered HTTP {status}",
            _retry_after(response.getheader("Retry-After")),
            status=status,
        )
    hint = ""
    if status in (401, 403):
        hint = (
            "; the token was refused"
            if "authorization" in {k.lower() for k in job.headers}
            else "; the file needs a token (HF_TOKEN) or is not public"
        )
    code = response.getheader("X-Error-Code")
    # The Hub says why in X-Error-Message (e.g. a file over the plain-HTTP size limit); a
    # message passes through job.error, which removes header values such as the token.
    said = (response.getheader("X-Error-Message") or "").strip()[:300]
    raise job.error(
        f"{where} answered HTTP {status}" + (f" ({code})" if code else "")
        + (f": {said}" if said else "") + hint,
        status,
    )


def _receive(
    job: _Job, response: http.client.HTTPResponse, partial: _Partial, progress: Progress | None
) -> None:
    """Append the body to the partial until the file is complete; a short body is a retry."""
    while partial.have < job.size:
        try:
            data = response.read(min(CHUNK, job.size - partial.have))
        except (OSError, http.client.HTTPException) as exc:
            raise _Retry(
                f"connection lost after {partial.have} of {job.size} bytes: {_reason(exc)}"
            ) from None
        if not data:
            raise _Retry(f"connection closed after {partial.have} of {job.size} bytes")
        partial.append(data)
        if progress is not None:
            progress(partial.have, job.size)


# ----------------------------------------------------------------------------------- partial


class _Partial:
    """``<dest>.partial``, locked against a second fetch, and the running hashes of exactly
    the bytes it holds (so verifying a resumed file reads only the prefix, once)."""

    def __init__(self, path: str, size: int, with_git: bool, job: _Job) -> None:
        self.path, self.size, self.with_git = path, size, with_git
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise job.error("another fetch of this file is running") from None
        self.file = os.fdopen(fd, "r+b")
        self.downloaded = 0
        self._rehash(os.fstat(fd).st_size)
        self.resumed = self.have

    def _new_hashes(self) -> None:
        self.sha256 = hashlib.sha256()
        blob = f"blob {self.size}\0".encode() if self.with_git else b""
        self.git = hashlib.sha1(blob)  # noqa: S324 (git's object id, not security)
        self.have = 0

    def _rehash(self, on_disk: int) -> None:
        """Hash the prefix already on disk; a partial longer than the file is worthless."""
        self._new_hashes()
        if on_disk > self.size:
            on_disk = 0
        self.file.seek(0)
        while self.have < on_disk:
            data = self.file.read(min(CHUNK, on_disk - self.have))
            if not data:
                break
            self._hash(data)
        self.file.truncate(self.have)

    def _hash(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.with_git:
            self.git.update(data)
        self.have += len(data)

    def append(self, data: bytes) -> None:
        self.file.seek(self.have)
        self.file.write(data)
        self._hash(data)
        self.downloaded += len(data)

    def reset(self) -> None:
        self.file.seek(0)
        self.file.truncate(0)
        self._new_hashes()

    def matches(self, sha256: str | None, git_sha1: str | None) -> bool:
        if sha256 is not None and not hmac.compare_digest(self.sha256.hexdigest(), sha256):
            return False
        return git_sha1 is None or hmac.compare_digest(self.git.hexdigest(), git_sha1)

    def sync(self) -> None:
        """Make what arrived durable, so a crash loses at most the last unsynced attempt."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def commit(self, dest: str) -> None:
        """fsync, rename into place (atomic on one filesystem), fsync the directory."""
        self.file.truncate(self.have)
        self.sync()
        os.replace(self.path, dest)
        dirfd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def drop_if_empty(self) -> None:
        """Delete the partial when it holds no byte (still under our lock, so no other
        fetch is writing it)."""
        if self.have == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def close(self) -> None:
        self.file.close()  # releases the lock


def _check_space(directory: str, needed: int, job: _Job) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise job.error(f"needs {needed} more bytes in {directory}, only {free} free")


# ----------------------------------------------------------------------------------- helpers


def _is_hex(value: Any, length: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    )


def _secret_values(headers: Mapping[str, str]) -> list[str]:
    """Every header value the caller gave, and each credential without its scheme word."""
    found: set[str] = set()
    for value in headers.values():
        found.add(value)
        scheme, _, credential = value.partition(" ")
        if credential.strip() and scheme.isalpha():
            found.add(credential.strip())
    return sorted((v for v in found if len(v) >= 6), key=len, reverse=True)


def _public(url: str) -> str:
    """A URL fit for a message: no user info, no query (presigned URLs carry signatures)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def _reason(exc: BaseException) -> str:
    """A short, header-free reason: the exception's type and (for OS errors) its strerror."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes first-last/total``; total None when ``*``."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    first = span.partition("-")[0].strip()
    return (
        int(first) if first.isdigit() else None,
        int(total) if total.strip().isdigit() else None,
    )


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, from either of its forms (delta-seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------- peer server


def serve_files(bind_host: str, port: int, files: Mapping[str, str], token: str,
                growing: Mapping[str, int] | None = None) -> PeerServer:
    """Serve verified files to peers: the LAN leg of the sync, so a file leaves the Hub once.

    Only the listed ``{url_path: local_path}`` files, only to requests bearing the per-run
    ``token`` (everything else is 401, before any path is looked at, so a stranger learns
    nothing), with Range support so `fetch` resumes from a peer exactly as from the Hub. The
    server runs on a daemon thread until `PeerServer.close`.

    ``growing`` (``{url_path: size}``): files this node is fetching itself. Until one is in
    place it is relayed from its ``.partial`` as the bytes arrive (cut-through, not
    store-and-forward: a chain of copies costs one file's transfer time, not one per hop).
    The prefix relayed is not verified on its own (the manifest has one sha256 per file):
    every receiver checks the whole file's sha256 before using it, as from any source, and a
    partial that is cut back or dropped (its fetch restarted or failed) ends the response.
    """
    server = PeerServer(bind_host, port, files, token, growing)
    server.start()
    return server


class PeerServer(ThreadingHTTPServer):
    """The server `serve_files` returns; ``url`` is its base URL, counters are per URL path."""

    daemon_threads = True

    def __init__(self, bind_host: str, port: int, files: Mapping[str, str], token: str,
                 growing: Mapping[str, int] | None = None) -> None:
        if len(token) < 16:
            raise ValueError("the peer token must be at least 16 characters")
        if not all(p.startswith("/") for p in files):
            raise ValueError("file URL paths must start with '/'")
        if ":" in bind_host:
            self.address_family = socket.AF_INET6
        self.files = dict(files)
        self.growing = {p: n for p, n in (growing or {}).items() if p in self.files}
        self.relayed = 0  # responses served (at least partly) from a growing partial
        self._authorization = f"Bearer {token}".encode()
        self.lock = threading.Lock()
        self.requests = 0
        self.refused = 0
        self.bytes_served: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        super().__init__((bind_host, port), _PeerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.1,), name="orch-peer", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def authorized(self, header: str | None) -> bool:
        given = (header or "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self._authorization)

    def note_request(self, *, refused: bool) -> None:
        with self.lock:
            self.requests += 1
            self.refused += int(refused)

    def note_bytes(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.bytes_served[path] = self.bytes_served.get(path, 0) + nbytes


class _PeerHandler(BaseHTTPRequestHandler):
    server: PeerServer
    protocol_version = "HTTP/1.1"
    timeout = 120  # a stalled peer holds a thread at most this long

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # a peer that hangs up is not news
            super().handle()

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the agent's stdout is its JSON answer, and its stderr is not a log."""

    def _serve(self, body: bool) -> None:
        allowed = self.server.authorized(self.headers.get("Authorization"))
        self.server.note_request(refused=not allowed)
        if not allowed:
            self._empty(401, {"WWW-Authenticate": "Bearer"})
            return
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        local = self.server.files.get(path)
        size = self.server.growing.get(path)
        f = _open_served(local, size)
        if f is None:
            self._empty(404)
            return
        with f:
            if size is not None and os.fstat(f.fileno()).st_size < size:
                with self.server.lock:
                    self.server.relayed += 1
                self._send_growing(path, f, size, body)
            else:
                self._send_file(path, f, body)

    def _answer_range(self, size: int) -> tuple[int, int] | None:
        """The headers for the request's Range of a ``size``-byte file; the byte span to send
        (inclusive), or None when the range was unsatisfiable (answered 416)."""
        wanted = _parse_range(self.headers.get("Range"), size)
        if wanted is None:
            self._empty(416, {"Content-Range": f"bytes */{size}"})
            return None
        start, end, ranged = wanted
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        return start, end

    def _send_growing(self, path: str, f: Any, size: int, body: bool) -> None:
        """Send ``f`` (a partial being written by this node's own fetch, or the file it was
        renamed to: the same inode) as if it were ``size`` bytes, each byte once it exists."""
        span = self._answer_range(size)
        if span is None:
            return
        start, end = span
        if not body:
            return
        position, idle_since = start, time.monotonic()
        try:
            while position <= end:
                st = os.fstat(f.fileno())
                if st.st_size > position:
                    sent = self.connection.sendfile(
                        f, offset=position, count=min(st.st_size, end + 1) - position)
                    self.server.note_bytes(path, sent)
                    position += sent
                    idle_since = time.monotonic()
                    continue
                if st.st_nlink == 0 or st.st_size < position or \
                        time.monotonic() - idle_since > RELAY_STALL_S:
                    break  # dropped, restarted, or stuck upstream: the receiver resumes elsewhere
                time.sleep(RELAY_POLL_S)
        except OSError:
            pass
        if position <= end:
            self.close_connection = True

    def _send_file(self, path: str, f: Any, body: bool) -> None:
        size = os.fstat(f.fileno()).st_size
        span = self._answer_range(size)
        if span is None:
            return
        start, end = span
        if not body or end < start:
            return
        try:
            sent = self.connection.sendfile(f, offset=start, count=end - start + 1)
        except OSError:
            self.close_connection = True
            return
        self.server.note_bytes(path, sent)

    def _empty(self, status: int, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _open_served(local: str | None, growing: int | None) -> Any:
    """The file to serve, open: the file in place, else (for a file this node is fetching)
    its partial, waiting a while for the fetch to create it; None: nothing to serve."""
    if local is None:
        return None
    deadline = time.monotonic() + (RELAY_OPEN_WAIT_S if growing is not None else 0)
    while True:
        for candidate in (local, local + PARTIAL_SUFFIX) if growing is not None else (local,):
            try:
                return open(candidate, "rb")  # the caller closes it
            except OSError:
                pass
        if time.monotonic() > deadline:
            return None
        time.sleep(RELAY_POLL_S)


def _parse_range(header: str | None, size: int) -> tuple[int, int, bool] | None:
    """(first, last, is a range) to send for a Range header: the whole file when there is none
    or it is not a single byte range (RFC 9110 lets a server ignore it); None: unsatisfiable."""
    whole = (0, size - 1, False)
    if not header or not header.startswith("bytes=") or "," in header:
        return whole
    first, sep, last = header[len("bytes=") :].strip().partition("-")
    if not sep or not (first + last).isdigit():
        return whole
    if not first:
        n = int(last)
        return (max(0, size - n), size - 1, True) if n and size else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        return None
    return (start, end, True) if start <= end else whole
