"""`orch place`'s picture: one stacked bar per node, under the table.

Each bar is the node's usable memory (RAM − the macOS reserve), filled left to right with its
weights, the runtime overhead, the KV cache budget, and what is left (headroom), so a buyer
sees at a glance which Mac is the tight one. A node that does not fit overflows: the bar is
drawn over its need instead, with the part beyond usable memory marked ``!``. The segments
differ by character as well as by colour, so the picture survives a pipe, a log, a README.

Drawn from `NodePlacement` fields only (weights, overhead, KV cache, usable), whatever split
the placement chose (pipeline or tensor), so it never needs placement's internals.
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.text import Text

from orchestrator.placement import NodePlacement, Placement
from orchestrator.placement.policy import GB

SEGMENTS = (("weights", "█", "bold blue"), ("overhead", "▓", "magenta"),
            ("KV cache", "▒", "yellow"), ("headroom", "░", "green"))
OVER = ("!", "bold red")


def cells(parts: list[int], total: int, width: int) -> list[int]:
    """Integer cell counts for `parts` of `total` over `width` cells, summing to exactly the
    cells their sum covers (largest remainders), and at least 1 for any non-zero part."""
    if total <= 0:
        return [0 for _ in parts]
    exact = [p * width / total for p in parts]
    counts = [int(x) for x in exact]
    target = round(sum(parts) * width / total)
    order = sorted(range(len(parts)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: max(0, target - sum(counts))]:
        counts[i] += 1
    for i, part in enumerate(parts):
        if part > 0 and counts[i] == 0:
            counts[i] = 1
            biggest = max(range(len(parts)), key=lambda j: counts[j])
            if counts[biggest] > 1:
                counts[biggest] -= 1
    return counts


def bar(weights: int, overhead: int, kv: int, usable: int, width: int) -> Text:
    """One node's bar: usable memory as `width` cells (or its need, if that is larger, with
    the cells beyond usable memory shown as ``!``: what does not fit)."""
    need = weights + overhead + kv
    scale = max(usable, need)
    counts = cells([weights, overhead, kv, max(0, usable - need)], scale, width)
    beyond = max(1, round((need - usable) * width / scale)) if need > usable else 0
    keep = sum(counts) - beyond
    text = Text()
    for (_, char, style), count in zip(SEGMENTS, counts, strict=True):
        shown = max(0, min(count, keep))
        keep -= shown
        text.append(char * shown, style=style)
    text.append(OVER[0] * beyond, style=OVER[1])
    return text


def render_bars(placement: Placement, width: int = 132) -> str:
    """A legend, then one bar per node of the chosen split; and, when the other split (pipeline
    or tensor) places nodes too, its bars under their own heading, so the two can be compared
    as pictures as the table compares them in numbers. Empty when nothing is placed."""
    if not placement.nodes:
        return ""
    splits = [(placement, "chosen")]
    if placement.alternative is not None and placement.alternative.nodes:
        splits.append((placement.alternative, "not chosen"))
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False)
    name_width = max(len(n.name) for split, _ in splits for n in split.nodes)
    bar_width = max(20, min(60, width - name_width - 40))
    legend = Text("memory per node, over usable: ")
    for name, char, style in SEGMENTS:
        legend.append(f"{char} {name}  ", style=style)
    legend.append(f"{OVER[0]} over usable", style=OVER[1])
    console.print(legend)
    for split, label in splits:
        if len(splits) > 1:
            console.print(f"{split.parallelism} split ({label}):")
        for node in split.nodes:
            console.print(_node_line(node, name_width, bar_width))
    return out.getvalue()


def _node_line(node: NodePlacement, name_width: int, bar_width: int) -> Text:
    line = Text(f"{node.name:<{name_width}} ")
    line.append_text(bar(node.weight_bytes, node.overhead_bytes, node.kv_cache_bytes,
                         node.usable_bytes, bar_width))
    need, usable = node.bytes / GB, node.usable_bytes / GB
    line.append(f" {need:.1f} of {usable:.1f} GB ({need / usable:.0%})" if usable > 0
                else f" {need:.1f} GB, none usable")
    return line
