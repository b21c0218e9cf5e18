"""Change one member of a JSON body and leave every other byte as the client sent it. Pure.

A gateway that rewrites a name (a virtual server taking its prefix off ``params.name``)
should change nothing else an MCP server reads: not the order of the members, not the
whitespace, not how numbers or strings were written. So the value is found in the raw
bytes and only its bytes are replaced::

    body bytes ─▶ latin-1 text (one character per byte: offsets are byte offsets; the
                  structure is ASCII, so keys compare right and a multi-byte character
                  never matches one)
               ─▶ walk the objects along ``path`` (keys decoded as JSON strings, so an
                  escaped ``"na\\u006de"`` is ``name``; other values skipped with the C
                  scanner) ─▶ (start, end) of the value ─▶ splice its replacement in

The body must already have passed the strict parser (:mod:`extproc.mcp.strict_json`):
no repeated key, so the first member of a name is the only one. Anything not shaped as
``path`` says (a missing key, a value that is not an object on the way) gives ``None``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Final

_SCANNER: Final = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner
_scanstring: Final = json.decoder.scanstring  # type: ignore[attr-defined]
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")


def member_span(body: bytes, path: Sequence[str]) -> tuple[int, int] | None:
    """Byte offsets ``(start, end)`` of the value at ``path`` (keys from the top-level object) in ``body``."""
    text = body.decode("latin-1")
    try:
        pos = _skip(text, 0)
        for key in path:
            found = _member(text, pos, key)
            if found is None:
                return None
            pos = found
        _, end = _SCANNER(text, pos)
    except (ValueError, IndexError, StopIteration):
        return None
    return pos, end


def with_member(body: bytes, path: Sequence[str], value: Any) -> bytes | None:
    """``body`` with the value at ``path`` replaced by ``value`` (compact JSON), every other byte kept."""
    span = member_span(body, path)
    if span is None:
        return None
    start, end = span
    return body[:start] + json.dumps(value, separators=(",", ":")).encode() + body[end:]


def _skip(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _member(text: str, pos: int, key: str) -> int | None:
    """Where the value of member ``key`` starts, in the object at ``pos``; ``None`` if it has none."""
    if text[pos] != "{":
        return None
    pos = _skip(text, pos + 1)
    if text[pos] == "}":
        return None
    while True:
        if text[pos] != '"':
            return None
        name, pos = _scanstring(text, pos + 1)
        pos = _skip(text, pos)
        if text[pos] != ":":
            return None
        pos = _skip(text, pos + 1)
        if name == key:
            return pos
        _, pos = _SCANNER(text, pos)
        pos = _skip(text, pos)
        if text[pos] != ",":
            return None
        pos = _skip(text, pos + 1)


__all__ = ["member_span", "with_member"]
