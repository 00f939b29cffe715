"""JSON as the agent writes and reads it, through the interpreter's C accelerator ``_json``.

Why not ``import json``: it imports ``re``, ``enum``, ``functools`` and ``collections`` and
compiles its regular expressions, ~13 ms of CPU at every start on the test machine, a third
of a no-op run's whole agent session (facts, lock, unlock), which starts once per host per
run. The C scanner and encoder that ``json`` itself uses when it can are importable on their
own (~0.3 ms); this module drives them as ``json.loads`` and ``json.dumps(value,
sort_keys=True[, indent=N])`` do, and gives the same text and values. Where ``_json`` is
missing or is not what it expects, it uses ``json``; so do error paths (malformed text, a
value json cannot write), so that every error is json's own.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, for the type checker alone (see common.py)
if TYPE_CHECKING:
    from typing import Any

WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``: its default settings."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_CONSTANTS.__getitem__)
    memo: dict[str, str] = {}  # noqa: RUF012 (the pure-Python scanner's attribute, unused here)


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


class _NotForHere(Exception):
    """A value only json's own encoder writes as json.dumps would (non-str keys, indented)."""


class _Codec:
    """The C scanner, and the C encoder made afresh for each value, as json.dumps makes it
    (its cycle markers must start empty: an exception can leave entries behind)."""

    def __init__(self) -> None:
        import _json

        self.scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # any JSONDecoder-like
        self.make_encoder = _json.make_encoder
        self.quote = _json.encode_basestring_ascii

    def encode(self, value: Any) -> str:
        encoder = self.make_encoder({}, _not_serializable, self.quote, None, ": ", ", ", True,
                                    False, True)
        return "".join(encoder(value, 0))

    def indented(self, value: Any, step: str, newline: str, parts: list[str]) -> None:
        """What json's pure-Python encoder writes with an indent (the C one has none): each
        element on a line of its own, no space before a line end, empty containers inline."""
        if isinstance(value, dict) and value:
            if not all(isinstance(key, str) for key in value):
                raise _NotForHere
            inner = newline + step
            parts.append("{")
            for i, key in enumerate(sorted(value)):
                parts.append(("," if i else "") + inner + self.quote(key) + ": ")
                self.indented(value[key], step, inner, parts)
            parts.append(newline + "}")
        elif isinstance(value, (list, tuple)) and value:
            inner = newline + step
            parts.append("[")
            for i, item in enumerate(value):
                parts.append(("," if i else "") + inner)
                self.indented(item, step, inner, parts)
            parts.append(newline + "]")
        else:
            parts.append(self.encode(value))


def _accelerated() -> _Codec | None:
    try:
        codec = _Codec()
        if codec.encode({"b": [1.5, None], "a": "\u00e9"}) != '{"a": "\\u00e9", "b": [1.5, null]}' \
                or codec.scan('[1, "x"]', 0) != ([1, "x"], 8):
            return None
    except Exception:  # no accelerator here, or another signature: json itself, below
        return None
    return codec


_C = _accelerated()


def loads(text: str) -> Any:
    """``json.loads(text)`` for a str."""
    if _C is None or text.startswith("\ufeff"):
        import json

        return json.loads(text)
    index, end = 0, len(text)
    while index < end and text[index] in WHITESPACE:
        index += 1
    try:
        value, index = _C.scan(text, index)
    except StopIteration as stop:
        _fail("Expecting value", text, stop.value)
    except Exception:  # malformed inside: the C scanner raises json's JSONDecodeError, which
        import json  # some versions find only once json.decoder is imported (else SystemError)

        return json.loads(text)  # raises that error, exactly as json.loads would
    while index < end and text[index] in WHITESPACE:
        index += 1
    if index != end:
        _fail("Extra data", text, index)
    return value


def _fail(message: str, text: str, index: int) -> Any:
    import json  # only to raise exactly what json.loads raises

    raise json.JSONDecodeError(message, text, index)


def dumps(value: Any, indent: int | None = None) -> str:
    """``json.dumps(value, sort_keys=True, indent=indent)``."""
    if _C is not None and indent is None:
        return _C.encode(value)
    if _C is not None and indent is not None:
        parts: list[str] = []
        try:
            _C.indented(value, " " * indent, "\n", parts)
            return "".join(parts)
        except _NotForHere:
            pass
    import json

    return json.dumps(value, sort_keys=True, indent=indent)
