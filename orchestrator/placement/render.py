"""Two views of one `Placement`: a table for people and a JSON object for programs.

Sizes are decimal GB (10^9 bytes, as the Hub reports them) and the table header says so. The
JSON keeps exact integer bytes. Layer ranges in JSON are ``[start, end]`` with ``end``
exclusive (mlx-lm's ``start_idx`` / ``end_idx``); the table shows them inclusive ("0–19").
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.placement.choose import Placement, gb, refusal_message
from orchestrator.placement.estimate import DECODE_FORMULA, TENSOR_DECODE_FORMULA
from orchestrator.placement.policy import DEFAULT_RESERVE_FRACTION, GB

if TYPE_CHECKING:
    from rich.console import Console

_SHARD = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")


def render_table(placement: Placement, width: int = 132) -> str:
    """The human view: model line; the chosen split's table and verdict; the other split's;
    then which was chosen and why.

    rich is imported here, not with the package: every run that plans imports placement, and
    only `orch place` draws this table."""
    from rich.console import Console

    meta = placement.meta
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False)
    console.print(_model_line(placement))
    splits = [(placement, "chosen")]
    if placement.alternative is not None:
        splits.append((placement.alternative, "not chosen"))
    for split, label in splits:
        if placement.alternative is not None:
            console.print(f"{split.parallelism.capitalize()} split ({label}):")
        _table(console, split)
        for line in _verdict(split) if split.parallelism == "pipeline" else _tensor_verdict(split):
            console.print(line)
    console.print("GB = 10^9 bytes. need = weights + overhead "
                  f"{float(placement.policy.overhead):.0%} + KV cache "
                  f"{gb(placement.policy.kv_cache_bytes)}; usable = RAM − reserve"
                  + ("" if placement.policy.reserve_bytes is not None else
                     f" (RAM/{int(1 / DEFAULT_RESERVE_FRACTION)}, 4–16 GB)")
                  + (". Sizes are ESTIMATES (parameter count only)." if meta.estimated
                     else "."))
    if placement.reason is not None:
        console.print(f"Chosen: {placement.parallelism} — {placement.reason}.")
    return out.getvalue()


def _table(console: Console, placement: Placement) -> None:
    from rich.table import Table

    if not placement.nodes:
        return
    table = Table(title=None, show_edge=False, pad_edge=False)
    for column, justify in [("rank", "right"), ("node", "left"), ("chip", "left"),
                            ("RAM GB", "right"), ("usable GB", "right"),
                            ("layers", "left"), ("weights GB", "right"),
                            ("need GB", "right"), ("headroom GB", "right"),
                            ("files", "left")]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    tensor = placement.parallelism == "tensor"
    for node in placement.nodes:
        start, end = node.layers
        table.add_row(
            str(node.rank), node.name, node.chip or "?", _num(node.memory_bytes),
            _num(node.usable_bytes),
            f"all {node.num_layers}, 1/{len(placement.nodes)}" if tensor
            else f"{start}–{end - 1} ({node.num_layers})",
            _num(node.weight_bytes), _num(node.bytes), _num(node.headroom_bytes),
            _files(node.files))
    console.print(table)


def _tensor_verdict(placement: Placement) -> list[str]:
    n = len(placement.nodes)
    if not placement.fits:
        return ["Tensor split does not fit"
                + (f" on {', '.join(x.name for x in placement.nodes)}" if n else "") + ":",
                *(f"  {p}" for p in placement.problems)]
    lines = [f"Tensor split fits on {n} node{'s' if n != 1 else ''}: each rank holds "
             f"{gb(placement.nodes[0].weight_bytes)} of weights (its 1/{n} of the split tensors "
             "and all replicated ones, exact from the headers) and needs every weight file "
             f"({gb(placement.nodes[0].download_bytes)})."]
    if placement.decode is not None:
        link = placement.policy.link
        lines.append(f"Decode ≤ {placement.decode.tokens_per_second:.1f} tokens/s "
                     "(estimate: each rank's slice ÷ its chip's memory bandwidth, plus 2 "
                     f"all-reduces per layer over the {link.name} link, "
                     f"{link.latency_s * 1000:g} ms and {link.bandwidth_bytes_s / GB:g} GB/s; "
                     "an upper bound).")
    if placement.not_chosen:
        lines.append(f"Not used by the tensor split: {', '.join(placement.not_chosen)}.")
    return lines


def to_json(placement: Placement) -> dict[str, Any]:
    """The machine view: exact bytes, one object (see the issue's `orch place --json`).

    The top-level keys describe the chosen split; ``splits`` holds both, each in the same
    shape (without ``splits``), and ``reason`` says why the chosen one was.
    """
    doc = _split_json(placement)
    doc["reason"] = placement.reason
    doc["splits"] = {p.parallelism: _split_json(p)
                     for p in (placement, placement.alternative) if p is not None}
    return doc


def _split_json(placement: Placement) -> dict[str, Any]:
    meta = placement.meta
    decode = placement.decode
    link = placement.policy.link
    return {
        "fits": placement.fits,
        "parallelism": placement.parallelism,
        "required_bytes": placement.required_bytes,
        "available_bytes": placement.available_bytes,
        "even_split_fits": placement.even_split_fits,
        "split": list(placement.split),
        "nodes": [
            {
                "name": n.name, "rank": n.rank, "layers": [n.layers[0], n.layers[1]],
                "bytes": n.bytes, "usable_bytes": n.usable_bytes, "files": list(n.files),
                "chip": n.chip, "memory_bytes": n.memory_bytes,
                "weight_bytes": n.weight_bytes, "overhead_bytes": n.overhead_bytes,
                "kv_cache_bytes": n.kv_cache_bytes, "headroom_bytes": n.headroom_bytes,
                "download_bytes": n.download_bytes, "wired_limit_mb": n.wired_limit_mb,
                "bandwidth_gbps": n.bandwidth_gbps,
            }
            for n in placement.nodes
        ],
        "model": {
            "source": meta.source, "model_type": meta.model_type,
            "num_layers": meta.num_layers, "total_bytes": meta.total_bytes,
            "weight_bytes": meta.weight_bytes, "shared_bytes": meta.shared.total,
            "layer_bytes": [layer.total for layer in meta.layers],
            "num_files": len(meta.files), "num_parameters": meta.num_parameters,
            "bits": meta.bits, "estimated": meta.estimated,
        },
        "policy": {
            "reserve_bytes": [n.memory_bytes - n.usable_bytes for n in placement.nodes],
            "kv_cache_bytes": placement.policy.kv_cache_bytes,
            "overhead": float(placement.policy.overhead),
            "hop_latency_s": placement.policy.hop_latency_s,
            "link": {"name": link.name, "latency_s": link.latency_s,
                     "bandwidth_bytes_s": link.bandwidth_bytes_s},
        },
        "even_split": None if placement.parallelism == "tensor" else {
            "split": _even_counts(placement),
            "bytes": list(placement.even_split_bytes),
        },
        "decode_estimate": None if decode is None else {
            "tokens_per_second": decode.tokens_per_second,
            "seconds_per_token": decode.seconds_per_token,
            "formula": (DECODE_FORMULA if placement.parallelism == "pipeline"
                        else TENSOR_DECODE_FORMULA),
            "estimate": True,
        },
        "not_chosen": list(placement.not_chosen),
        "drained": list(placement.drained),
        "problems": list(placement.problems),
        "suggestions": list(placement.suggestions),
    }


def _even_counts(placement: Placement) -> list[int]:
    n = len(placement.nodes)
    if not n:
        return []
    base, extra = divmod(placement.meta.num_layers, n)
    return [base + (1 if r < extra else 0) for r in range(n)]


def _model_line(placement: Placement) -> str:
    meta = placement.meta
    if meta.estimated:
        return (f"{meta.source}: {meta.num_layers} layers assumed equal, params × bits/8 = "
                f"{gb(meta.weight_bytes)}; the (1+O) of the guide's formula is the overhead "
                "below")
    parts = [meta.model_type or "model", f"{meta.num_layers} layers"]
    if meta.files:
        parts.append(f"{gb(meta.total_bytes)} in {len(meta.files)} files")
    else:
        parts.append(f"≈ {gb(meta.weight_bytes)}")
    if meta.bits:
        parts.append(f"{meta.bits}-bit")
    parts.append(f"{meta.num_parameters / 1e9:.0f}B params")
    sizes = sorted({round(layer.total / GB, 2) for layer in meta.layers})
    if len(sizes) > 1:
        parts.append(f"layers {sizes[0]}–{sizes[-1]} GB")
    parts.append(f"{gb(meta.shared.total)} on every rank")
    return f"{meta.source}: " + ", ".join(parts)


def _verdict(placement: Placement) -> list[str]:
    lines = []
    if placement.fits:
        n = len(placement.nodes)
        lines.append(f"Fits on {n} node{'s' if n != 1 else ''}: needs "
                     f"{gb(placement.required_bytes)} of {gb(placement.available_bytes)} usable "
                     f"({gb(placement.available_bytes - placement.required_bytes)} headroom); "
                     f"split {list(placement.split)} (layers per rank, rank 0 first).")
        if placement.decode is not None:
            hop_ms = placement.policy.hop_latency_s * 1000
            lines.append(f"Decode ≤ {placement.decode.tokens_per_second:.1f} tokens/s "
                         "(estimate: active bytes per token ÷ each chip's memory bandwidth, "
                         f"plus {hop_ms:g} ms per ring hop; an upper bound).")
    else:
        lines.append(refusal_message(placement))
    if placement.nodes:
        lines.append(_even_line(placement))
    if placement.not_chosen:
        lines.append(f"Not needed: {', '.join(placement.not_chosen)}.")
    if placement.drained:
        lines.append(f"Drained, left out: {', '.join(placement.drained)}.")
    return lines


def _even_line(placement: Placement) -> str:
    counts = _even_counts(placement)
    if placement.even_split_fits:
        return f"mlx-lm's even split {counts} would also fit."
    over = [f"{n.name} {gb(cost)} of {gb(n.usable_bytes)}"
            for n, cost in zip(placement.nodes, placement.even_split_bytes, strict=True)
            if cost > n.usable_bytes]
    return (f"mlx-lm's even split {counts} would not fit ({'; '.join(over)}): "
            "the memory-weighted split above is needed.")


def _num(n: int) -> str:
    return f"{n / GB:.1f}"


def _files(files: Sequence[str]) -> str:
    """["model-00001-of-00088.safetensors", …] -> "1–30, 88 of 88" (or a count)."""
    numbers = []
    total = None
    for name in files:
        match = _SHARD.match(name)
        if not match:
            return f"{len(files)} file{'s' if len(files) != 1 else ''}"
        numbers.append(int(match.group(1)))
        total = int(match.group(2))
    if not numbers:
        return "—"
    numbers.sort()
    spans = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}–{prev}")
        if n is not None:
            start = prev = n
    return f"{', '.join(spans)} of {total} ({len(numbers)})"
