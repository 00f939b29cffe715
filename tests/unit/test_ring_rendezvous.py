"""The worker's rendezvous before mlx's ring forms, on plain loopback sockets: rank 0 says go only
when every other rank of the same ring has checked in, a rank that left before go must check in
again, and a joining rank never writes a byte to a listener that is not rank 0's rendezvous
(mlx's own, once rank 0 is inside ``init``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from orchestrator.worker import mlx_worker

Endpoint = tuple[str, int]


def free_endpoint() -> Endpoint:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1", int(s.getsockname()[1])


class Rank(threading.Thread):
    """One rank's rendezvous in a thread; records when it returned or what it raised."""

    def __init__(self, call: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.call, self.returned_at = call, 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.call()
            self.returned_at = time.monotonic()
        except BaseException as exc:  # reported by done()
            self.error = exc

    def done(self, timeout: float = 10.0) -> Rank:
        self.join(timeout)
        assert not self.is_alive(), "the rendezvous did not return"
        assert self.error is None, self.error
        return self


def connect(endpoint: Endpoint) -> socket.socket:
    """A raw connection to rank 0's rendezvous, once it listens."""
    end = time.monotonic() + 5
    while True:
        try:
            return socket.create_connection(endpoint, timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


def start(call: Callable[[], None]) -> Rank:
    rank = Rank(call)
    rank.start()
    return rank


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short waits, so that the give-up paths end in a fraction of a second."""
    monkeypatch.setattr(mlx_worker, "RENDEZVOUS_RETRY", 0.01)
    monkeypatch.setattr(mlx_worker, "RENDEZVOUS_HELLO_WAIT", 0.2)
    monkeypatch.setattr(mlx_worker, "RENDEZVOUS_GIVE_UP", 0.6)


@pytest.fixture
def ring() -> Iterator[list[Endpoint]]:
    yield [free_endpoint(), free_endpoint(), free_endpoint()]


def test_no_rank_goes_before_every_rank_has_checked_in(ring: list[Endpoint]) -> None:
    # The last rank first, rank 0 in between, rank 1 last: the order that cost mlx's rank 2
    # its first connect (refused, then a one-second back-off).
    last = start(lambda: mlx_worker.rendezvous(ring, 2))
    time.sleep(0.2)
    first = start(lambda: mlx_worker.rendezvous(ring, 0))
    time.sleep(0.3)
    assert last.is_alive() and first.is_alive(), "went before rank 1 was ready"
    checked_in_at = time.monotonic()
    middle = start(lambda: mlx_worker.rendezvous(ring, 1))
    for rank in (first.done(), middle.done(), last.done()):
        assert rank.returned_at >= checked_in_at
    # rank 2 connects to rank 0 first: it gives rank 0 a head start to be listening.
    assert last.returned_at - first.returned_at >= mlx_worker.LAST_RANK_DELAY * 0.9


def test_a_rank_that_left_before_go_is_waited_for_again(ring: list[Endpoint]) -> None:
    gathering = start(lambda: mlx_worker.rendezvous(ring, 0))
    digest = mlx_worker.ring_digest(ring)
    with connect(ring[0]) as gone:  # rank 1, then its process dies
        assert mlx_worker.read_line(gone) == mlx_worker.hello(digest)[:-1]
        gone.sendall(b"ready 1\n")
        time.sleep(0.1)
    last = start(lambda: mlx_worker.rendezvous(ring, 2))
    time.sleep(0.5)
    assert gathering.is_alive() and last.is_alive(), "rank 1 counted after it had left"
    middle = start(lambda: mlx_worker.rendezvous(ring, 1))  # rank 1, restarted by launchd
    for rank in (gathering, middle, last):
        rank.done()


def test_a_rank_of_another_ring_does_not_count(ring: list[Endpoint], quick: None) -> None:
    """An undrain's new ring has one rank more than the old one: ranks of the old ring still
    checking in (the same rank 0 endpoint) are not members of the new one."""
    two = ring[:2]
    gathering = start(lambda: mlx_worker.rendezvous(two, 0))
    with pytest.raises(mlx_worker.WorkerError) as refused:
        mlx_worker.rendezvous(ring, 1)  # the same rank 0 endpoint, another ring
    assert refused.value.code == mlx_worker.EXIT_RING
    assert gathering.is_alive()
    start(lambda: mlx_worker.rendezvous(two, 1)).done()
    gathering.done()


def test_a_check_in_writes_nothing_to_a_listener_that_sends_no_hello(
    ring: list[Endpoint], quick: None,
) -> None:
    """mlx's own listener (rank 0 already inside ``init``) accepts and stays silent: a byte
    written there would be read as tensor data by the ring's first collective."""
    received: list[bytes] = []
    listener = socket.create_server(ring[0])
    listener.settimeout(0.1)

    def mute() -> None:
        end = time.monotonic() + 2
        while time.monotonic() < end:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    while chunk := conn.recv(64):
                        received.append(chunk)
                except OSError:
                    pass

    silent = threading.Thread(target=mute, daemon=True)
    silent.start()
    try:
        with pytest.raises(mlx_worker.WorkerError) as gave_up:
            mlx_worker.rendezvous(ring, 2)
        assert "did not answer" in str(gave_up.value)
    finally:
        silent.join(5)
        listener.close()
    assert received == []


def test_a_malformed_check_in_is_dropped_and_the_ring_still_forms(ring: list[Endpoint]) -> None:
    two = ring[:2]
    gathering = start(lambda: mlx_worker.rendezvous(two, 0))
    with connect(two[0]) as stranger:
        mlx_worker.read_line(stranger)
        stranger.sendall(b"ready 7\n")  # no such rank
        assert mlx_worker.read_line(stranger) == b"", "a bad check-in must be closed"
    assert gathering.is_alive()
    start(lambda: mlx_worker.rendezvous(two, 1)).done()
    gathering.done()
