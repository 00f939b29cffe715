"""Hub metadata over real HTTP: a minimal local Hub (tree API + resolve with Range).

The server is deliberately small — just what placement reads — and lives here; the reusable
test Hub with fault injection belongs to the sync's tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from orchestrator.config import ModelSpec
from orchestrator.errors import ModelError
from orchestrator.model.hub import HubClient, load_hub_meta
from orchestrator.model.meta import ModelMeta, load_local_meta
from orchestrator.placement import load_model_meta
from tests.fixtures.tiny_model import make_tiny_deepseek

REPO = "mlx-community/DeepSeek-R1-4bit"
TOKEN = "hf_s3cr3t_t0k3n"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    sent: int = 0


@dataclass
class MiniHub:
    """Serves ``root`` as revision ``main`` of ``repo``."""

    root: Path
    repo: str = REPO
    token: str | None = None
    ignore_range: bool = False
    page_size: int | None = None
    redirect_files_to: str | None = None  # base URL of another MiniHub
    hidden: frozenset[str] = frozenset()
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir()
                      if p.is_file() and p.name not in self.hidden)


def _handler(hub: MiniHub) -> type[BaseHTTPRequestHandler]:
    tree = re.compile(rf"^/api/models/{re.escape(hub.repo)}/tree/main$")
    resolve = re.compile(rf"^/{re.escape(hub.repo)}/resolve/main/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            request = Request(self.path, dict(self.headers.items()))
            hub.requests.append(request)
            url = urlsplit(self.path)
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._send(401, b'{"error": "unauthorized"}', request)
            elif tree.match(url.path):
                self._tree(request, int(parse_qs(url.query).get("cursor", ["0"])[0]))
            elif (m := resolve.match(url.path)) and (hub.root / m.group(1)).is_file() \
                    and m.group(1) not in hub.hidden:
                if hub.redirect_files_to and m.group(1).endswith(".safetensors"):
                    self.send_response(302)
                    self.send_header("Location", hub.redirect_files_to + url.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._file(hub.root / m.group(1), request)
            else:
                self._send(404, b'{"error": "not found"}', request)

        def _tree(self, request: Request, cursor: int) -> None:
            files = hub.files()
            page = files[cursor:cursor + hub.page_size] if hub.page_size else files
            entries = []
            for p in page:
                size = p.stat().st_size
                entry: dict[str, object] = {"type": "file", "path": p.name, "size": size,
                                            "oid": hashlib.sha256(p.name.encode()).hexdigest()[:40]}
                if p.suffix == ".safetensors":  # a stand-in oid: never hash a sparse 5 GB file
                    entry["lfs"] = {"oid": hashlib.sha256(p.name.encode()).hexdigest(),
                                    "size": size}
                entries.append(entry)
            extra = {}
            if hub.page_size and cursor + hub.page_size < len(files):
                extra["Link"] = (f"<{hub.url}/api/models/{hub.repo}/tree/main?recursive=true"
                                 f"&cursor={cursor + hub.page_size}>; rel=\"next\"")
            self._send(200, json.dumps(entries).encode(), request, extra)

        def _file(self, path: Path, request: Request) -> None:
            size = path.stat().st_size
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            if match and not hub.ignore_range:
                start, end = int(match.group(1)), min(int(match.group(2)), size - 1)
                with path.open("rb") as f:
                    f.seek(start)
                    body = f.read(end - start + 1)
                self._send(206, body, request, {"Content-Range": f"bytes {start}-{end}/{size}"})
            else:
                self._send(200, path.read_bytes(), request)

        def _send(self, status: int, body: bytes, request: Request,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
                request.sent += len(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client read what it needed and hung up

    return Handler


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[ThreadingHTTPServer] = []

    def start(hub: MiniHub) -> MiniHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        server.daemon_threads = True
        hub.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return hub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "tiny", n_layers=3, n_files=3)


def same_shape(a: ModelMeta, b: ModelMeta) -> None:
    assert a.layers == b.layers and a.shared == b.shared and a.num_layers == b.num_layers
    assert [(f.name, f.size, f.layers, f.shared) for f in a.files] == \
        [(f.name, f.size, f.layers, f.shared) for f in b.files]


def test_hub_meta_equals_local_meta_reading_only_headers(
        serve: object, deepseek_dir: Path, deepseek_meta: ModelMeta) -> None:
    hub = serve(MiniHub(deepseek_dir))  # type: ignore[operator]
    meta = load_hub_meta(REPO, "main", client=HubClient(endpoint=hub.url))
    same_shape(meta, deepseek_meta)
    assert meta.source == f"{REPO}@main"
    assert all(f.sha256 for f in meta.files)  # the LFS oids, for the sync to verify
    ranges = [r for r in hub.requests if "Range" in r.headers]
    assert len(ranges) == 2 * 88  # the 8-byte prefix, then the JSON, per file
    assert sum(r.sent for r in hub.requests) < 2_000_000  # headers only, of 420 GB


def test_token_is_sent_and_never_shown(serve: object, tiny_dir: Path) -> None:
    hub = serve(MiniHub(tiny_dir, token=TOKEN))  # type: ignore[operator]
    meta = load_hub_meta(REPO, client=HubClient(endpoint=hub.url, token=TOKEN))
    same_shape(meta, load_local_meta(tiny_dir))
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    with pytest.raises(ModelError, match="set HF_TOKEN") as missing:
        load_hub_meta(REPO, client=HubClient(endpoint=hub.url))
    with pytest.raises(ModelError, match="HF_TOKEN was sent and refused") as wrong:
        load_hub_meta(REPO, client=HubClient(endpoint=hub.url, token=TOKEN + "x"))
    for error in (missing, wrong):
        assert TOKEN not in str(error.value) and TOKEN not in repr(error.value)


def test_the_token_does_not_follow_a_redirect_to_another_host(
        serve: object, tiny_dir: Path) -> None:
    cdn = serve(MiniHub(tiny_dir))  # type: ignore[operator]
    hub = serve(MiniHub(tiny_dir, token=TOKEN,  # type: ignore[operator]
                        redirect_files_to=cdn.url.replace("127.0.0.1", "localhost")))
    meta = load_hub_meta(REPO, client=HubClient(endpoint=hub.url, token=TOKEN))
    same_shape(meta, load_local_meta(tiny_dir))
    assert cdn.requests and all("Authorization" not in r.headers for r in cdn.requests)
    assert all("Range" in r.headers for r in cdn.requests)  # the range survives the redirect


def test_a_server_that_ignores_range(serve: object, tiny_dir: Path) -> None:
    hub = serve(MiniHub(tiny_dir, ignore_range=True))  # type: ignore[operator]
    meta = load_hub_meta(REPO, client=HubClient(endpoint=hub.url))
    same_shape(meta, load_local_meta(tiny_dir))


def test_the_file_list_is_followed_across_pages(serve: object, deepseek_dir: Path) -> None:
    hub = serve(MiniHub(deepseek_dir, page_size=10))  # type: ignore[operator]
    meta = load_hub_meta(REPO, client=HubClient(endpoint=hub.url))
    assert len(meta.files) == 88
    assert sum("/tree/" in r.path for r in hub.requests) == 9


def test_a_file_the_repository_lacks_is_named(serve: object, deepseek_dir: Path) -> None:
    hidden = frozenset({"model-00007-of-00088.safetensors"})
    hub = serve(MiniHub(deepseek_dir, hidden=hidden))  # type: ignore[operator]
    with pytest.raises(ModelError, match=r"does not have: model-00007-of-00088\.safetensors"):
        load_hub_meta(REPO, client=HubClient(endpoint=hub.url))


def test_an_unknown_repository(serve: object, tiny_dir: Path) -> None:
    hub = serve(MiniHub(tiny_dir))  # type: ignore[operator]
    with pytest.raises(ModelError, match="not found on the Hub"):
        load_hub_meta("someone/else", client=HubClient(endpoint=hub.url))


def test_unreachable_endpoint() -> None:
    with pytest.raises(ModelError, match=r"cannot reach http://127\.0\.0\.1:9/"):
        load_hub_meta(REPO, client=HubClient(endpoint="http://127.0.0.1:9"))


def test_model_spec_uses_hf_token_from_the_environment(serve: object, tiny_dir: Path) -> None:
    hub = serve(MiniHub(tiny_dir, token=TOKEN))  # type: ignore[operator]
    spec = ModelSpec(repo=REPO, revision="main", path=None, endpoint=hub.url + "/")
    meta = load_model_meta(spec, environ={"HF_TOKEN": TOKEN})
    same_shape(meta, load_local_meta(tiny_dir))
    local = load_model_meta(ModelSpec(repo=None, revision=None, path=tiny_dir))
    same_shape(local, meta)


def test_placement_reads_the_token_hf_auth_login_wrote(serve: object, tiny_dir: Path,
                                                       tmp_path: Path) -> None:
    """Issue #13 item 7: a token only in ~/.cache/huggingface/token (what `hf auth login`
    writes) authenticates placement's Hub reads too, as it does the sync's."""
    hub = serve(MiniHub(tiny_dir, token=TOKEN))  # type: ignore[operator]
    spec = ModelSpec(repo=REPO, revision="main", path=None, endpoint=hub.url + "/")
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "token").write_text(TOKEN + "\n")
    meta = load_model_meta(spec, environ={"HOME": str(tmp_path)})
    same_shape(meta, load_local_meta(tiny_dir))
    with pytest.raises(ModelError, match="401"):  # and without it, the Hub refuses
        load_model_meta(spec, environ={"HOME": str(tmp_path / "elsewhere")})
