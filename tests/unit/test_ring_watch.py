"""The worker's ring watch and idle wait on plain TCP connections (no ring): which sockets it
watches, that a peer's close is seen, and that an idle rank sleeps until the ring's next bytes,
while pending bytes are left for mlx to read."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.worker import mlx_worker


@pytest.fixture
def ring() -> Iterator[tuple[socket.socket, socket.socket, tuple[str, int]]]:
    """A rank's listener on its endpoint, a peer connected to it, and the accepted side."""
    listener = socket.create_server(("127.0.0.1", 0))
    mine = listener.getsockname()[:2]
    peer = socket.create_connection(mine)
    accepted, _ = listener.accept()
    try:
        yield accepted, peer, mine
    finally:
        for s in (listener, peer, accepted):
            s.close()


def test_the_hostfile_gives_every_rank_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "hostfile.json"
    path.write_text(json.dumps([["10.0.0.1:47100"], ["10.0.0.2:47101"]]))
    assert mlx_worker.hostfile_endpoints(str(path)) == [("10.0.0.1", 47100), ("10.0.0.2", 47101)]


def test_watches_the_ring_connections_and_sees_a_peer_leave(
    ring: tuple[socket.socket, socket.socket, tuple[str, int]],
) -> None:
    accepted, peer, mine = ring
    found = mlx_worker.ring_sockets([mine], mine)
    try:
        ends = sorted((s.getsockname()[:2], s.getpeername()[:2]) for s in found)
        # the accepted side (on this rank's endpoint) and, here in one process, the peer's
        # own connection to that endpoint; never the listener
        assert ends == sorted([(accepted.getsockname()[:2], accepted.getpeername()[:2]),
                               (peer.getsockname()[:2], peer.getpeername()[:2])])
        mine_side = next(s for s in found if s.getsockname()[:2] == mine)
        assert mlx_worker.peer_gone(mine_side) is None
        peer.sendall(b"x")
        assert mlx_worker.peer_gone(mine_side) is None  # data pending: alive, and not eaten
        assert accepted.recv(1) == b"x"
        for s in found:  # the peer's side, as the watch dup'd it, closes with the peer
            if s is not mine_side:
                s.close()
        peer.close()
        assert mlx_worker.peer_gone(mine_side) == "closed by the peer"
    finally:
        for s in found:
            s.close()
    assert accepted.fileno() != -1  # closing the watch's dups left the connection open


def test_other_connections_are_not_watched() -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        client = socket.create_connection(other.getsockname()[:2])
        server, _ = other.accept()
        try:
            assert mlx_worker.ring_sockets([("127.0.0.1", 1)], ("127.0.0.1", 1)) == []
        finally:
            client.close()
            server.close()


def test_an_idle_rank_waits_for_the_rings_next_bytes_before_sharing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle wait: mlx-lm's `_share_object` (here a recorder) runs only once a ring
    connection has bytes, which it leaves for mlx; a closed connection wakes it too."""
    import mlx_lm.server

    shared: list[object] = []

    def recorder(self: object, obj: object) -> object:
        shared.append(obj)
        return obj

    monkeypatch.setattr(mlx_lm.server.ResponseGenerator, "_share_object", recorder)
    left, mine = socket.socketpair()
    right, other = socket.socketpair()
    with left, mine, right, other:
        assert mlx_worker.install_idle_wait([mine, other])
        share = mlx_lm.server.ResponseGenerator._share_object
        done = threading.Thread(target=share, args=(None, "request"))
        done.start()
        done.join(0.3)
        assert done.is_alive() and shared == [], "shared before any ring bytes arrived"
        left.sendall(b"x")
        done.join()
        assert shared == ["request"]
        assert mine.recv(1, socket.MSG_DONTWAIT) == b"x", "the bytes were left for mlx"
        right.close()  # a peer gone: the wait ends and mlx sees the broken ring itself
        assert share(None, "next") == "next"


def test_no_idle_wait_on_an_mlx_lm_without_its_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx_lm.server

    def other(self: object, obj: object, extra: object) -> object: ...

    monkeypatch.setattr(mlx_lm.server.ResponseGenerator, "_share_object", other)
    a, b = socket.socketpair()
    with a, b:
        assert not mlx_worker.install_idle_wait([a])
        assert mlx_lm.server.ResponseGenerator._share_object is other
        monkeypatch.delattr(mlx_lm.server.ResponseGenerator, "_share_object")
        assert not mlx_worker.install_idle_wait([a])
