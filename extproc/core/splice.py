"""A body rewrite carried by a header, for the one place Envoy applies it: a virtual server's fast call. Pure.

ext_authz cannot change a body, yet a ``tools/call`` through a virtual server must reach
its backend with the prefix taken off the tool's name. The ``virtual`` stage changes only
that one value (:func:`extproc.mcp.members.with_member`), so the rewrite is one splice::

    Check: original body, rewritten body ─▶ common prefix and suffix ─▶
           x-mcp-splice: <original length>:<start>:<stop>:<replacement, percent-encoded>
    Envoy: the virtual server's fast backend route (and only it) runs a Lua script
           (extproc.render.splice): the body buffered, its length checked against the
           header's, bytes [start, stop) replaced ─▶ the backend

``apply_splice`` is the script's Python twin, for tests. A rewrite that is not small
(past :data:`MAX_REPLACEMENT_BYTES`) has no splice: the Check refuses the call then,
as it refuses any other rewrite it cannot carry.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import quote, unquote_to_bytes

MAX_REPLACEMENT_BYTES: Final = 1024
"""The most bytes a splice may put in (a tool name, a resource URI); the header stays small."""

_SPLICE: Final = re.compile(r"(\d+):(\d+):(\d+):([A-Za-z0-9%._~-]*)")


def splice_of(original: bytes, rewritten: bytes) -> str | None:
    """The header value that turns ``original`` into ``rewritten``; ``None`` if the change is too large."""
    start = _common_prefix(original, rewritten)
    tail = _common_suffix(original, rewritten, min(len(original), len(rewritten)) - start)
    stop = len(original) - tail
    replacement = rewritten[start : len(rewritten) - tail]
    if len(replacement) > MAX_REPLACEMENT_BYTES:
        return None
    return f"{len(original)}:{start}:{stop}:{quote(replacement, safe='')}"


def apply_splice(body: bytes, value: str) -> bytes:
    """``body`` with the splice ``value`` applied, as the Lua script applies it.

    Raises:
        ValueError: the value is malformed or was made for a body of another length.
    """
    match = _SPLICE.fullmatch(value)
    if match is None:
        raise ValueError(f"malformed splice {value!r}")
    length, start, stop = (int(match.group(i)) for i in (1, 2, 3))
    if length != len(body) or not start <= stop <= length:
        raise ValueError(f"splice {value!r} does not fit a body of {len(body)} bytes")
    return body[:start] + unquote_to_bytes(match.group(4)) + body[stop:]


def _common_prefix(a: bytes, b: bytes) -> int:
    """How many leading bytes ``a`` and ``b`` share (slices compared at C speed, halving)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """How many trailing bytes ``a`` and ``b`` share, at most ``limit``."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if a[len(a) - middle :] == b[len(b) - middle :]:
            low = middle
        else:
            high = middle - 1
    return low


__all__ = ["MAX_REPLACEMENT_BYTES", "apply_splice", "splice_of"]
