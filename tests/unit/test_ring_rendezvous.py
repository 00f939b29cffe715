"""The worker's rendezvous before mlx's ring forms, on plain loopback sockets: rank 0 says go only
when every other rank of the same ring has checked in, a rank that left before go must check in
again, and neither a rank of another ring nor a malformed or repeated check-in counts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from orchestrator.simulator.processes import free_port
from orchestrator.worker import mlx_worker

Endpoint = tuple[str, int]


def free_endpoint() -> Endpoint:
    return "127.0.0.1", free_port("127.0.0.1")


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
def ring() -> Iterator[list[Endpoint]]:
    yield [free_endpoint(), free_endpoint(), free_endpoint()]


@pytest.fixture
def point() -> Endpoint:
    """Rank 0's rendezvous: its own port, never one of the ring's."""
    return free_endpoint()


def test_no_rank_goes_before_every_rank_has_checked_in(
    ring: list[Endpoint], point: Endpoint,
) -> None:
    # The last rank first, rank 0 in between, rank 1 last: the order that cost mlx's rank 2
    # its first connect (refused, then a one-second back-off).
    last = start(lambda: mlx_worker.rendezvous(point, ring, 2))
    time.sleep(0.2)
    first = start(lambda: mlx_worker.rendezvous(point, ring, 0))
    time.sleep(0.3)
    assert last.is_alive() and first.is_alive(), "went before rank 1 was ready"
    checked_in_at = time.monotonic()
    middle = start(lambda: mlx_worker.rendezvous(point, ring, 1))
    for rank in (first.done(), middle.done(), last.done()):
        assert rank.returned_at >= checked_in_at
    # rank 2 connects to rank 0 first: it gives rank 0 a head start (LAST_RANK_DELAY) to be
    # listening, so it goes after rank 0 and rank 1 (which accept first) have.
    assert last.returned_at > max(first.returned_at, middle.returned_at)


def test_a_rank_that_left_before_go_is_waited_for_again(
    ring: list[Endpoint], point: Endpoint,
) -> None:
    gathering = start(lambda: mlx_worker.rendezvous(point, ring, 0))
    digest = mlx_worker.ring_digest(ring)
    with connect(point) as gone:  # rank 1, then its process dies
        assert mlx_worker.read_line(gone) == mlx_worker.hello(digest)[:-1]
        gone.sendall(b"ready 1\n")
        time.sleep(0.1)
    last = start(lambda: mlx_worker.rendezvous(point, ring, 2))
    time.sleep(0.5)
    assert gathering.is_alive() and last.is_alive(), "rank 1 counted after it had left"
    middle = start(lambda: mlx_worker.rendezvous(point, ring, 1))  # rank 1, restarted by launchd
    for rank in (gathering, middle, last):
        rank.done()


def test_a_rank_of_another_ring_does_not_count(ring: list[Endpoint], point: Endpoint) -> None:
    """An undrain's new ring has one rank more than the old one: a rank of the old ring still
    checking in at the same rendezvous is not a member of the new one."""
    two = ring[:2]
    gathering = start(lambda: mlx_worker.rendezvous(point, two, 0))
    with pytest.raises(mlx_worker.WorkerError) as refused:
        mlx_worker.check_in(point, 1, mlx_worker.ring_digest(ring), give_up=0.5)
    assert refused.value.code == mlx_worker.EXIT_RING
    assert gathering.is_alive()
    start(lambda: mlx_worker.rendezvous(point, two, 1)).done()
    gathering.done()


def test_a_check_in_split_across_reads_and_a_repeated_one_count_once(
    ring: list[Endpoint], point: Endpoint,
) -> None:
    gathering = start(lambda: mlx_worker.rendezvous(point, ring, 0))
    digest = mlx_worker.ring_digest(ring)
    with connect(point) as first, connect(point) as again:
        for sock in (first, again):
            assert mlx_worker.read_line(sock) == mlx_worker.hello(digest)[:-1]
        first.sendall(b"rea")
        time.sleep(0.1)
        first.sendall(b"dy 1\n")
        time.sleep(0.1)
        again.sendall(b"ready 1\n")  # rank 1 restarted: its new check-in replaces the old
        assert mlx_worker.read_line(first) == b"", "the replaced check-in must be closed"
        time.sleep(0.2)
        assert gathering.is_alive(), "rank 1 counted twice: rank 2 has not checked in"
        last = start(lambda: mlx_worker.rendezvous(point, ring, 2))
        assert mlx_worker.read_line(again) == b"go"
        gathering.done()
        last.done()


def test_rank_0_waits_for_a_rank_as_long_as_it_takes(ring: list[Endpoint], point: Endpoint,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """mlx's ranks that accept first wait for ever; so does a rank waiting for rank 0, saying
    so in its log now and then."""
    monkeypatch.setattr(mlx_worker, "RENDEZVOUS_NOTICE", 0.2)
    said: list[str] = []
    monkeypatch.setattr(mlx_worker, "log", said.append)
    waiting = start(lambda: mlx_worker.rendezvous(point, ring[:2], 1))
    time.sleep(0.7)
    assert waiting.is_alive()
    assert any(line.startswith(f"still waiting for rank 0 at {point[0]}:{point[1]}")
               for line in said), said
    start(lambda: mlx_worker.rendezvous(point, ring[:2], 0)).done()
    waiting.done()


def test_a_malformed_check_in_is_dropped_and_the_ring_still_forms(
    ring: list[Endpoint], point: Endpoint,
) -> None:
    two = ring[:2]
    gathering = start(lambda: mlx_worker.rendezvous(point, two, 0))
    with connect(point) as stranger:
        mlx_worker.read_line(stranger)
        stranger.sendall(b"ready 7\n")  # no such rank
        assert mlx_worker.read_line(stranger) == b"", "a bad check-in must be closed"
    assert gathering.is_alive()
    start(lambda: mlx_worker.rendezvous(point, two, 1)).done()
    gathering.done()


def test_rank_0_waits_for_its_port_then_says_why_it_cannot_listen(
    ring: list[Endpoint], point: Endpoint, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rank 0 being replaced may still hold the rendezvous port for a moment."""
    monkeypatch.setattr(mlx_worker, "RENDEZVOUS_BIND_WAIT", 0.3)
    with socket.create_server(point), pytest.raises(mlx_worker.WorkerError) as taken:
        mlx_worker.rendezvous(point, ring[:2], 0)
    assert taken.value.code == mlx_worker.EXIT_RING
    assert f"the rendezvous at {point[0]}:{point[1]} failed" in str(taken.value)
    holder = socket.create_server(point)
    threading.Timer(0.2, holder.close).start()  # freed while rank 0 still tries
    gathering = start(lambda: mlx_worker.rendezvous(point, ring[:2], 0))
    start(lambda: mlx_worker.rendezvous(point, ring[:2], 1)).done()
    gathering.done()
