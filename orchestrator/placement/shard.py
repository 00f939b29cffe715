"""What ``model.shard(group)`` leaves on each rank, computed from the safetensors headers.

mlx-lm's tensor parallelism (``sharded_load`` → ``model.shard(group)``) splits some tensors of
every layer across the N ranks and leaves the rest whole on each rank. The rule is the model's
``shard`` method together with mlx's ``mlx.nn.layers.distributed`` helpers; for the
architectures below (mlx-lm 0.32.2, mlx 0.32) it is, per module name inside a layer:

* **all-to-sharded** (``q_proj k_proj v_proj q_b_proj gate_proj up_proj``, in the attention, a
  dense MLP, the shared experts and the stacked routed experts ``switch_mlp``): the weight
  and its quantization ``scales``/``biases`` are split on axis ``max(ndim − 2, 0)`` — the
  output rows (axis 1 for the stacked experts, whose axis 0 is the expert); a Linear's
  ``bias`` on its last axis;
* **sharded-to-all** (``o_proj down_proj``): weight, scales and biases split on the last axis
  (the packed input columns and their groups); a Linear's ``bias`` stays whole;
* **heads** (DeepSeek's MLA ``embed_q`` / ``unembed_out``): ``w[r·h:(r+1)·h]`` on axis 0 with
  h = num_heads // N. MLX conversions older than mlx-lm's MLA rewrite store ``kv_b_proj``
  instead, which ``sanitize`` turns into those two with the same bytes (re-quantized per head:
  the same elements, groups and scales), so ``kv_b_proj`` is split by heads on its rows;
* everything else is **replicated**: embeddings, norms, ``lm_head``, DeepSeek's ``q_a_proj``,
  ``kv_a_proj_with_mqa``, the router ``gate`` and its correction bias.

``mx.split(w, N, axis)`` needs the axis divisible by N and raises otherwise; a head count not
divisible by N would silently drop heads. Both are refused here (``problem``, naming the
tensor), so an impossible N never reaches a Mac; the bytes given then are the largest part of
an as-even-as-possible split (⌈dim / N⌉), for the memory verdict only. A possible split is
even, so every rank holds the same bytes, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator.model.meta import LoadedTensor, ModelMeta

Kind = Literal["all-to-sharded", "sharded-to-all", "heads", "replicated"]

# model_type values whose `shard()` orch has read and encodes here.
SHARD_MODEL_TYPES = frozenset({"deepseek_v3", "llama", "qwen2", "qwen3"})
ALL_TO_SHARDED = frozenset({"q_proj", "k_proj", "v_proj", "q_b_proj", "gate_proj", "up_proj"})
SHARDED_TO_ALL = frozenset({"o_proj", "down_proj"})
HEADS = frozenset({"embed_q", "unembed_out", "kv_b_proj"})
_MLA_ONLY = frozenset({"embed_q", "unembed_out", "kv_b_proj", "q_b_proj"})


@dataclass(frozen=True)
class TensorSplit:
    """Per-rank weight bytes of the tensor split on N ranks, or why N ranks cannot split it."""

    ranks: int
    rank_bytes: tuple[int, ...]  # what each rank holds after shard(), rank 0 first
    rank_active: tuple[int, ...]  # what each rank reads per decoded token
    replicated_bytes: int  # of rank_bytes: the tensors every rank holds whole
    problem: str | None = None  # set when shard() would fail or be wrong on N ranks

    @property
    def possible(self) -> bool:
        return self.problem is None


def kind_of(model_type: str | None, tensor: LoadedTensor) -> Kind:
    """How ``shard()`` treats one tensor (see the module doc)."""
    if tensor.layer is None:
        return "replicated"
    parts = tensor.name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if module in _MLA_ONLY and model_type != "deepseek_v3":
        return "replicated"
    if module in HEADS:
        return "heads"
    if module in ALL_TO_SHARDED:
        return "all-to-sharded"
    if module in SHARDED_TO_ALL and parts[-1] != "bias":
        return "sharded-to-all"
    return "replicated"


def split_axis(kind: Kind, tensor: LoadedTensor) -> int | None:
    """The axis ``mx.split`` cuts, as mlx's ``_all_to_sharded`` / ``_sharded_to_all`` pick it."""
    ndim = len(tensor.shape)
    if kind == "all-to-sharded":
        return ndim - 1 if tensor.name.endswith(".bias") else max(ndim - 2, 0)
    if kind == "sharded-to-all":
        return ndim - 1
    if kind == "heads":
        return 0
    return None


def tensor_split(meta: ModelMeta, ranks: int) -> TensorSplit:
    """Each rank's bytes after ``model.shard(group)`` on ``ranks`` ranks, exactly."""
    if ranks < 1:
        raise ValueError("at least one rank")
    if meta.model_type not in SHARD_MODEL_TYPES or not meta.tensors:
        why = ("the model is sized from a parameter count, not headers" if not meta.tensors
               else f"orch does not know how mlx-lm's shard() splits {meta.model_type or 'this'}"
                    f" models (it knows {', '.join(sorted(SHARD_MODEL_TYPES))})")
        return TensorSplit(ranks, (), (), 0, problem=why)
    problem = _heads_problem(meta, ranks)
    held = active = replicated = 0
    for tensor in meta.tensors:
        kind = kind_of(meta.model_type, tensor)
        axis = split_axis(kind, tensor)
        if axis is None or ranks == 1 or tensor.nbytes == 0:
            held += tensor.nbytes
            active += tensor.active
            replicated += tensor.nbytes if axis is None else 0
            continue
        dim = tensor.shape[axis]
        if kind == "heads":
            heads = meta.num_heads or 0
            if heads == 0 or dim % heads:
                problem = problem or (f"{tensor.name}: axis 0 ({dim}) is not a whole number of "
                                      f"{heads} heads")
                heads = dim
            keep = dim // heads * -(-heads // ranks)
        else:
            if dim % ranks:
                problem = problem or (f"{tensor.name} {list(tensor.shape)}: axis {axis} ({dim}) "
                                      f"does not split into {ranks} equal parts")
            keep = -(-dim // ranks)
        share = tensor.nbytes // dim * keep
        held += share
        active += tensor.active * keep // dim
    return TensorSplit(ranks, (held,) * ranks, (active,) * ranks, replicated, problem)


def _heads_problem(meta: ModelMeta, ranks: int) -> str | None:
    for label, heads in (("num_attention_heads", meta.num_heads),
                         ("num_key_value_heads", meta.num_kv_heads)):
        if heads is not None and heads % ranks:
            return f"{label} {heads} is not divisible by {ranks}"
    return None


def possible_ranks(meta: ModelMeta, candidates: Sequence[int]) -> list[int]:
    """The rank counts among ``candidates`` that ``shard()`` can split this model into."""
    return [n for n in candidates if tensor_split(meta, n).possible]
