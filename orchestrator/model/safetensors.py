"""Safetensors headers: every tensor's name, dtype, shape and exact byte size, without the weights.

A safetensors file starts with a little-endian u64 N, then N bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header), plus an optional ``__metadata__`` entry. Those two reads are all placement needs:
the sizes come from ``data_offsets`` (what the loader will actually allocate), and they are
checked against dtype × shape so a corrupt or truncated header fails here, with the file's name,
rather than as garbage weights on a node.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ModelError

# Same bound as the safetensors library: a header bigger than this is corruption, not a model.
MAX_HEADER_BYTES = 100_000_000
PREFIX_BYTES = 8

# Bits per element, per the safetensors format's dtype names.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file's header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A parsed header: the tensors in file order and the byte length of the data section."""

    tensors: tuple[TensorInfo, ...]
    header_bytes: int  # N, the JSON's length
    data_bytes: int

    @property
    def file_bytes(self) -> int:
        """The size a complete file with this header must have."""
        return PREFIX_BYTES + self.header_bytes + self.data_bytes


def header_length(prefix: bytes, where: str) -> int:
    """Decode the 8-byte prefix; `where` names the file in the error."""
    if len(prefix) != PREFIX_BYTES:
        raise ModelError(f"{where}: too short to be a safetensors file "
                         f"({len(prefix)} bytes, need at least {PREFIX_BYTES})")
    (length,) = struct.unpack("<Q", prefix)
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise ModelError(f"{where}: safetensors header length {length} is implausible "
                         f"(expected 2..{MAX_HEADER_BYTES}); the file is not safetensors or is "
                         "corrupt")
    return int(length)


def parse_header(raw: bytes, where: str) -> Header:
    """Parse the JSON header (without the 8-byte prefix); `where` names the file in errors."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{where}: safetensors header is not a JSON object")
    spans = [_tensor(name, entry, where) for name, entry in doc.items()
             if name != "__metadata__"]
    position = 0
    for begin, end, tensor in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin != position:
            raise ModelError(f"{where}: tensor {tensor.name!r} starts at byte {begin}, expected "
                             f"{position} (tensors must be contiguous); the header is corrupt")
        position = end
    return Header(tensors=tuple(t for _, _, t in spans), header_bytes=len(raw),
                  data_bytes=position)


def read_header(path: Path) -> Header:
    """Read a local file's header: two reads, never the weights."""
    try:
        with path.open("rb") as f:
            length = header_length(f.read(PREFIX_BYTES), str(path))
            raw = f.read(length)
            size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) != length:
        raise ModelError(f"{path}: header is truncated ({len(raw)} of {length} bytes)")
    header = parse_header(raw, str(path))
    if size < header.file_bytes:
        raise ModelError(f"{path}: file is {size} bytes but its header describes "
                         f"{header.file_bytes}; it is incomplete (interrupted download?)")
    return header


def _offsets(entry: Any, name: str, where: str) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]):
        raise ModelError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    return offsets[0], offsets[1]


def _tensor(name: str, entry: Any, where: str) -> tuple[int, int, TensorInfo]:
    begin, end = _offsets(entry, name, where)
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    if dtype not in DTYPE_BITS:
        raise ModelError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelError(f"{where}: tensor {name!r} has invalid shape {shape!r}")
    expected = math.prod(shape) * DTYPE_BITS[dtype]
    if (expected + 7) // 8 != end - begin:
        raise ModelError(f"{where}: tensor {name!r} is {end - begin} bytes but {dtype} "
                         f"{shape} needs {(expected + 7) // 8}; the header is corrupt")
    return begin, end, TensorInfo(name=name, dtype=dtype, shape=tuple(shape), nbytes=end - begin)
