"""`orch bench`: the serving ring's measured speed, beside the placement's decode estimate.

What is measured, per prompt length, ``repeat`` times, each time with two greedy streamed chat
completions (``stream: true`` with ``stream_options.include_usage``) of prompts of the same
length:

- **TTFT**, time to first token: a completion of one token, from sending the request to its
  first chunk (text or finish). It includes the HTTP round trip, the prompt's prefill through
  every rank and one decode step.
- **decode tokens/s**: a completion of ``max_tokens``, timed to its finish chunk (which mlx-lm
  writes right after the last token), against the first:
  ``(completion_tokens - 1) / (t_finish - ttft)``, ``completion_tokens`` being the server's own
  count (the usage chunk).

Why not the gaps between one stream's chunks: mlx-lm sends a chunk only when its detokenizer
has text, and a token that ends mid UTF-8 character sends none. A real model's tokens nearly
always do; the sandbox's random weights mostly do not, and their text arrives in one burst at
the end, which would read as thousands of tokens a second. The two-request difference depends
on no text at all (each stream's chunk count is kept per sample, to show it).

Each request starts with a different number of the same width, so mlx-lm's prompt cache, which
reuses a common prefix, cannot turn a prefill into a cache hit (the usage's ``cached_tokens`` is
kept per sample to show it did not) while the prompt's length stays the same. One unmeasured
warm-up request goes first: the first completion after a load compiles kernels.

The estimate (`orchestrator.placement.estimate`) is an upper bound on single-stream decode
speed; the report gives measured / estimate as a ratio and never judges it. Medians and the
spread (min–max) are over the repetitions. Nothing here talks SSH: only the API.

HTTP goes through a one-function `StreamTransport` (stdlib ``urllib`` in a thread by default),
the seam unit tests replace with a fake clock.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.config import Cluster
from orchestrator.placement.choose import Placement
from orchestrator.placement.intent import place
from orchestrator.resources.layout import api_url
from orchestrator.verify.health import CompletionError

__all__ = [
    "BenchResult",
    "LengthResult",
    "Sample",
    "Spread",
    "Stream",
    "StreamTransport",
    "bench_api",
    "bench_cluster",
    "bench_json",
    "bench_text",
    "make_prompt",
    "parse_stream",
    "urllib_stream",
]

# (url, JSON body, timeout seconds) -> (HTTP status, monotonic time the request was sent,
# [(monotonic time the line arrived, line)]). Raises OSError when no HTTP answer came.
StreamTransport = Callable[[str, bytes, float], tuple[int, float, list[tuple[float, bytes]]]]

FILLER = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while",
          "seven", "wise", "owls", "count", "the", "stars", "above", "a", "quiet", "river")


def urllib_stream(url: str, body: bytes, timeout: float
                  ) -> tuple[int, float, list[tuple[float, bytes]]]:
    """The default transport: one blocking urllib request, each line timed as it arrives."""
    request = urllib.request.Request(  # noqa: S310 - the URL is the cluster's own API
        url, data=body, method="POST", headers={"Content-Type": "application/json"})
    started = time.monotonic()
    lines: list[tuple[float, bytes]] = []
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            while line := response.readline():
                lines.append((time.monotonic(), bytes(line)))
            return int(response.status), started, lines
    except urllib.error.HTTPError as exc:
        return exc.code, started, [(time.monotonic(), exc.read())]
    except http.client.HTTPException as exc:  # a malformed or cut answer: no answer
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Stream:
    """One streamed completion, as its chunks and usage tell it."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # the prompt cache's hit, as the server reports it
    chunks: int  # chunks that carried text
    first_s: float  # the first chunk with text or a finish, after the request was sent
    finish_s: float  # the chunk with the finish reason


@dataclass(frozen=True)
class Sample:
    """One repetition: a one-token completion (TTFT) and a long one (decode)."""

    first: Stream
    long: Stream

    @property
    def ttft_s(self) -> float:
        return self.first.first_s

    @property
    def decode_tps(self) -> float | None:
        """None with fewer than two tokens, or when the long one was not the slower."""
        span = self.long.finish_s - self.first.first_s
        tokens = self.long.completion_tokens - 1
        return tokens / span if tokens >= 1 and span > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "decode_tokens_per_s": self.decode_tps,
                "first": vars(self.first), "long": vars(self.long)}


@dataclass(frozen=True)
class Spread:
    """Median and range of one measure over the repetitions."""

    median: float
    low: float
    high: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return Spread(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class LengthResult:
    """Every repetition at one prompt length (`words`: asked for; tokens: as the server
    counted them, which depends on the tokenizer)."""

    words: int
    samples: tuple[Sample, ...]

    @property
    def prompt_tokens(self) -> int:
        return round(statistics.median(s.long.prompt_tokens for s in self.samples))

    @property
    def ttft(self) -> Spread:
        spread = Spread.of([s.ttft_s for s in self.samples])
        assert spread is not None  # a LengthResult has at least one sample
        return spread

    @property
    def decode(self) -> Spread | None:
        return Spread.of([s.decode_tps for s in self.samples if s.decode_tps is not None])


@dataclass(frozen=True)
class BenchResult:
    cluster: str
    api_url: str
    max_tokens: int
    repeat: int
    estimate_tps: float | None  # the placement's decode upper bound (None: a chip unknown)
    lengths: tuple[LengthResult, ...]

    def ratio(self, length: LengthResult) -> float | None:
        """Measured median decode speed over the estimate."""
        decode = length.decode
        if decode is None or not self.estimate_tps:
            return None
        return decode.median / self.estimate_tps


def make_prompt(words: int, nonce: int) -> str:
    """``words`` words of filler, led by a number no other request of the run starts with (of
    one width, so two prompts of as many words have as many tokens)."""
    body = [FILLER[i % len(FILLER)] for i in range(max(0, words - 1))]
    return " ".join([f"{nonce:06d}.", *body])


def parse_stream(started: float, lines: Sequence[tuple[float, bytes]]) -> Stream:
    """A `Stream` from a streamed chat completion's timed SSE lines (CompletionError if the
    stream is not one: no finish, or no usage)."""
    first = final = None
    chunks = 0
    usage: dict[str, Any] | None = None
    for at, raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators and ": keepalive" comments
        data = line[len(b"data:"):].strip()
        if data == b"[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise CompletionError(f"a stream chunk that is not JSON: {data[:200]!r}") from exc
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                first = at if first is None else first
            if choice.get("finish_reason") is not None and final is None:
                final = at
                first = at if first is None else first
    if usage is None or final is None or first is None:
        raise CompletionError("the stream ended without a finish and a usage chunk")
    try:
        prompt_tokens = int(usage["prompt_tokens"])
        completion_tokens = int(usage["completion_tokens"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CompletionError(f"a usage chunk without token counts: {usage!r}") from exc
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return Stream(prompt_tokens, completion_tokens, cached if isinstance(cached, int) else None,
                  chunks, first - started, final - started)


async def stream_once(url: str, prompt: str, *, max_tokens: int, timeout: float,
                      transport: StreamTransport) -> Stream:
    """One greedy streamed completion, timed."""
    body = json.dumps({
        "model": "default_model",  # any other name makes mlx-lm reload the model
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    try:
        status, started, lines = await asyncio.to_thread(transport, endpoint, body, timeout)
    except OSError as exc:
        raise CompletionError(f"no answer from {endpoint}: {type(exc).__name__}: {exc}") from exc
    if status != 200:
        text = b"".join(line for _, line in lines).decode("utf-8", "replace").strip()
        raise CompletionError(f"/v1/chat/completions answered {status}: {text[:300]}")
    return parse_stream(started, lines)


async def bench_api(url: str, *, cluster: str = "", words: Sequence[int] = (8, 64, 256),
                    repeat: int = 3, max_tokens: int = 32, warmup: int = 1,
                    timeout: float = 120.0, estimate_tps: float | None = None,
                    transport: StreamTransport = urllib_stream) -> BenchResult:
    """Measure the API at `url`: `warmup` unmeasured requests, then `repeat` pairs per length,
    one request at a time (a single stream is what the estimate describes)."""
    if repeat < 1 or max_tokens < 2 or not words or min(words) < 1:
        raise ValueError("repeat and prompt lengths must be at least 1, max_tokens at least 2")
    nonces = iter(range(1, 1 << 20))

    async def stream(count: int, tokens: int) -> Stream:
        return await stream_once(url, make_prompt(count, next(nonces)), max_tokens=tokens,
                                 timeout=timeout, transport=transport)

    for _ in range(warmup):
        await stream(words[0], max_tokens)
    lengths = []
    for count in words:
        samples = []
        for _ in range(repeat):
            first = await stream(count, 1)
            samples.append(Sample(first, await stream(count, max_tokens)))
        lengths.append(LengthResult(count, tuple(samples)))
    return BenchResult(cluster, url, max_tokens, repeat, estimate_tps, tuple(lengths))


async def bench_cluster(cluster: Cluster, **options: Any) -> BenchResult:
    """Place the model (headers only, offline when the model is local) to find rank 0's API
    and the decode estimate, then `bench_api`."""
    placement: Placement = await asyncio.to_thread(place, cluster)
    estimate = placement.decode.tokens_per_second if placement.decode is not None else None
    return await bench_api(api_url(cluster, placement), cluster=cluster.name,
                           estimate_tps=estimate, **options)


# ---------------------------------------------------------------------------------- views


def _spread_json(spread: Spread | None) -> dict[str, float | int] | None:
    if spread is None:
        return None
    return {"median": spread.median, "min": spread.low, "max": spread.high, "n": spread.n}


def bench_json(result: BenchResult) -> dict[str, Any]:
    return {
        "cluster": result.cluster,
        "api_url": result.api_url,
        "max_tokens": result.max_tokens,
        "repeat": result.repeat,
        "estimate": {"decode_tokens_per_s": result.estimate_tps,
                     "meaning": "upper bound on single-stream decode (placement)"},
        "lengths": [{
            "prompt_words": length.words,
            "prompt_tokens": length.prompt_tokens,
            "ttft_s": _spread_json(length.ttft),
            "decode_tokens_per_s": _spread_json(length.decode),
            "decode_vs_estimate": result.ratio(length),
            "samples": [s.to_json() for s in length.samples],
        } for length in result.lengths],
    }


def _ms(s: float) -> str:
    return f"{s * 1000:.0f}"


def bench_text(result: BenchResult) -> str:
    """One row per prompt length: TTFT and decode speed (median, min–max), and the ratio."""
    estimate = ("unknown (a chip's bandwidth is unknown)" if result.estimate_tps is None
                else f"{result.estimate_tps:,.1f} tok/s")
    header = ("PROMPT", "TOKENS", "TTFT ms (min-max)", "DECODE tok/s (min-max)",
              "MEASURED/ESTIMATE")
    rows = [header]
    for length in result.lengths:
        ttft = length.ttft
        decode = length.decode
        ratio = result.ratio(length)
        rows.append((
            f"{length.words} words", str(length.prompt_tokens),
            f"{_ms(ttft.median)} ({_ms(ttft.low)}-{_ms(ttft.high)})",
            "-" if decode is None else
            f"{decode.median:.1f} ({decode.low:.1f}-{decode.high:.1f})",
            "-" if ratio is None else f"{ratio:.3f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"bench {result.cluster}: {result.api_url}, {result.repeat} runs per prompt "
             f"(1 token for TTFT, then {result.max_tokens} for decode), greedy, one stream at "
             "a time", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    lines += ["", f"estimate: {estimate} (the placement's upper bound on decode; "
                  "MEASURED/ESTIMATE = median decode / estimate)"]
    return "\n".join(lines) + "\n"
