"""`orch bench`'s measuring against a fake streaming API with a fake clock (no MLX, no HTTP)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from orchestrator.verify.bench import (
    bench_api,
    bench_json,
    bench_text,
    make_prompt,
    parse_stream,
)
from orchestrator.verify.health import CompletionError
from tests.fixtures.cli import orch


def sse(chunk: dict[str, Any] | str) -> bytes:
    data = chunk if isinstance(chunk, str) else json.dumps(chunk)
    return f"data: {data}\n".encode()


def text(t: str) -> dict[str, Any]:
    return {"choices": [{"delta": {"content": t}, "finish_reason": None}]}


FINISH = {"choices": [{"delta": {"content": ""}, "finish_reason": "length"}]}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "prompt_tokens_details": {"cached_tokens": cached}}}


def test_a_stream_is_timed_at_its_first_text_and_its_finish_with_the_servers_counts() -> None:
    lines = [(10.2, b": keepalive 3/8\n"), (10.5, sse(text("a"))), (10.5, b"\n"),
             (10.6, sse(text("b"))), (10.8, sse(text("cd"))), (10.9, sse(FINISH)),
             (10.9, sse(usage(12, 5, cached=2))), (10.9, sse("[DONE]"))]
    stream = parse_stream(10.0, lines)
    assert stream.first_s == pytest.approx(0.5) and stream.finish_s == pytest.approx(0.9)
    assert (stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens,
            stream.chunks) == (12, 5, 2, 3)


def test_a_stream_without_text_starts_at_its_finish_and_a_cut_stream_is_an_error() -> None:
    silent = parse_stream(0.0, [(0.3, sse(FINISH)), (0.3, sse(usage(4, 1)))])
    assert silent.first_s == pytest.approx(0.3) and silent.chunks == 0
    with pytest.raises(CompletionError, match="without a finish"):
        parse_stream(0.0, [(0.3, sse(text("x")))])
    with pytest.raises(CompletionError, match="not JSON"):
        parse_stream(0.0, [(0.3, b"data: {oops\n")])


class FakeAPI:
    """Streams `max_tokens` tokens, 10 ms apart after a prefill of 1 ms per prompt word; with
    `burst`, the text of all of them arrives with the last (as a detokenizer holding back
    partial UTF-8 does)."""

    def __init__(self, status: int = 200, *, burst: bool = False) -> None:
        self.status = status
        self.burst = burst
        self.bodies: list[dict[str, Any]] = []
        self.clock = 100.0

    def __call__(self, url: str, body: bytes, timeout: float
                 ) -> tuple[int, float, list[tuple[float, bytes]]]:
        assert url == "http://127.0.0.1:8080/v1/chat/completions"
        request = json.loads(body)
        self.bodies.append(request)
        if self.status != 200:
            return self.status, self.clock, [(self.clock, b'{"error": "boom"}')]
        started = self.clock
        words = len(request["messages"][0]["content"].split())
        at = started + 0.001 * words
        lines = []
        end = at + 0.010 * (request["max_tokens"] - 1)
        for i in range(request["max_tokens"]):
            lines.append((end if self.burst else at + 0.010 * i, sse(text(f"t{i}"))))
        lines += [(end, sse(FINISH)), (end, sse(usage(words, request["max_tokens"]))),
                  (end, sse("[DONE]"))]
        self.clock = end + 1
        return 200, started, lines


@pytest.mark.parametrize("burst", [False, True])
def test_bench_times_a_one_token_and_a_long_completion_of_a_distinct_prompt_each(
        burst: bool) -> None:
    api = FakeAPI(burst=burst)
    result = asyncio.run(bench_api("http://127.0.0.1:8080", cluster="lab", words=(10, 100),
                                   repeat=3, max_tokens=5, estimate_tps=400.0, transport=api))
    assert len(api.bodies) == 1 + 2 * 3 * 2  # one warm-up, then 3 pairs per length
    assert [b["max_tokens"] for b in api.bodies[1:5]] == [1, 5, 1, 5]
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True}
               and b["temperature"] == 0.0 for b in api.bodies)
    firsts = [b["messages"][0]["content"].split()[0] for b in api.bodies]
    assert len(set(firsts)) == len(firsts)  # no prefix the prompt cache could reuse
    assert len({len(f) for f in firsts}) == 1  # ... and prompts of one length
    short, long = result.lengths
    assert (short.words, short.prompt_tokens, long.prompt_tokens) == (10, 10, 100)
    assert short.ttft.median == pytest.approx(0.010) and long.ttft.median == pytest.approx(0.1)
    # 4 tokens after the first, 10 ms each, however the text arrived
    assert short.decode is not None and short.decode.median == pytest.approx(100.0)
    assert result.ratio(short) == pytest.approx(0.25)
    document = bench_json(result)
    assert document["lengths"][1]["decode_vs_estimate"] == pytest.approx(0.25)
    assert len(document["lengths"][0]["samples"]) == 3
    assert document["lengths"][0]["samples"][0]["long"]["chunks"] == 5
    json.dumps(document)  # plain data
    rendered = bench_text(result)
    assert "10 words" in rendered and "100 words" in rendered
    assert "0.250" in rendered and "400.0 tok/s" in rendered


def test_an_api_error_is_a_completion_error_and_no_estimate_prints_unknown() -> None:
    with pytest.raises(CompletionError, match="answered 500"):
        asyncio.run(bench_api("http://127.0.0.1:8080", transport=FakeAPI(500)))
    result = asyncio.run(bench_api("http://127.0.0.1:8080", words=(3,), repeat=1, warmup=0,
                                   transport=FakeAPI()))
    assert result.ratio(result.lengths[0]) is None
    assert "estimate: unknown" in bench_text(result)


def test_prompts_have_the_words_asked_for() -> None:
    assert len(make_prompt(64, 7).split()) == 64
    assert make_prompt(1, 3) == "000003."


def test_bench_refuses_bad_prompt_lengths_in_one_line_before_anything_else() -> None:
    ran = orch("bench", "nowhere.yml", "--prompt-words", "8,0")
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == [
        "error: orch bench: Invalid value for '--prompt-words': '8,0'; expected positive "
        "integers separated by commas (see 'orch bench --help')"]
