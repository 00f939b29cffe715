"""Read YAML keeping where every key and value came from, and refusing duplicate keys.

pyyaml's `safe_load` silently keeps the last of two equal keys and forgets positions, so a
user's typo can vanish and an error cannot point at the line they wrote. We compose the node
graph ourselves and build plain Python data beside a map from each data path to its marks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError, Diagnostic

DataPath = tuple[str | int, ...]


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
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Diagnostic(file, 1, 1, "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Diagnostic(file, 1, 1, f"cannot read file: {exc}")]) from None
    try:
        nodes = list(_compose_all(text))
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


def _compose_all(text: str) -> Iterator[yaml.Node]:
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                yield node
    finally:
        loader.dispose()
