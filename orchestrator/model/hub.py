"""Model metadata from the Hugging Face Hub without downloading weights.

Three small kinds of request, per FACTS.md:

* ``GET {endpoint}/api/models/{repo}/tree/{revision}?recursive=true`` — every file's size and,
  for LFS files, its sha256 (followed across pages by the ``Link: rel="next"`` header);
* ``GET {endpoint}/{repo}/resolve/{revision}/config.json`` and the index, whole;
* per weight file, ``Range: bytes=0-7`` then ``bytes=8-{8+N-1}``: the safetensors header.

The HTTP edge is one function (`Transport`: url, headers, byte limit → status, headers, body),
so tests swap it or point it at a local server. The default uses stdlib ``urllib``. A token
(``HF_TOKEN``) is sent as ``Authorization: Bearer`` to the endpoint only: it is dropped when a
redirect leaves the endpoint's host (the Hub redirects file reads to a CDN whose presigned URLs
must not carry it), and it never appears in a message. A server that ignores ``Range`` and
answers 200 is read only as far as needed, never to the end of a multi-GB file.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from orchestrator.errors import ModelError
from orchestrator.model.meta import (
    CONFIG_FILE,
    INDEX_FILE,
    ModelMeta,
    build_meta,
    parse_config,
    parse_weight_map,
)
from orchestrator.model.safetensors import PREFIX_BYTES, Header, header_length, parse_header

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 30.0
JSON_LIMIT = 64 * 2**20  # config, index and tree pages are small; anything bigger is wrong
ERROR_BODY_LIMIT = 4096
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


# (url, request headers, most body bytes to read) -> response; never raises for HTTP statuses.
Transport = Callable[[str, Mapping[str, str], int], HttpResponse]


@dataclass(frozen=True)
class HubFile:
    """A file as the tree API lists it."""

    path: str
    size: int
    sha256: str | None  # the LFS oid; None for small files kept in git
    git_sha1: str | None = None  # the git blob id (`oid`): the content's for files kept in git


class _SameHostAuthRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry the token to another host."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and (urllib.parse.urlsplit(newurl).netloc
                                != urllib.parse.urlsplit(req.full_url).netloc):
            new.remove_header("Authorization")
        return new


def urllib_transport(url: str, headers: Mapping[str, str], limit: int) -> HttpResponse:
    """The default `Transport`: stdlib urllib, redirects followed, at most ``limit`` bytes read."""
    opener = urllib.request.build_opener(_SameHostAuthRedirect)
    if not url.startswith(("https://", "http://")):
        raise ModelError(f"refusing to fetch {_public(url)}: the endpoint must be http(s)")
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 (checked above)
    try:
        with opener.open(request, timeout=TIMEOUT_S) as response:
            body = response.read(limit)
            expected = response.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and len(body) < min(int(expected),
                                                                              limit):
                raise TransientHubError(f"{_public(url)}: the body was cut short")
            return HttpResponse(response.status, dict(response.headers.items()), body)
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read(ERROR_BODY_LIMIT) if exc.fp is not None else b""
            return HttpResponse(exc.code, dict(exc.headers.items()) if exc.headers else {},
                                body)
    except http.client.HTTPException as exc:  # IncompleteRead: the connection was cut
        raise TransientHubError(f"{_public(url)}: {type(exc).__name__}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelError(f"cannot reach {_public(url)}: {reason}") from None


class TransientHubError(ModelError):
    """A response cut short: worth another try (the Hub and its CDN drop connections)."""


RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
ATTEMPTS = 8


@dataclass(frozen=True)
class HubClient:
    """Where and how to ask: endpoint, token, transport. Holds no state between calls."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    transport: Transport = urllib_transport

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": "orch-placement", **(extra or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _get(self, url: str, what: str, repo: str, extra: Mapping[str, str] | None = None,
             limit: int = JSON_LIMIT) -> HttpResponse:
        for attempt in range(ATTEMPTS):
            try:
                response = self.transport(url, self._headers(extra), limit)
            except TransientHubError:
                if attempt == ATTEMPTS - 1:
                    raise
                time.sleep(min(2.0, 0.1 * 2**attempt))
                continue
            if response.status not in RETRY_STATUSES or attempt == ATTEMPTS - 1:
                break
            time.sleep(min(2.0, 0.1 * 2**attempt))
        if response.status in (200, 206):
            return response
        if response.status in (401, 403):
            hint = ("HF_TOKEN was sent and refused" if self.token
                    else "the repository may be gated or private; set HF_TOKEN")
            raise ModelError(f"{repo}: the Hub refused access to {what} "
                             f"(HTTP {response.status}); {hint}")
        if response.status == 404:
            raise ModelError(f"{repo}: {what} not found on the Hub ({_public(url)})")
        raise ModelError(f"{repo}: the Hub answered HTTP {response.status} for {what} "
                         f"({_public(url)})")

    def tree(self, repo: str, revision: str) -> dict[str, HubFile]:
        """Every file of the repository at ``revision``, by path."""
        url: str | None = (f"{self.endpoint}/api/models/{_quote_repo(repo)}/tree/"
                           f"{_quote(revision)}?recursive=true")
        files: dict[str, HubFile] = {}
        while url:
            response = self._get(url, f"the file list of revision {revision!r}", repo)
            try:
                entries = json.loads(response.body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ModelError(f"{repo}: the Hub's file list is not JSON") from None
            if not isinstance(entries, list):
                raise ModelError(f"{repo}: the Hub's file list is not a JSON list")
            for entry in entries:
                parsed = _hub_file(entry)
                if parsed is not None:
                    files[parsed.path] = parsed
            url = _next_page(response.headers, self.endpoint)
        return files

    def revision_sha(self, repo: str, revision: str) -> str:
        """The commit sha a branch or tag names now (what a sync pins)."""
        url = f"{self.endpoint}/api/models/{_quote_repo(repo)}/revision/{_quote(revision)}"
        response = self._get(url, f"revision {revision!r}", repo)
        try:
            sha = json.loads(response.body).get("sha")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            sha = None
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise ModelError(f"{repo}: the Hub's answer for revision {revision!r} has no sha")
        return sha

    def resolve_url(self, repo: str, revision: str, path: str) -> str:
        """Where a file's bytes are (the Hub may redirect it to a CDN)."""
        return self._resolve(repo, revision, path)

    def read(self, repo: str, revision: str, path: str) -> bytes:
        """A small file, whole."""
        return self._get(self._resolve(repo, revision, path), path, repo).body

    def read_range(self, repo: str, revision: str, path: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``; copes with servers that ignore Range."""
        url = self._resolve(repo, revision, path)
        end = start + length - 1
        response = self._get(url, path, repo, {"Range": f"bytes={start}-{end}"},
                             limit=start + length)
        body = response.body[:length] if response.status == 206 else \
            response.body[start:start + length]
        if len(body) != length:
            raise ModelError(f"{repo}: {path} ended after {start + len(body)} bytes while "
                             f"reading its safetensors header (needed {start + length})")
        return body

    def header(self, repo: str, revision: str, path: str) -> Header:
        """A weight file's safetensors header: two Range reads."""
        where = f"{repo}/{path}"
        length = header_length(self.read_range(repo, revision, path, 0, PREFIX_BYTES), where)
        raw = self.read_range(repo, revision, path, PREFIX_BYTES, length)
        return parse_header(raw, where)

    def _resolve(self, repo: str, revision: str, path: str) -> str:
        return (f"{self.endpoint}/{_quote_repo(repo)}/resolve/{_quote(revision)}/"
                f"{urllib.parse.quote(path, safe='/')}")


def load_hub_meta(repo: str, revision: str | None = None, *,
                  client: HubClient | None = None, workers: int = 8) -> ModelMeta:
    """Measure a Hub model: tree, config, index, then every weight file's header."""
    client = client or HubClient()
    revision = revision or "main"
    tree = client.tree(repo, revision)
    if CONFIG_FILE not in tree:
        raise ModelError(f"{repo}@{revision}: has no {CONFIG_FILE}")
    config = parse_config(client.read(repo, revision, CONFIG_FILE), f"{repo}/{CONFIG_FILE}")
    if INDEX_FILE in tree:
        index = parse_weight_map(client.read(repo, revision, INDEX_FILE),
                                 f"{repo}/{INDEX_FILE}")
        weight_map: dict[str, str] | None = index
        names = sorted(set(index.values()))
        missing = [name for name in names if name not in tree]
        if missing:
            raise ModelError(f"{repo}@{revision}: {INDEX_FILE} names {len(missing)} weight "
                             f"file{'s' if len(missing) != 1 else ''} the repository does not "
                             f"have: {', '.join(missing[:10])}")
    else:
        weight_map = None
        names = sorted(p for p in tree if re.fullmatch(r"model[^/]*\.safetensors", p))
        if not names:
            raise ModelError(f"{repo}@{revision}: no {INDEX_FILE} and no model*.safetensors")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        headers = dict(zip(names, pool.map(lambda n: client.header(repo, revision, n), names),
                           strict=True))
    for name, header in headers.items():
        if tree[name].size < header.file_bytes:
            raise ModelError(f"{repo}@{revision}: {name} is {tree[name].size} bytes on the Hub "
                             f"but its header describes {header.file_bytes}")
    if weight_map is None:
        weight_map = {t.name: name for name, h in headers.items() for t in h.tensors}
    return build_meta(
        f"{repo}@{revision}", config, weight_map, headers,
        sizes={name: tree[name].size for name in names},
        sha256={name: sha for name in names if (sha := tree[name].sha256)})


def _hub_file(entry: Any) -> HubFile | None:
    if not isinstance(entry, dict) or entry.get("type", "file") != "file":
        return None
    path, size = entry.get("path"), entry.get("size")
    if not isinstance(path, str) or not isinstance(size, int):
        return None
    lfs = entry.get("lfs")
    sha = lfs.get("oid") if isinstance(lfs, dict) else None
    oid = entry.get("oid")
    return HubFile(path=path, size=size, sha256=sha if isinstance(sha, str) else None,
                   git_sha1=oid if isinstance(oid, str) else None)


def _next_page(headers: Mapping[str, str], endpoint: str) -> str | None:
    link = next((v for k, v in headers.items() if k.lower() == "link"), None)
    match = _NEXT_LINK.search(link) if link else None
    if not match:
        return None
    return str(urllib.parse.urljoin(endpoint + "/", match.group(1)))


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _quote_repo(repo: str) -> str:
    return "/".join(_quote(p) for p in repo.split("/"))


def _public(url: str) -> str:
    """A URL fit for a message: no query string (it may carry signatures)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
