"""The test hub speaks the Hub's protocol: JSON shapes, hashes git would compute, Range, the CDN
redirect, gating, and faults injected at the configured rate, reproducibly."""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.model.hub import HubClient
from orchestrator.simulator.faults import FAULT_KINDS, Faults, Pacer
from orchestrator.simulator.hub import TestHub
from orchestrator.simulator.hubrepo import lfs_pointer

REPO = "org/tiny"
TOKEN = "hf_test_token_0123456789abcdef"
NO_FAULTS = dict.fromkeys(FAULT_KINDS, 0)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Plain git files, two safetensors (LFS by name), one big file (LFS by size), a subdir."""
    rng = random.Random(7)
    root = tmp_path / "tiny"
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "tiny", "num_hidden_layers": 2}\n')
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (root / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(3000))
    (root / "model-00002-of-00002.safetensors").write_bytes(rng.randbytes(5000))
    (root / "big.dat").write_bytes(rng.randbytes(70_000))
    return root


@pytest.fixture
def hub(model_dir: Path) -> Iterator[TestHub]:
    with make_hub(model_dir) as running:
        yield running


def make_hub(model_dir: Path, **options: Any) -> TestHub:
    """big.dat (70 kB) is LFS by size: the threshold is lowered to keep the files small."""
    return TestHub({REPO: model_dir}, lfs_threshold=64_000, **options)


def request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw request, redirects not followed, a cut body returned as far as it came."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, headers=headers or {})
        response = conn.getresponse()
        try:
            body = response.read()
        except http.client.IncompleteRead as exc:
            body = exc.partial
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    status, _, body = request(url, headers=headers)
    assert status == 200, body
    return json.loads(body)


# ------------------------------------------------------------------------------- API shapes


def test_revision_pins_branch_to_a_commit_sha(hub: TestHub, model_dir: Path) -> None:
    answer = get_json(f"{hub.endpoint}/api/models/{REPO}/revision/main")
    assert isinstance(answer, dict)
    sha = answer["sha"]
    assert len(sha) == 40 and int(sha, 16) >= 0
    assert answer["id"] == REPO
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert [s["rfilename"] for s in answer["siblings"]] == files
    assert get_json(f"{hub.endpoint}/api/models/{REPO}/revision/{sha}") == answer
    status, headers, _ = request(f"{hub.endpoint}/api/models/{REPO}/revision/v9")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound")


def test_tree_reports_git_and_lfs_hashes(hub: TestHub, model_dir: Path) -> None:
    entries = get_json(f"{hub.endpoint}/api/models/{REPO}/tree/main?recursive=true")
    assert isinstance(entries, list)
    by_path = {e["path"]: e for e in entries}
    assert by_path["tokenizer"]["type"] == "directory"
    for path, entry in by_path.items():
        local = model_dir / path
        if entry["type"] == "directory":
            continue
        data = local.read_bytes()
        assert entry["size"] == len(data)
        if path.endswith((".safetensors", ".dat")):  # LFS: by pattern, and by size
            pointer = lfs_pointer(hashlib.sha256(data).hexdigest(), len(data))
            assert entry["lfs"] == {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": len(pointer),
            }
            assert entry["oid"] == git_blob_id(pointer)
        else:
            assert "lfs" not in entry
            assert entry["oid"] == git_blob_id(data)
    top = get_json(f"{hub.endpoint}/api/models/{REPO}/tree/main")
    assert isinstance(top, list)
    assert {e["path"] for e in top} == {p.name for p in model_dir.iterdir()}
    sub = get_json(f"{hub.endpoint}/api/models/{REPO}/tree/main/tokenizer")
    assert [e["path"] for e in sub] == ["tokenizer/vocab.txt"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_blob_ids_are_what_git_computes(hub: TestHub, model_dir: Path) -> None:
    entries = get_json(f"{hub.endpoint}/api/models/{REPO}/tree/main?recursive=true")
    plain = [e for e in entries if e["type"] == "file" and "lfs" not in e]
    assert plain
    for entry in plain:
        proc = subprocess.run(
            ["git", "hash-object", str(model_dir / entry["path"])],
            capture_output=True,
            check=True,
            text=True,
        )
        assert entry["oid"] == proc.stdout.strip()


def test_tree_pages_follow_link_header(model_dir: Path) -> None:
    with make_hub(model_dir, tree_page_size=4) as hub:
        url: str | None = f"{hub.endpoint}/api/models/{REPO}/tree/main?recursive=true"
        pages: list[list[dict[str, object]]] = []
        while url and len(pages) < 20:
            status, headers, body = request(url)
            assert status == 200
            pages.append(json.loads(body))
            link = headers.get("link")
            url = link[1 : link.index(">")] if link else None
        assert [len(p) for p in pages] == [4, 2]  # 5 files, 1 directory
        # The controller's Hub client reads the same pages.
        files = HubClient(endpoint=hub.endpoint).tree(REPO, "main")
        safetensors = (model_dir / "model-00001-of-00002.safetensors").read_bytes()
        assert files["model-00001-of-00002.safetensors"].sha256 == sha256(safetensors)
        assert files["config.json"].sha256 is None


# ------------------------------------------------------------------------------- file bytes


def test_plain_file_with_ranges(hub: TestHub, model_dir: Path) -> None:
    data = (model_dir / "config.json").read_bytes()
    url = hub.resolve_url(REPO, "config.json")
    status, headers, body = request(url)
    assert (status, body) == (200, data)
    assert headers["etag"] == f'"{git_blob_id(data)}"'
    assert headers["x-repo-commit"] == hub.repo(REPO).commit
    assert headers["accept-ranges"] == "bytes"
    for spec, first, last in (("3-9", 3, 9), ("5-", 5, len(data) - 1), ("-4", len(data) - 4, None)):
        status, headers, body = request(url, headers={"Range": f"bytes={spec}"})
        end = len(data) - 1 if last is None else last
        assert status == 206
        assert headers["content-range"] == f"bytes {first}-{end}/{len(data)}"
        assert body == data[first : end + 1]
    status, headers, _ = request(url, headers={"Range": f"bytes={len(data)}-"})
    assert (status, headers["content-range"]) == (416, f"bytes */{len(data)}")
    status, headers, body = request(url, "HEAD")
    assert (status, headers["content-length"], body) == (200, str(len(data)), b"")


def test_lfs_file_redirects_to_signed_cdn_url(hub: TestHub, model_dir: Path) -> None:
    data = (model_dir / "model-00002-of-00002.safetensors").read_bytes()
    url = hub.resolve_url(REPO, "model-00002-of-00002.safetensors")
    for method in ("HEAD", "GET"):
        status, headers, _ = request(url, method)
        assert status == 302
        assert headers["x-linked-size"] == str(len(data))
        assert headers["x-linked-etag"] == f'"{sha256(data)}"'
        assert headers["x-repo-commit"] == hub.repo(REPO).commit
        assert headers["location"].startswith(f"{hub.endpoint}/cdn/")
    cdn = headers["location"]
    assert request(cdn)[2] == data
    status, headers, body = request(cdn, headers={"Range": "bytes=1000-"})
    assert (status, body) == (206, data[1000:])
    assert headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    tampered = cdn.replace("signature=", "signature=0")
    assert request(tampered)[0] == 403


def test_cdn_can_live_on_another_host(model_dir: Path) -> None:
    with make_hub(model_dir, cdn_host="127.0.0.2") as hub:
        status, headers, _ = request(hub.resolve_url(REPO, "model-00001-of-00002.safetensors"))
        assert status == 302
        assert urllib.parse.urlsplit(headers["location"]).hostname == "127.0.0.2"
        assert request(headers["location"])[0] == 200
        status, _, _ = request(headers["location"], headers={"Authorization": "Bearer x"})
        assert hub.stats().cdn_requests_with_authorization == 1


def test_unknown_things_are_404_with_error_codes(hub: TestHub) -> None:
    cases = {
        f"{hub.endpoint}/api/models/org/nope/revision/main": "RepoNotFound",
        f"{hub.endpoint}/org/nope/resolve/main/config.json": "RepoNotFound",
        f"{hub.endpoint}/{REPO}/resolve/nope/config.json": "RevisionNotFound",
        hub.resolve_url(REPO, "missing.bin"): "EntryNotFound",
    }
    for url, code in cases.items():
        status, headers, _ = request(url)
        assert (status, headers["x-error-code"]) == (404, code), url


def test_gated_hub_wants_the_token(model_dir: Path) -> None:
    with make_hub(model_dir, token=TOKEN) as hub:
        revision = f"{hub.endpoint}/api/models/{REPO}/revision/main"
        status, headers, body = request(revision)
        assert (status, headers["x-error-code"]) == (401, "GatedRepo")
        wrong = "Bearer hf_wrong_token_zzzzzzzzzzzz"
        status, headers, body = request(revision, headers={"Authorization": wrong})
        assert status == 401
        assert b"hf_wrong_token" not in body and "hf_wrong_token" not in str(headers)
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert request(revision, headers=good)[0] == 200
        resolve = hub.resolve_url(REPO, "model-00001-of-00002.safetensors")
        assert request(resolve)[0] == 401
        status, headers, _ = request(resolve, headers=good)
        assert status == 302
        assert request(headers["location"])[0] == 200  # the signed URL needs no token
        assert hub.stats().unauthorized == 3


# ------------------------------------------------------------------------------- counters, faults


def test_counters_count_bytes_and_complete_serves(hub: TestHub, model_dir: Path) -> None:
    data = (model_dir / "config.json").read_bytes()
    url = hub.resolve_url(REPO, "config.json")
    request(url, headers={"Range": "bytes=0-3"})  # not to the end: not a complete serve
    request(url, "HEAD")
    request(url, headers={"Range": "bytes=4-"})  # the rest: completes the file
    request(url)
    stats = hub.stats()
    assert stats.requests == 4
    assert stats.bytes_served == {f"{REPO}/config.json": 4 + (len(data) - 4) + len(data)}
    assert stats.complete_serves == {f"{REPO}/config.json": 2}
    assert stats.faults == NO_FAULTS
    hub.reset_stats()
    assert hub.stats().requests == 0


def test_cut_sends_headers_and_part_of_the_body(model_dir: Path) -> None:
    with make_hub(model_dir, faults=Faults(cut_fraction=1.0)) as hub:
        data = (model_dir / "big.dat").read_bytes()
        status, headers, _ = request(hub.resolve_url(REPO, "big.dat"))
        assert status == 302  # a redirect has no body to cut
        status, headers, body = request(headers["location"])
        assert status == 200 and headers["content-length"] == str(len(data))
        assert len(body) < len(data) and data.startswith(body)
        stats = hub.stats()
        assert stats.faults["cut"] == 1
        assert stats.bytes_served == {f"{REPO}/big.dat": len(body)}
        assert stats.complete_serves == {}


def test_error_fault_is_503_with_retry_after_and_spares_the_api(model_dir: Path) -> None:
    faults = Faults(error_fraction=1.0, retry_after=7)
    with make_hub(model_dir, faults=faults) as hub:
        status, headers, _ = request(hub.resolve_url(REPO, "config.json"))
        assert (status, headers["retry-after"]) == (503, "7")
        assert request(f"{hub.endpoint}/api/models/{REPO}/revision/main")[0] == 200
        hub.set_faults(Faults(error_fraction=1.0, api=True))
        assert request(f"{hub.endpoint}/api/models/{REPO}/revision/main")[0] == 503


def cdn_url(hub: TestHub, path: str) -> str:
    status, headers, _ = request(hub.resolve_url(REPO, path))
    assert status == 302, status
    return headers["location"]


def test_an_ignored_range_is_200_with_the_whole_file(model_dir: Path) -> None:
    data = (model_dir / "big.dat").read_bytes()
    with make_hub(model_dir, faults=Faults(ignore_range_fraction=1.0)) as hub:
        url = cdn_url(hub, "big.dat")
        status, headers, body = request(url, headers={"Range": "bytes=1000-"})
        assert (status, body) == (200, data) and "content-range" not in headers
        assert request(url)[2] == data  # no Range: nothing to ignore
        stats = hub.stats()
    assert stats.faults == {**NO_FAULTS, "range_ignored": 1}
    assert stats.bytes_served == {f"{REPO}/big.dat": 2 * len(data)}
    assert stats.complete_serves == {f"{REPO}/big.dat": 2}


def test_a_corrupt_body_has_the_right_length_and_wrong_bytes(model_dir: Path) -> None:
    data = (model_dir / "big.dat").read_bytes()
    with make_hub(model_dir, faults=Faults(corrupt_fraction=1.0)) as hub:
        url = cdn_url(hub, "big.dat")
        for first in (0, 1000, len(data) - 1):
            status, _, body = request(url, headers={"Range": f"bytes={first}-"})
            assert status == 206 and len(body) == len(data) - first
            assert body != data[first:] and body[1:] == data[first + 1 :]
        plain = (model_dir / "config.json").read_bytes()
        status, _, body = request(hub.resolve_url(REPO, "config.json"))
        assert status == 200 and len(body) == len(plain) and body != plain
        assert hub.stats().faults == {**NO_FAULTS, "corrupt": 4}


def test_not_found_and_rate_limited_answers(model_dir: Path) -> None:
    with make_hub(model_dir, faults=Faults(not_found_fraction=1.0)) as hub:
        for path in ("big.dat", "config.json"):
            status, headers, _ = request(hub.resolve_url(REPO, path))
            assert (status, headers["x-error-code"]) == (404, "EntryNotFound")
            assert path in headers["x-error-message"]
        assert request(f"{hub.endpoint}/api/models/{REPO}/revision/main")[0] == 200
        assert hub.stats().faults == {**NO_FAULTS, "not_found": 2}
    with make_hub(model_dir, faults=Faults(rate_limit_fraction=1.0, retry_after=3)) as hub:
        status, headers, _ = request(hub.resolve_url(REPO, "config.json"))
        assert (status, headers["retry-after"]) == (429, "3")
        status, headers, _ = request(hub.resolve_url(REPO, "big.dat"), "HEAD")
        assert (status, headers["retry-after"]) == (429, "3")
        assert hub.stats().faults == {**NO_FAULTS, "rate_limited": 2}


def test_a_stall_sends_part_of_the_body_then_nothing(model_dir: Path) -> None:
    data = (model_dir / "big.dat").read_bytes()
    faults = Faults(stall_fraction=1.0, stall_seconds=30)
    with make_hub(model_dir, faults=faults) as hub:
        parts = urllib.parse.urlsplit(cdn_url(hub, "big.dat"))
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=0.5)
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Length") == str(len(data))
        got = b""
        with pytest.raises(TimeoutError):
            while True:
                chunk = response.read1(65536)
                assert chunk, "the stalled body ended instead of going quiet"
                got += chunk
        conn.close()
        assert len(got) < len(data) and data.startswith(got)
        assert until(lambda: hub.stats().stalls_abandoned == 1)  # the hub saw the hang-up
        stats = hub.stats()
    assert stats.faults == {**NO_FAULTS, "stall": 1}
    assert stats.bytes_served == {f"{REPO}/big.dat": len(got)}
    assert stats.complete_serves == {}


def until(check: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether ``check`` holds within ``within`` seconds (for what the hub's threads count
    after the client has moved on, like a hang-up during a stall)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_faults_can_be_limited_to_some_files(model_dir: Path) -> None:
    faults = Faults(error_fraction=1.0, files=frozenset({"big.dat"}))
    with make_hub(model_dir, faults=faults) as hub:
        assert request(hub.resolve_url(REPO, "config.json"))[0] == 200
        assert request(hub.resolve_url(REPO, "model-00001-of-00002.safetensors"))[0] == 302
        assert request(hub.resolve_url(REPO, "big.dat"))[0] == 503
        assert [(e.file, e.status, e.faults) for e in hub.log] == [
            ("config.json", 200, ()),
            ("model-00001-of-00002.safetensors", 302, ()),
            ("big.dat", 503, ("error",)),
        ]
        assert [e.at for e in hub.log] == sorted(e.at for e in hub.log)


def test_a_file_over_the_plain_http_limit_is_refused_naming_the_limit(model_dir: Path) -> None:
    with make_hub(model_dir, plain_http_limit=64_000) as hub:
        status, headers, _ = request(cdn_url(hub, "big.dat"))  # resolve still redirects
        assert (status, headers["x-error-code"]) == (400, "FileTooLarge")
        assert "big.dat" in headers["x-error-message"]
        assert "64000-byte limit" in headers["x-error-message"]
        assert request(cdn_url(hub, "model-00001-of-00002.safetensors"))[0] == 200
        assert hub.stats().bytes_served == {f"{REPO}/model-00001-of-00002.safetensors": 3000}


def fault_pattern(hub: TestHub, url: str, n: int) -> list[str]:
    size = int(request(url, "HEAD")[1]["content-length"])
    pattern = []
    for _ in range(n):
        status, _, body = request(url)
        pattern.append("error" if status == 503 else "cut" if len(body) < size else "ok")
    return pattern


def test_faults_come_at_the_configured_rate_reproducibly(model_dir: Path) -> None:
    faults = Faults(cut_fraction=0.3, error_fraction=0.1, retry_after=0, seed=11)
    n = 400
    with make_hub(model_dir, faults=faults) as hub:
        url = hub.resolve_url(REPO, "config.json")
        pattern = fault_pattern(hub, url, n)
        stats = hub.stats()
    errors, cuts = pattern.count("error"), pattern.count("cut")
    assert stats.faults == {**NO_FAULTS, "error": errors, "cut": cuts}
    assert 0.06 * n <= errors <= 0.14 * n
    # Cuts apply to the requests that were not 503s: 30% of the other 90%.
    assert 0.22 * (n - errors) <= cuts <= 0.38 * (n - errors)
    with make_hub(model_dir, faults=faults) as again:
        assert fault_pattern(again, again.resolve_url(REPO, "config.json"), n) == pattern


def test_throttle_limits_the_bandwidth(model_dir: Path) -> None:
    rate = 140_000  # bytes per second; big.dat is 70 kB: 0.5 s
    with make_hub(model_dir, faults=Faults(bytes_per_second=rate)) as hub:
        status, headers, _ = request(hub.resolve_url(REPO, "big.dat"))
        started = time.monotonic()
        status, _, body = request(headers["location"])
        elapsed = time.monotonic() - started
    assert status == 200 and len(body) == 70_000
    # The pacer lets a sender catch up by SLACK_S and sends each chunk at its slot's start.
    chunk = Pacer.chunk_size(rate, 65536)
    assert 70_000 / rate - Pacer.SLACK_S - chunk / rate <= elapsed <= 3 * 70_000 / rate


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 (git's id)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_placement_reads_a_flaky_hub_without_failing(tmp_path: Path) -> None:
    """Placement's metadata reads (tree, config, index, headers) retry cut and 503 answers."""
    from orchestrator.model.hub import HubClient, load_hub_meta
    from orchestrator.simulator.tiny_model import make_tiny_deepseek

    model = make_tiny_deepseek(tmp_path / "m", n_layers=3, n_files=3)
    faults = Faults(cut_fraction=0.3, error_fraction=0.1, retry_after=0, seed=3, api=True)
    with TestHub({"org/flaky": model}, faults=faults) as hub:
        meta = load_hub_meta("org/flaky", "main", client=HubClient(endpoint=hub.endpoint))
        assert sum(hub.stats().faults.values()) > 0
    assert meta.num_layers == 3
    assert sorted(f.name for f in meta.files) == sorted(
        p.name for p in model.glob("model*.safetensors"))
