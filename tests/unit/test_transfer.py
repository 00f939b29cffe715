"""`transfer.fetch` and `transfer.serve_files` against the test hub and each other.

The claim issue 5 rests on: with the hub cutting 30% of bodies and answering 503 to 10% of
requests, every file arrives verified and the hub serves at most 1.1x the model's bytes; with
three nodes, each file leaves the hub once and travels on between peers.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import http.client
import json
import random
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import pytest

from orchestrator.agent import transfer
from orchestrator.agent.transfer import (
    FetchResult,
    IntegrityError,
    TransferError,
    fetch,
    serve_files,
)
from orchestrator.simulator.faults import Faults
from orchestrator.simulator.hub import TestHub
from tests.unit.test_hub import until

REPO = "org/tiny-model"
TOKEN = "hf_SeCrEt_token_4f9a8b7c6d5e"
PEER_TOKEN = "peer-run-token-3c2b1a0f9e8d7c6b"
FAST: dict[str, Any] = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 10.0}


@dataclass(frozen=True)
class Wanted:
    """A file as the tree API describes it: what `fetch` is asked for."""

    path: str
    size: int
    sha256: str | None  # None for plain git files: the tree gives only their blob id
    git_sha1: str | None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six weight files of a few MB of random bytes, an index and a config (~13 MB)."""
    rng = random.Random(2024)
    root = tmp_path_factory.mktemp("hub") / "tiny-model"
    root.mkdir()
    weight_map = {}
    for i in range(1, 7):
        name = f"model-{i:05d}-of-00006.safetensors"
        (root / name).write_bytes(rng.randbytes(1_500_000 + 250_000 * i))
        weight_map[f"model.layers.{i}.weight"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text('{"model_type": "tiny", "num_hidden_layers": 6}\n')
    return root


def wanted_files(hub: TestHub) -> list[Wanted]:
    """What a sync learns from the tree: the sha256 of LFS files; of plain git files only the
    blob id (their sha256 comes from the first verified copy, in `FetchResult.sha256`)."""
    auth = {"Authorization": f"Bearer {hub.token}"} if hub.token else {}
    url = f"{hub.endpoint}/api/models/{REPO}/tree/main?recursive=true"
    entries = json.loads(raw(url, auth)[1])
    hub.reset_stats()  # the tests count file traffic; listing the tree is not part of it
    return [
        Wanted(e["path"], e["size"], e["lfs"]["oid"], None)
        if "lfs" in e
        else Wanted(e["path"], e["size"], None, e["oid"])
        for e in entries
        if e["type"] == "file"
    ]


def weight(hub: TestHub) -> Wanted:
    """The last weight file (1.5 + 6 x 0.25 = 3 MB)."""
    return [w for w in wanted_files(hub) if w.path.endswith(".safetensors")][-1]


def truth(model_dir: Path, want: Wanted) -> str:
    """The sha256 of the repository's own copy: what every fetched copy must equal."""
    return sha256_of(model_dir / want.path)


def get(hub_or_peer: Source, dest: Path, want: Wanted, **options: Any) -> FetchResult:
    url = hub_or_peer.resolve_url(REPO, want.path)
    return fetch(
        url,
        str(dest / want.path),
        sha256=want.sha256,
        size=want.size,
        git_sha1=want.git_sha1,
        rng=random.Random(0),
        **{**FAST, **options},
    )


class Source(Protocol):
    """Anything that says where a repository file lives: the hub, or a peer (`Peer`)."""

    def resolve_url(self, repo_id: str, path: str) -> str: ...


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the happy path


def test_fetch_verifies_and_renames_into_place(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}) as hub:
        wanted = wanted_files(hub)
        results = [get(hub, tmp_path, w) for w in wanted]
        stats = hub.stats()
    for want, result in zip(wanted, results, strict=True):
        assert Path(result.path).read_bytes() == (model_dir / Path(result.path).name).read_bytes()
        assert result.sha256 == truth(model_dir, want)  # plain git files too: from the bytes
        assert not Path(result.path + ".partial").exists()
        assert (result.bytes_downloaded, result.bytes_resumed) == (result.size, 0)
        assert (result.retries, result.mismatches) == (0, 0)
    weights = [r for r in results if r.path.endswith(".safetensors")]
    assert all(r.requests == 2 for r in weights)  # resolve, then the CDN redirect
    assert stats.complete_serves == {f"{REPO}/{w.path}": 1 for w in wanted}


def test_empty_file_needs_no_request(tmp_path: Path) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    result = fetch("http://127.0.0.1:9/never", str(tmp_path / "e"), sha256=empty, size=0)
    assert (tmp_path / "e").read_bytes() == b""
    assert result.requests == 0
    with pytest.raises(ValueError, match="never taken unverified"):
        fetch("http://127.0.0.1:9/never", str(tmp_path / "f"), sha256=None, size=1)


# ----------------------------------------------------------------------------- resume


def test_resume_after_a_cut_keeps_the_bytes(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}, faults=Faults(cut_fraction=1.0, seed=1)) as hub:
        want = next(w for w in wanted_files(hub) if w.path.endswith(".safetensors"))
        with pytest.raises(TransferError, match="gave up after 1 attempts"):
            get(hub, tmp_path, want, max_attempts=1)
        partial = tmp_path / (want.path + ".partial")
        kept = partial.stat().st_size
        assert 0 < kept < want.size  # the cut left a partial behind
        hub.set_faults(Faults())
        result = get(hub, tmp_path, want)
        stats = hub.stats()
    assert (result.bytes_resumed, result.bytes_downloaded) == (kept, want.size - kept)
    assert stats.total_bytes_served == want.size  # nothing was downloaded twice
    assert stats.complete_serves == {f"{REPO}/{want.path}": 1}
    assert sha256_of(tmp_path / want.path) == truth(model_dir, want)


def test_complete_partial_is_verified_without_a_request(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}) as hub:
        want = weight(hub)
        (tmp_path / (want.path + ".partial")).write_bytes((model_dir / want.path).read_bytes())
        result = get(hub, tmp_path, want)
        assert hub.stats().requests == 0
    assert (result.requests, result.bytes_resumed, result.bytes_downloaded) == (0, want.size, 0)
    assert sha256_of(tmp_path / want.path) == truth(model_dir, want)


def test_corrupt_partial_is_a_counted_mismatch_then_refetched(
    model_dir: Path, tmp_path: Path
) -> None:
    with TestHub({REPO: model_dir}) as hub:
        want = weight(hub)
        good = (model_dir / want.path).read_bytes()
        bad = bytes(b ^ 0xFF for b in good[:100_000]) + good[100_000:600_000]
        (tmp_path / (want.path + ".partial")).write_bytes(bad)
        result = get(hub, tmp_path, want)
        stats = hub.stats()
    assert result.mismatches == 1
    assert result.bytes_resumed == len(bad)
    assert result.bytes_downloaded == (want.size - len(bad)) + want.size
    assert stats.total_bytes_served == result.bytes_downloaded
    assert sha256_of(tmp_path / want.path) == truth(model_dir, want)


def test_wrong_content_fails_after_one_refetch(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}) as hub:
        want = weight(hub)
        wrong = Wanted(want.path, want.size, "0" * 64, None)
        with pytest.raises(IntegrityError, match="even fetched again from zero"):
            get(hub, tmp_path, wrong)
        assert hub.stats().complete_serves == {f"{REPO}/{want.path}": 2}
    assert not (tmp_path / want.path).exists()
    assert not (tmp_path / (want.path + ".partial")).exists()


def test_git_blob_id_is_checked_for_plain_files(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}) as hub:
        want = next(w for w in wanted_files(hub) if w.git_sha1 is not None)
        assert get(hub, tmp_path, want).mismatches == 0
        (tmp_path / want.path).unlink()
        with pytest.raises(IntegrityError):
            get(hub, tmp_path, Wanted(want.path, want.size, want.sha256, "1" * 40))


def test_a_second_fetch_of_the_same_file_is_refused(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}) as hub:
        want = weight(hub)
        with (tmp_path / (want.path + ".partial")).open("wb") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            with pytest.raises(TransferError, match="another fetch"):
                get(hub, tmp_path, want)
        assert hub.stats().requests == 0


# ----------------------------------------------------------------------------- faults


def test_sync_survives_cuts_and_503s_within_1_1x_of_the_model(
    model_dir: Path, tmp_path: Path
) -> None:
    """Five seeds, so that enough cuts and 503s happen for the claim to mean something."""
    cuts = errors = requests = 0
    for seed in range(1, 6):
        faults = Faults(cut_fraction=0.3, error_fraction=0.1, retry_after=0, seed=seed)
        started = time.monotonic()
        with TestHub({REPO: model_dir}, faults=faults) as hub:
            wanted = wanted_files(hub)
            results = [get(hub, tmp_path / str(seed), w) for w in wanted]
            stats = hub.stats()
        elapsed = time.monotonic() - started
        total = sum(w.size for w in wanted)
        for want in wanted:
            assert sha256_of(tmp_path / str(seed) / want.path) == truth(model_dir, want)
        assert stats.total_bytes_served <= 1.1 * total
        assert stats.complete_serves == {f"{REPO}/{w.path}": 1 for w in wanted}
        retries = sum(r.retries for r in results)
        assert retries == stats.faults["cut"] + stats.faults["error"]  # each fault survived
        cuts, errors = cuts + stats.faults["cut"], errors + stats.faults["error"]
        requests += stats.requests
        print(
            f"\nseed {seed}: hub bytes / model bytes = {stats.total_bytes_served / total:.4f} "
            f"({stats.total_bytes_served} / {total}); faults {dict(stats.faults)}; "
            f"requests {stats.requests}; retries {retries}; {elapsed:.2f} s"
        )
    assert cuts >= 10 and 0.05 <= errors / requests <= 0.2, (cuts, errors, requests)


def test_three_nodes_take_each_file_from_the_hub_once(model_dir: Path, tmp_path: Path) -> None:
    """Node 1 fetches from the flaky hub; nodes 2 and 3 pull from peers, the source chosen
    per file (a node holding a verified copy serves it), so the load is spread."""
    faults = Faults(cut_fraction=0.3, error_fraction=0.1, retry_after=0, seed=9)
    nodes = [tmp_path / f"node{i}" for i in (1, 2, 3)]
    with TestHub({REPO: model_dir}, faults=faults) as hub, ThreadPoolExecutor(3) as pool:
        wanted = wanted_files(hub)
        firsts = list(pool.map(lambda w: get(hub, nodes[0], w), wanted))  # three at a time
        # Peers check every file by sha256, known now for the plain git files too.
        verified = [
            Wanted(w.path, w.size, r.sha256, None) for w, r in zip(wanted, firsts, strict=True)
        ]
        peers = [serve_node(node, wanted) for node in nodes[:2]]
        try:
            list(
                pool.map(lambda w: get(Peer(peers[0]), nodes[1], w, headers=peer_auth()), verified)
            )
            # Node 3 takes each file from whichever of nodes 1 and 2 is next in turn.
            list(
                pool.map(
                    lambda iw: get(Peer(peers[iw[0] % 2]), nodes[2], iw[1], headers=peer_auth()),
                    enumerate(verified),
                )
            )
        finally:
            for peer in peers:
                peer.close()
        stats = hub.stats()
    total = sum(w.size for w in wanted)
    assert stats.complete_serves == {f"{REPO}/{w.path}": 1 for w in wanted}
    assert stats.total_bytes_served <= 1.1 * total
    for node in nodes:
        for want in wanted:
            assert sha256_of(node / want.path) == truth(model_dir, want)
    assert sum(peers[0].bytes_served.values()) > sum(peers[1].bytes_served.values()) > 0


def test_throttled_fetch_takes_its_time_and_reports_progress(
    model_dir: Path, tmp_path: Path
) -> None:
    rate = 5_000_000
    with TestHub({REPO: model_dir}, faults=Faults(bytes_per_second=rate)) as hub:
        want = next(w for w in wanted_files(hub) if w.path.endswith(".safetensors"))
        seen: list[tuple[int, int]] = []
        started = time.monotonic()
        get(hub, tmp_path, want, progress=lambda have, size: seen.append((have, size)))
        elapsed = time.monotonic() - started
    assert elapsed >= want.size / rate - 0.1  # the pacer's slack and first chunk
    assert seen[0] == (0, want.size) and seen[-1] == (want.size, want.size)
    assert [h for h, _ in seen] == sorted(h for h, _ in seen)


def test_gives_up_on_a_hub_that_keeps_failing(model_dir: Path, tmp_path: Path) -> None:
    faults = Faults(error_fraction=1.0, retry_after=0)
    with TestHub({REPO: model_dir}, faults=faults) as hub:
        want = wanted_files(hub)[0]
        with pytest.raises(TransferError, match=r"HTTP 503.*gave up after 3") as caught:
            get(hub, tmp_path, want, retries=2)
        assert hub.stats().requests == 3
    assert caught.value.status == 503


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    data = b"x" * 1000
    with StubServer([(503, {"Retry-After": "1"}, b""), (200, {}, data)]) as stub:
        started = time.monotonic()
        result = fetch(
            stub.url,
            str(tmp_path / "f"),
            sha256=hashlib.sha256(data).hexdigest(),
            size=1000,
            **FAST,
        )
        assert time.monotonic() - started >= 1.0
    assert result.retries == 1


def test_a_server_ignoring_range_means_starting_over(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(50_000)
    (tmp_path / "f.partial").write_bytes(data[:20_000])
    with StubServer([(200, {}, data)]) as stub:
        result = fetch(
            stub.url,
            str(tmp_path / "f"),
            sha256=hashlib.sha256(data).hexdigest(),
            size=50_000,
            **FAST,
        )
        assert stub.ranges == ["bytes=20000-"]
    assert (result.bytes_resumed, result.bytes_downloaded) == (20_000, 50_000)
    assert (tmp_path / "f").read_bytes() == data


def test_a_wrong_content_range_start_restarts_from_zero(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(50_000)
    (tmp_path / "f.partial").write_bytes(data[:20_000])
    wrong = (206, {"Content-Range": "bytes 10000-49999/50000"}, data[10_000:])
    with StubServer([wrong, (200, {}, data)]) as stub:
        result = fetch(
            stub.url,
            str(tmp_path / "f"),
            sha256=hashlib.sha256(data).hexdigest(),
            size=50_000,
            **FAST,
        )
        assert stub.ranges == ["bytes=20000-", None]
    assert result.retries == 1
    assert (tmp_path / "f").read_bytes() == data


# ------------------------------------------------------------- the Hub's misbehaviours (#13, #16)


def hub_requests_for(hub: TestHub, path: str) -> list[tuple[str, int, tuple[str, ...]]]:
    """(resolve or cdn, status, faults) of every request the hub answered for one file."""
    return [
        ("cdn" if e.path.startswith("/cdn/") else "resolve", e.status, e.faults)
        for e in hub.log
        if e.file == path
    ]


def test_a_resume_answered_with_the_whole_file_restarts_it(model_dir: Path, tmp_path: Path) -> None:
    """A CDN that answers a Range request 200 with the whole body (gzip in front does): the
    partial is dropped, the file taken from the first byte, verified, and the bytes fetched
    twice are the result's waste (downloaded + resumed - size)."""
    with TestHub({REPO: model_dir}, faults=Faults(cut_fraction=1.0, seed=1)) as hub:
        want = weight(hub)
        with pytest.raises(TransferError, match="gave up after 1 attempts"):
            get(hub, tmp_path, want, max_attempts=1)
        kept = (tmp_path / (want.path + ".partial")).stat().st_size
        assert 0 < kept < want.size
        hub.set_faults(Faults(ignore_range_fraction=1.0))
        hub.reset_stats()
        result = get(hub, tmp_path, want)
        stats = hub.stats()
        assert hub_requests_for(hub, want.path)[-2:] == [
            ("resolve", 302, ()),
            ("cdn", 200, ("range_ignored",)),
        ]
    assert (result.bytes_resumed, result.bytes_downloaded) == (kept, want.size)
    assert result.bytes_downloaded + result.bytes_resumed - result.size == kept  # the waste
    assert stats.faults["range_ignored"] == 1
    assert stats.bytes_served == {f"{REPO}/{want.path}": want.size}
    assert sha256_of(tmp_path / want.path) == truth(model_dir, want)
    assert not (tmp_path / (want.path + ".partial")).exists()


def test_wrong_bytes_on_every_answer_fail_after_one_refetch(
    model_dir: Path, tmp_path: Path
) -> None:
    """The right length, the wrong bytes, every time: two whole downloads (the second from
    zero), then `IntegrityError` naming the file; nothing is renamed into place and the
    partial is deleted."""
    with TestHub({REPO: model_dir}, faults=Faults(corrupt_fraction=1.0)) as hub:
        want = weight(hub)
        with pytest.raises(IntegrityError) as caught:
            get(hub, tmp_path, want)
        stats = hub.stats()
        requests = hub_requests_for(hub, want.path)
    assert str(caught.value).startswith(f"{want.path}: content does not match its hash")
    assert requests == [("resolve", 302, ()), ("cdn", 200, ("corrupt",))] * 2
    assert stats.complete_serves == {f"{REPO}/{want.path}": 2}
    assert stats.faults["corrupt"] == 2
    assert list(tmp_path.iterdir()) == []


def test_a_404_fails_at_once_naming_the_file(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}, faults=Faults(not_found_fraction=1.0)) as hub:
        want = weight(hub)
        with pytest.raises(TransferError) as caught:
            get(hub, tmp_path, want)
        assert hub_requests_for(hub, want.path) == [("resolve", 404, ("not_found",))]
    assert caught.value.status == 404
    assert str(caught.value).startswith(f"{want.path}: ")
    assert "HTTP 404 (EntryNotFound)" in str(caught.value)
    assert not (tmp_path / want.path).exists()


def test_a_body_stalled_past_the_read_timeout_is_retried_and_verified(
    model_dir: Path, tmp_path: Path
) -> None:
    """The hub sends part of the body and then nothing for 30 s; the fetch's read timeout
    (0.5 s here; 60 s by default; the `fetch` op takes it as ``read_timeout``) gives up on the
    connection and the next attempt resumes from the bytes that came."""
    faults = Faults(stall_fraction=0.5, stall_seconds=30, seed=2)
    with TestHub({REPO: model_dir}, faults=faults) as hub:
        want = weight(hub)
        result = get(hub, tmp_path, want, timeout=0.5)
        stalls = hub.stats().faults["stall"]
        # The fetch hung up on each stall itself, rather than waiting for the hub to end it.
        assert until(lambda: hub.stats().stalls_abandoned == stalls)
        stats = hub.stats()
    assert stats.faults["stall"] >= 1
    assert result.retries == stats.faults["stall"]
    assert result.bytes_downloaded == want.size  # each stalled prefix was kept and resumed
    assert stats.complete_serves == {f"{REPO}/{want.path}": 1}
    assert sha256_of(tmp_path / want.path) == truth(model_dir, want)


def test_429_retry_after_is_waited_and_counted(model_dir: Path, tmp_path: Path) -> None:
    """Rate limited (429 with Retry-After: 1): each retry comes at least 1 s after the 429
    (the hub's clock), and each 429 is one of the result's retries."""
    faults = Faults(rate_limit_fraction=0.5, retry_after=1, seed=2)
    with TestHub({REPO: model_dir}, faults=faults) as hub:
        want = weight(hub)
        result = get(hub, tmp_path, want)
        stats = hub.stats()
        log = [e for e in hub.log if e.file == want.path]
    limited = [i for i, e in enumerate(log) if e.status == 429]
    assert limited and stats.faults["rate_limited"] == len(limited)
    assert result.retries == len(limited)
    for i in limited:
        assert log[i + 1].at - log[i].at >= 1.0, log
    assert sha256_of(tmp_path / want.path) == truth(model_dir, want)


def test_a_file_over_the_plain_http_limit_fails_at_once_naming_it(
    model_dir: Path, tmp_path: Path
) -> None:
    with TestHub({REPO: model_dir}) as hub:
        want = weight(hub)
        hub.plain_http_limit = want.size - 1
        with pytest.raises(TransferError) as caught:
            get(hub, tmp_path, want)
        assert hub_requests_for(hub, want.path) == [("resolve", 302, ()), ("cdn", 400, ())]
    assert caught.value.status == 400
    assert str(caught.value).startswith(f"{want.path}: ")
    assert "HTTP 400 (FileTooLarge)" in str(caught.value)
    assert not (tmp_path / want.path).exists()


def test_the_plain_http_limit_error_names_the_limit(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}) as hub:
        want = weight(hub)
        hub.plain_http_limit = want.size - 1
        with pytest.raises(TransferError) as caught:
            get(hub, tmp_path, want)
    assert f"{want.size - 1}-byte limit" in str(caught.value)


# ----------------------------------------------------------------------------- peers, secrets


def test_peer_server_serves_only_listed_files_and_only_with_the_token(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(30_000)
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "secret.txt").write_text("not for peers")
    with serve_files("127.0.0.1", 0, {"/m/a.bin": str(tmp_path / "a.bin")}, PEER_TOKEN) as peer:
        url = f"{peer.url}/m/a.bin"
        assert raw(url)[0] == 401
        assert raw(url, {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert raw(f"{peer.url}/secret.txt", peer_auth())[0] == 404
        assert raw(f"{peer.url}/m/../secret.txt", peer_auth())[0] == 404
        assert raw(url, peer_auth()) == (200, data)
        assert raw(url, {**peer_auth(), "Range": "bytes=100-"}) == (206, data[100:])
        assert raw(url, {**peer_auth(), "Range": "bytes=30000-"})[0] == 416
        sha = hashlib.sha256(data).hexdigest()
        with pytest.raises(TransferError, match=r"HTTP 401.*token was refused") as caught:
            fetch(
                url,
                str(tmp_path / "out"),
                sha256=sha,
                size=30_000,
                headers={"Authorization": "Bearer not-the-token-at-all"},
                **FAST,
            )
        assert caught.value.status == 401
        result = fetch(url, str(tmp_path / "out"), sha256=sha, size=30_000, headers=peer_auth())
        assert result.bytes_downloaded == 30_000
        assert peer.refused == 3
    with pytest.raises(ValueError, match="at least 16"):
        serve_files("127.0.0.1", 0, {}, "short")


def test_token_is_dropped_on_a_redirect_to_another_host(model_dir: Path, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestHub({REPO: model_dir}, token=TOKEN, cdn_host="127.0.0.2") as hub:
        want = next(w for w in wanted_files(hub) if w.git_sha1 is None)
        get(hub, tmp_path, want, headers=auth)
        assert hub.stats().cdn_requests_with_authorization == 0
    with TestHub({REPO: model_dir}, token=TOKEN) as same_host:  # same host: kept, as hf does
        get(same_host, tmp_path / "again", want, headers=auth)
        assert same_host.stats().cdn_requests_with_authorization == 1


@pytest.mark.parametrize(
    "case", ["wrong token", "always 503", "always cut", "hub gone", "missing file", "bad header"]
)
def test_the_token_never_appears_in_an_error(model_dir: Path, tmp_path: Path, case: str) -> None:
    faults = {
        "always 503": Faults(error_fraction=1.0, retry_after=0),
        "always cut": Faults(cut_fraction=1.0),
    }.get(case, Faults())
    sent = f"Bearer {TOKEN}" if case != "wrong token" else "Bearer hf_WrOnG_token_9a8b7c6d5e4f"
    if case == "bad header":
        sent += "\r\nX-Injected: 1"
    with TestHub({REPO: model_dir}, token=TOKEN, faults=faults) as hub:
        want = wanted_files(hub)[0]
        if case == "missing file":
            want = Wanted("nope.safetensors", 10, "0" * 64, None)
        if case == "hub gone":
            hub.close()
        with pytest.raises(TransferError) as caught:
            get(hub, tmp_path, want, headers={"Authorization": sent}, retries=1, max_attempts=3)
    error = caught.value
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    everything = " ".join([str(error), repr(error), text, repr(vars(error)), repr(error.args)])
    for secret in (TOKEN, sent, sent.split(" ", 1)[1]):
        assert secret not in everything
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    for path in tmp_path.rglob("*"):  # nor in any file (name or content) the fetch left
        assert TOKEN not in path.name
        if path.is_file() and path.stat().st_size < 1_000_000:
            assert TOKEN.encode() not in path.read_bytes()


def test_the_token_never_appears_in_a_result(model_dir: Path, tmp_path: Path) -> None:
    with TestHub({REPO: model_dir}, token=TOKEN) as hub:
        result = get(
            hub, tmp_path, wanted_files(hub)[0], headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert TOKEN not in repr(result) and TOKEN not in json.dumps(result.to_json())


def test_transfer_is_stdlib_only_python39() -> None:
    """It runs on the nodes inside the agent: no third-party or orch imports, 3.9 syntax."""
    source = Path(transfer.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


OLD_PYTHON_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("transfer", sys.argv[1])
transfer = sys.modules["transfer"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(transfer)
url, dest, sha, size, peer_file, token = sys.argv[2:8]
result = transfer.fetch(url, dest, sha256=sha, size=int(size), backoff=0.01, retries=20)
with transfer.serve_files("127.0.0.1", 0, {"/f": peer_file}, token) as peer:
    again = transfer.fetch(peer.url + "/f", dest + ".peer", sha256=sha, size=int(size),
                           headers={"Authorization": "Bearer " + token})
print(json.dumps([result.to_json(), again.to_json()]))
"""


@pytest.mark.parametrize("version", ["3.9", "3.10"])
def test_fetch_and_serve_run_on_old_pythons(model_dir: Path, tmp_path: Path, version: str) -> None:
    """The nodes' Python may be old: run the real module under it, against the hub."""
    found = [*Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python")]
    if not found:
        pytest.skip(f"no python{version} on this machine")
    faults = Faults(cut_fraction=0.5, error_fraction=0.1, retry_after=0, seed=3)
    with TestHub({REPO: model_dir}, faults=faults) as hub:
        want = next(w for w in wanted_files(hub) if w.path.endswith(".safetensors"))
        kept = (model_dir / want.path).read_bytes()[:300_000]  # an earlier run's partial
        (tmp_path / (want.path + ".partial")).write_bytes(kept)
        argv = [hub.resolve_url(REPO, want.path), str(tmp_path / want.path), truth(model_dir, want)]
        argv += [str(want.size), str(model_dir / want.path), PEER_TOKEN]
        proc = subprocess.run(
            [str(found[0]), "-c", OLD_PYTHON_SCRIPT, transfer.__file__, *argv],
            capture_output=True,
            timeout=60,
            check=False,
        )
        stats = hub.stats()
    assert proc.returncode == 0, proc.stderr.decode()
    from_hub, from_peer = json.loads(proc.stdout)
    assert from_hub["bytes_resumed"] == 300_000 and from_hub["retries"] >= 1  # seed 3: cuts
    assert stats.total_bytes_served == want.size - 300_000
    assert from_peer["bytes_downloaded"] == want.size
    assert sha256_of(tmp_path / want.path) == sha256_of(tmp_path / (want.path + ".peer"))


# ----------------------------------------------------------------------------- helpers


def peer_auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {PEER_TOKEN}"}


def serve_node(node: Path, wanted: list[Wanted]) -> transfer.PeerServer:
    """What a node with verified copies runs: its files under the same paths as the hub's."""
    files = {f"/{REPO}/resolve/main/{w.path}": str(node / w.path) for w in wanted}
    return serve_files("127.0.0.1", 0, files, PEER_TOKEN)


class Peer:
    """Gives a peer server the hub's `resolve_url`, so `get` fetches from either."""

    def __init__(self, server: transfer.PeerServer) -> None:
        self.server = server

    def resolve_url(self, repo_id: str, path: str) -> str:
        return f"{self.server.url}/{repo_id}/resolve/main/{urllib.parse.quote(path)}"


def raw(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class StubServer:
    """Answers scripted (status, headers, body) replies in order (the last one repeats), and
    records each request's Range header: for server behaviours the hub does not have."""

    def __init__(self, replies: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.replies = replies
        self.ranges: list[str | None] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                with contextlib.suppress(ConnectionError):  # fetch hangs up on bad replies
                    super().handle()

            def do_GET(self) -> None:
                stub.ranges.append(self.headers.get("Range"))
                index = min(len(stub.ranges), len(stub.replies)) - 1
                status, headers, body = stub.replies[index]
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/file"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    """Every server a test starts is closed by it: no request loop outlives its test."""
    before = {t for t in threading.enumerate() if t.is_alive()}
    yield
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        stray = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name in ("test-hub", "orch-peer")
        ]
        if not stray:
            return
        time.sleep(0.05)
    raise AssertionError(f"servers left running: {stray}")
