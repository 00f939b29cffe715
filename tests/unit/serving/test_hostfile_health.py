"""The controller side of a ring: the hostfile it renders, and how it waits for and explains
readiness. Pure: scripted HTTP answers, no worker."""

from __future__ import annotations

import asyncio
import json

import pytest

from orchestrator.plan.ring import RankSnapshot
from orchestrator.verify.health import (
    FIRST_POLL,
    ReadyStage,
    Transport,
    explain_not_ready,
    rank_problems,
    wait_ready,
)
from orchestrator.worker.hostfile import parse_hostfile, render_hostfile
from orchestrator.worker.status import parse_status

# -------------------------------------------------------------------------------- hostfile


def test_hostfile_is_mlx_ring_format_in_rank_order() -> None:
    text = render_hostfile([("10.0.0.1", 47100), ("10.0.0.2", 47101)])
    assert text == '[["10.0.0.1:47100"], ["10.0.0.2:47101"]]\n'
    assert parse_hostfile(text) == (("10.0.0.1", 47100), ("10.0.0.2", 47101))


@pytest.mark.parametrize(("endpoints", "message"), [
    ([], "at least two ranks, got 0"),
    ([("10.0.0.1", 47100)], "at least two ranks, got 1"),
    ([("studio-1.local", 47100), ("10.0.0.2", 47101)], "not an IP address"),
    ([("10.0.0.1", 47100), ("fe80::1", 47101)], "IPv6"),
    ([("10.0.0.1", 0), ("10.0.0.2", 47101)], "not in 1..65535"),
    ([("10.0.0.1", 47100), ("10.0.0.1", 47100)], "rank 1 repeats ring address 10.0.0.1:47100"),
])
def test_hostfile_refuses_what_mlx_would_misread(endpoints: list[tuple[str, int]],
                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_hostfile(endpoints)


# ------------------------------------------------------------------------------- readiness


def scripted(answers: list[object]) -> tuple[Transport, list[str]]:
    """A transport that plays ``answers`` in order (an exception is raised) and logs URLs."""
    seen: list[str] = []

    def transport(url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        seen.append(url.rsplit("/", 1)[-1])
        answer = answers.pop(0) if answers else OSError("connection refused")
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    return transport, seen


COMPLETION = json.dumps({"choices": [{
    "message": {"role": "assistant", "content": "OK"}, "finish_reason": "length",
    "logprobs": {"content": [{"id": 46, "logprob": -0.5}, {"id": 74, "logprob": -1.25}]}}]})


def test_wait_ready_retries_until_a_real_completion() -> None:
    transport, seen = scripted([
        ConnectionRefusedError("refused"),  # HTTP not up yet
        (503, b'{"status": "unhealthy"}'),
        (200, b"{}"), (404, b'{"error": "generation failed"}'),
        (200, b"{}"), (200, COMPLETION.encode()),
    ])
    result = asyncio.run(wait_ready("http://127.0.0.21:8080", timeout=30, poll_interval=0.01,
                                    transport=transport))
    assert result.ready and result.attempts == 4
    assert result.completion is not None
    assert result.completion.token_ids == (46, 74)
    assert result.completion.logprobs == (-0.5, -1.25)
    assert seen == ["health", "health", "health", "completions", "health", "completions"]


def test_wait_ready_polls_quickly_at_first_then_backs_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring about to answer is seen within a fraction of a second, not at the next whole
    interval; one still loading is asked once per `poll_interval`. (The waits are read off
    asyncio.sleep, not timed.)"""
    waits: list[float] = []

    async def no_wait(delay: float) -> None:
        waits.append(round(delay, 3))

    monkeypatch.setattr(asyncio, "sleep", no_wait)
    transport, _ = scripted([ConnectionRefusedError("refused")] * 6
                            + [(200, b"{}"), (200, COMPLETION.encode())])
    result = asyncio.run(wait_ready("http://127.0.0.21:8080", timeout=600, poll_interval=1.0,
                                    transport=transport))
    assert result.ready and result.attempts == 7
    assert waits == [FIRST_POLL, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_wait_ready_times_out_with_the_last_failure() -> None:
    transport, _ = scripted([(200, b"{}"), (404, b'{"error": "boom"}')])
    result = asyncio.run(wait_ready("http://127.0.0.21:8080", timeout=0.3, poll_interval=0.05,
                                    transport=transport))
    assert not result.ready and result.stage is ReadyStage.UNREACHABLE
    assert result.detail.startswith("not ready after 0.3 s: ")
    assert "connection refused" in result.detail


def test_not_ready_names_the_failed_rank_and_shows_its_log() -> None:
    def status(rank: int, state: str, error: str | None = None) -> str:
        return json.dumps({"rank": rank, "world_size": 3, "split": [2, 3, 1],
                           "layers": [[4, 6], [1, 4], [0, 1]][rank], "state": state,
                           "pid": 100 + rank, "started_at": 1.0, "updated_at": 2.0,
                           "error": error})

    log = "\n".join(f"line {i}" for i in range(50)) + "\nsha256 mismatch /m/model-2.safetensors\n"
    ranks = [
        RankSnapshot(0, "10.0.0.1", True, parse_status(status(0, "ring")), "waiting"),
        RankSnapshot(1, "10.0.0.2", True, parse_status(status(1, "ring")), "waiting"),
        RankSnapshot(2, "10.0.0.3", False, parse_status(status(2, "failed", "sha256 mismatch")),
                     log, exit_code=3),
    ]
    assert rank_problems(ranks, 3) == (
        "rank 0 (10.0.0.1): still ring",
        "rank 1 (10.0.0.2): still ring",
        "rank 2 (10.0.0.3): not running (last exit 3)",
        "rank 2 (10.0.0.3): failed: sha256 mismatch",
    )
    transport, _ = scripted([])
    result = asyncio.run(wait_ready("http://10.0.0.1:8080", timeout=0.1, transport=transport))
    message = explain_not_ready(result, ranks, 3, tail_lines=5)
    assert "last 5 log lines of rank 2 (10.0.0.3):" in message
    assert message.endswith("  | sha256 mismatch /m/model-2.safetensors")
    assert "line 45" not in message and "line 46" in message
