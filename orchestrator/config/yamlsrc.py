"""Read YAML keeping where every key and value came from, and refusing duplicate keys.

pyyaml's `safe_load` silently keeps the last of two equal keys and forgets positions, so a
user's typo can vanish and an error cannot point at the line they wrote. We compose the node
graph ourselves and build plain Python data beside a map from each data path to its marks.

Input is bounded, because the files may come from anyone and `orch validate` runs in CI: at
most `MAX_FILE_BYTES` are ever read, and the composer refuses, before any data is built,
aliases that expand to more than `MAX_ALIAS_NODES` nodes (a "billion laughs" file of 1 KB
names 10^9 strings), an alias to a node that contains it (a cycle), and nesting deeper than
`MAX_DEPTH` (pyyaml composes recursively; Python's stack would overflow).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import yaml

from orchestrator.errors import ConfigError, Diagnostic

DataPath = tuple[str | int, ...]

#: A cluster file, inventory or playbook is a few KB; a 1,000-host inventory is ~150 KB.
MAX_FILE_BYTES: Final = 8 * 1024 * 1024
#: Nodes that aliases may add in one document, in all. Sharing a 20-key mapping among 100 hosts
#: adds ~4,100; a billion-laughs file crosses this at its fourth level and is refused there.
MAX_ALIAS_NODES: Final = 10_000
#: Nesting levels, counting what aliases expand to. Real files nest fewer than 10.
MAX_DEPTH: Final = 64


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass(frozen=True)
class SourceMap:
    """Where each path of a loaded document sits in its file."""

    file: Path
    keys: dict[DataPath, Mark] = field(default_factory=dict)
    values: dict[DataPath, Mark] = field(default_factory=dict)

    def key(self, path: DataPath) -> Mark:
        """The mark of the key at `path`, else of its value, else of the nearest ancestor."""
        return self._nearest(path, prefer_key=True)

    def value(self, path: DataPath) -> Mark:
        """The mark of the value at `path`, else of its key, else of the nearest ancestor."""
        return self._nearest(path, prefer_key=False)

    def _nearest(self, path: DataPath, *, prefer_key: bool) -> Mark:
        first, second = (self.keys, self.values) if prefer_key else (self.values, self.keys)
        for end in range(len(path), -1, -1):
            sub = path[:end]
            if sub in first:
                return first[sub]
            if sub in second:
                return second[sub]
        return Mark(1, 1)

    def diag(self, path: DataPath, message: str, *, at_key: bool = True,
             severity: str = "error") -> Diagnostic:
        mark = self.key(path) if at_key else self.value(path)
        return Diagnostic(self.file, mark.line, mark.column, message, severity)


@dataclass(frozen=True)
class Document:
    data: Any
    source: SourceMap


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.problems: list[Diagnostic] = []
        self._constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: DataPath) -> Any:
        self.source.values[path] = _mark(node)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return self._constructor.construct_object(node, deep=True)

    def _mapping(self, node: yaml.MappingNode, path: DataPath) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        seen: dict[Any, Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problems.append(self.source.diag(
                    path, "YAML merge keys (<<) are not supported; write the keys out"))
                continue
            key = self.build(key_node, (*path, "<key>"))
            if not isinstance(key, str):
                key = str(key)
            key_mark = _mark(key_node)
            if key in seen:
                first = seen[key]
                self.problems.append(Diagnostic(
                    self.source.file, key_mark.line, key_mark.column,
                    f"duplicate key {key!r} (first defined at line {first.line}); "
                    "each key may appear once in a mapping"))
                continue
            seen[key] = key_mark
            self.source.keys[(*path, key)] = key_mark
            result[key] = self.build(value_node, (*path, key))
        self.source.values.pop((*path, "<key>"), None)
        return result


def load_document(file: Path) -> Document:
    """Parse one YAML file; raise ConfigError with every duplicate key or the syntax error."""
    source = SourceMap(file)
    text = read_text_bounded(file, "a cluster, inventory or playbook file")
    try:
        nodes = list(_compose_all(text))
    except _Refused as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([Diagnostic(file, line, col, str(exc.problem))]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ConfigError([Diagnostic(
            file, line, col, f"control character U+{exc.character:04X} is not allowed in YAML; "
            "expected printable text")]) from None
    except yaml.MarkedYAMLError as exc:
        where = exc.problem_mark or exc.context_mark
        line, col = (where.line + 1, where.column + 1) if where else (1, 1)
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([Diagnostic(file, line, col, f"YAML syntax error: {what}")]) from None
    if len(nodes) > 1:
        second = _mark(nodes[1])
        raise ConfigError([Diagnostic(file, second.line, second.column,
                                      "expected one YAML document, found several")])
    if not nodes:
        return Document({}, source)
    builder = _Builder(source)
    data = builder.build(nodes[0], ())
    if builder.problems:
        raise ConfigError(builder.problems)
    return Document(data, source)


def read_text_bounded(file: Path, what: str) -> str:
    """The file's UTF-8 text, reading at most `MAX_FILE_BYTES` + 1 bytes whatever its size.

    The bound is on the read, not on `stat`, so a FIFO or /dev/zero is refused too.
    """
    try:
        with file.open("rb") as stream:
            data = _read_at_most(stream, MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([Diagnostic(file, 1, 1, "file not found")]) from None
    except OSError as exc:
        raise ConfigError([Diagnostic(file, 1, 1, f"cannot read file: {exc.strerror or exc}; "
                                      f"expected {what}")]) from None
    if len(data) > MAX_FILE_BYTES:
        size = file.stat().st_size if file.is_file() else None
        line = data.count(b"\n", 0, MAX_FILE_BYTES) + 1
        col = MAX_FILE_BYTES - data.rfind(b"\n", 0, MAX_FILE_BYTES)
        raise ConfigError([Diagnostic(
            file, line, col, f"the file goes past {MAX_FILE_BYTES // 2**20} MiB here"
            f"{f' ({size:,} bytes in all)' if size else ''}; expected {what} of at most "
            f"{MAX_FILE_BYTES:,} bytes")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError([Diagnostic(
            file, line, col, f"byte 0x{data[exc.start]:02x} is not UTF-8 text; expected {what} "
            "in UTF-8 (is it a binary file?)")]) from None


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """Up to `limit` bytes, in chunks: `read(limit)` would allocate all of `limit` up front."""
    data = bytearray()
    while len(data) < limit and (chunk := stream.read(min(limit - len(data), 1 << 16))):
        data += chunk
    return data


class _Refused(yaml.MarkedYAMLError):
    """The composer refused input that would take unbounded time or memory to build."""


class _BoundedLoader(yaml.SafeLoader):
    """pyyaml's safe composer, refusing alias bombs, alias cycles and deep nesting as it goes.

    pyyaml gives an alias the very node its anchor names, so a document is a graph whose
    expansion can be exponential in its size. Each node's expanded size and height are known
    once it is composed, so every alias is charged for what it expands to at the point it is
    used, and the first alias that crosses a bound is refused, pointing at itself.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._shapes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
        self._open: list[list[int]] = [[0, 0]]  # per node being composed: [size, height] so far
        self._alias_nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        depth = len(self._open)  # 1 at the document's root
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is reported by pyyaml itself
                self._charge(event, target, depth)
            return super().compose_node(parent, index)
        if depth > MAX_DEPTH:
            raise _Refused(problem=f"nesting deeper than {MAX_DEPTH} levels; expected a file "
                           f"nested at most {MAX_DEPTH} deep", problem_mark=_start(event))
        self._open.append([0, 0])
        node = super().compose_node(parent, index)
        size, height = self._open.pop()
        self._add(node, size + 1, height + 1)
        return node

    def _charge(self, event: yaml.AliasEvent, target: yaml.Node, depth: int) -> None:
        shape = self._shapes.get(id(target))
        anchor = f"*{event.anchor}"
        if shape is None:
            raise _Refused(problem=f"alias {anchor} is inside the node it names, a cycle; "
                           "expected an alias to a node defined before it",
                           problem_mark=_start(event))
        size, height = shape
        self._alias_nodes += size
        if self._alias_nodes > MAX_ALIAS_NODES:
            raise _Refused(problem=f"aliases expand to more than {MAX_ALIAS_NODES:,} nodes "
                           f"({anchor} alone to {size:,}); expected aliases that add at most "
                           f"{MAX_ALIAS_NODES:,} nodes to the document",
                           problem_mark=_start(event))
        if depth - 1 + height > MAX_DEPTH:
            raise _Refused(problem=f"alias {anchor} nests deeper than {MAX_DEPTH} levels; "
                           f"expected a file nested at most {MAX_DEPTH} deep",
                           problem_mark=_start(event))
        self._add(target, size, height)

    def _add(self, node: yaml.Node | None, size: int, height: int) -> None:
        """Record `node`'s shape and count it in the node that contains it."""
        if node is not None:
            self._shapes.setdefault(id(node), (size, height))
        parent = self._open[-1]
        parent[0] += size
        parent[1] = max(parent[1], height)


def _start(event: yaml.Event) -> yaml.error.Mark:
    return cast("yaml.error.Mark", event.start_mark)  # the stubs also allow libyaml's Mark


def _compose_all(text: str) -> Iterator[yaml.Node]:
    loader = _BoundedLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                yield node
    finally:
        loader.dispose()
