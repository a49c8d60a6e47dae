"""Strict JSON at the boundary: what both engines, PostgreSQL and every client can carry.

Python's `json` accepts more than JSON: `NaN` and `Infinity`, lone UTF-16 surrogates (`"\\udc00"`)
that no UTF-8 encoder will write back out, and nesting deep enough to exhaust the interpreter's
recursion limit. Each of these was stored once and then broke every reader (a 500 on every
listing), so they are refused where data enters, with one error type: `StrictJSONError`
(a ValueError) naming what was wrong.
"""

from __future__ import annotations

import json
import math
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

#: Deepest nesting of arrays and objects accepted. Real payloads are a few levels deep; the
#: interpreter's recursion limit (~1000) is what a hostile document aims at.
MAX_DEPTH = 64


class StrictJSONError(ValueError):
    """The value is not strict JSON (or too deeply nested)."""


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def _check_text(text: str, where: str) -> None:
    if text.isascii():  # most text: no surrogate possible, and no copy made to find out
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StrictJSONError(f"{where} contains a lone surrogate (not valid Unicode)") from None


def check(value: Any, *, max_depth: int = MAX_DEPTH, other_types: bool = False) -> None:
    """Raise StrictJSONError unless `value` is JSON data (dict with str keys, list, str, finite
    number, bool, None) at most `max_depth` containers deep. Iterative: a hostile depth cannot
    exhaust the stack here.

    `other_types` lets values of other types (a datetime a model will parse) through unchecked:
    for input that a schema is about to validate.
    """
    if max_depth > 0 and type(value) is dict and _is_flat_and_plain(value):
        return
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is int or kind is bool or item is None:  # the common leaves, by exact type first
            continue
        if isinstance(item, str):
            _check_text(item, "a string")
        elif isinstance(item, bool) or item is None or isinstance(item, int):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise StrictJSONError(f"{item!r} is not JSON (only finite numbers are)")
        elif isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise StrictJSONError(f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        if other_types:
                            stack.append((child, depth + 1))
                            continue
                        raise StrictJSONError(f"object key {key!r} is not a string")
                    _check_text(key, "an object key")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif not other_types:
            raise StrictJSONError(f"a {type(item).__name__} is not JSON data")


def _is_flat_and_plain(value: dict[Any, Any]) -> bool:
    """Whether `check` would pass `value` at a glance: an object of ASCII keys whose values are
    ASCII strings, ints, bools, None or finite floats (most payloads), checked without the walk's
    stack. False sends anything else through the walk, which names what is wrong."""
    for key, child in value.items():
        if type(key) is not str or not key.isascii():
            return False
        kind = type(child)
        if kind is str:
            if not child.isascii():
                return False
        elif kind is float:
            if not math.isfinite(child):
                return False
        elif not (kind is int or kind is bool or child is None):
            return False
    return True


def loads(raw: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON; raise StrictJSONError (with the parser's reason) on anything else."""
    if isinstance(raw, bytes | bytearray):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError(f"not UTF-8: {exc}") from None
    else:
        text = raw
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except StrictJSONError:
        raise
    except RecursionError:  # the C parser guards its own recursion: no crash, just this
        raise StrictJSONError(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, an integer of too many digits
        raise StrictJSONError(f"not JSON: {exc}") from None
    check(value, max_depth=max_depth)  # escapes such as "\udc00" only appear once decoded
    return value


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
#: What `json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)` runs:
#: json's C encoder with those settings (no circular check: a circular value still fails, with
#: RecursionError). Made once: json.dumps makes an encoder object and this C encoder on every
#: call, three quarters of its time for a typical payload (a bulk dispatch encodes one per job).
_encode_chunks = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, False
    )  # markers, default, string encoder, indent, separators, sort_keys, skipkeys, allow_nan
)


def _encode(value: Any) -> str:
    if _encode_chunks is None:  # no C accelerator in this interpreter
        return _ENCODER.encode(value)
    return "".join(_encode_chunks(value, 0))


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of a value that passed `check`; the form whose size is limited."""
    try:
        return _encode(value).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise StrictJSONError(f"not JSON-serialisable: {exc}") from None


def dumps_checked(value: Any, *, max_depth: int = MAX_DEPTH) -> bytes:
    """`dumps` of a value as strict as `check` wants it, for JSON-shaped data (what a pydantic
    model dumps in JSON mode: string keys, JSON types). `dumps` itself refuses non-finite numbers,
    lone surrogates and other types; the walk for the depth limit runs only when the text holds
    enough brackets to nest that deep, so a typical payload is checked at the speed of `json`."""
    raw = dumps(value)
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        check(value, max_depth=max_depth)
    return raw
