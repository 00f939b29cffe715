"""Turn pydantic validation errors into `FILE:LINE:COL: what is wrong, what was expected`."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator.config.yamlsrc import DataPath, Document, SourceMap
from orchestrator.errors import ConfigError, Diagnostic

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], doc: Document, *, where: DataPath = ()) -> M:
    """Validate `doc.data` (or the sub-tree at `where`) as `model`, or raise every problem."""
    data: Any = doc.data
    for part in where:
        data = data[part]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(to_diagnostics(model, exc, doc.source, where)) from None


def to_diagnostics(model: type[BaseModel], exc: ValidationError, source: SourceMap,
                   where: DataPath = ()) -> list[Diagnostic]:
    found: dict[tuple[DataPath, str], Diagnostic] = {}
    union_alternatives: dict[DataPath, list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if _is_data_segment(part))
        path = (*where, *loc)
        kind = error["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            expected = _fields_at(model, loc[:-1])
            hint = _suggest(key, expected)
            message = f"unknown key {key!r}{hint}; expected one of: {', '.join(sorted(expected))}"
            found[(path, kind)] = source.diag(path, message, at_key=True)
        elif kind == "missing":
            key = str(loc[-1])
            found[(path, kind)] = source.diag(
                path[:-1], f"missing required key {key!r}", at_key=True)
        else:
            message = _describe(error)
            if len(error["loc"]) > len(loc):  # a union member failed: gather the alternatives
                union_alternatives.setdefault(path, []).append(message)
                continue
            found[(path, kind)] = source.diag(path, message, at_key=False)
    for path, messages in union_alternatives.items():
        if any(p == path for p, _ in found):
            continue
        unique = list(dict.fromkeys(messages))
        found[(path, "union")] = source.diag(path, "; or ".join(unique), at_key=False)
    return list(found.values())


def _is_data_segment(part: str | int) -> bool:
    """Pydantic adds union member tags like `list[str]` or `literal['auto']` to locations."""
    if isinstance(part, int):
        return True
    return not ("[" in part or part in {"str", "int", "float", "bool", "function-after"}
                or part.startswith("function-"))


def _describe(error: Any) -> str:
    kind: str = error["type"]
    got = error.get("input")
    shown = _show(got)
    msg: str = error["msg"]
    if kind.startswith("value_error"):
        return msg.removeprefix("Value error, ")
    simple = {
        "int_type": "expected an integer",
        "float_type": "expected a number",
        "string_type": "expected a string",
        "bool_type": "expected true or false",
        "list_type": "expected a list",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
        "model_attributes_type": "expected a mapping",
    }
    if kind in simple:
        return f"{simple[kind]}, got {shown}"
    return f"{msg[0].lower()}{msg[1:]}, got {shown}"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _suggest(key: str, expected: list[str]) -> str:
    close = difflib.get_close_matches(key, expected, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: DataPath) -> list[str]:
    """The keys the model allows at `loc`, walking field annotations through lists and dicts."""
    current: Any = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    model_cls = _find_model(current)
    # The key as written: a field named around a BaseModel method (`copy_`) has an alias.
    return [f.alias or name for name, f in model_cls.model_fields.items()] if model_cls else []


def _step(annotation: Any, part: str | int) -> Any:
    model_cls = _find_model(annotation)
    if model_cls is not None and isinstance(part, str):
        for name, info in model_cls.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
    for arg in _union_args(annotation):
        origin = typing.get_origin(arg)
        if origin is list and isinstance(part, int):
            return typing.get_args(arg)[0]
        if origin is dict and isinstance(part, str):
            return typing.get_args(arg)[1]
    return None


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _find_model(annotation: Any) -> type[BaseModel] | None:
    for arg in _union_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
