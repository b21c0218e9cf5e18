"""HTTP header names that MCP traffic carries, and the header-value codec.

Every name here is lower-case, the form Envoy hands us and the form the rest of
the codebase looks headers up by. The 2026-07-28 revision mirrors parts of the
JSON-RPC body into *routing headers* (``Mcp-Method``, ``Mcp-Name``,
``MCP-Protocol-Version``) so that an intermediary can decide in the header
phase; values that would not survive an HTTP field travel base64-encoded inside
a ``=?base64?...?=`` sentinel (see :func:`decode_header_value`).

The ``x-mcp-*`` headers are *derived*: this server sets them from the parsed
body for Envoy routing, RBAC and access logs, so an agent must never be able to
supply them itself.

Also here: what the headers alone say (:func:`header_hints`), duplicated
routing header lines (:func:`find_duplicated_routing_header`) and whether the
routing headers agree with a parsed body (:func:`routing_header_mismatch`,
the last rung of :func:`extproc.mcp.jsonrpc.parse_request`).
"""

from __future__ import annotations

import base64
import binascii
import re
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from extproc.mcp.spec import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS, PROTOCOL_VERSION_META_KEY

__all__ = [
    "CONTENT_LENGTH",
    "CONTENT_TYPE",
    "DERIVED_HEADERS",
    "MCP_METHOD",
    "MCP_NAME",
    "MCP_PROTOCOL_VERSION",
    "MCP_SESSION_ID",
    "NAME_BEARING_METHODS",
    "ROUTING_HEADERS",
    "TRACE_HEADERS",
    "X_MCP_METHOD",
    "X_MCP_SERVER",
    "X_MCP_TOOL",
    "Era",
    "HeaderHints",
    "decode_header_value",
    "find_duplicated_routing_header",
    "header_hints",
    "quote",
    "routing_header_mismatch",
]

MCP_METHOD: Final[str] = "mcp-method"
"""The JSON-RPC method, mirrored from the body (2026-07-28)."""

MCP_NAME: Final[str] = "mcp-name"
"""The tool or prompt name, or the resource URI, mirrored from the body (2026-07-28)."""

MCP_PROTOCOL_VERSION: Final[str] = "mcp-protocol-version"
"""The protocol revision the client speaks (2025-06-18 onwards)."""

MCP_SESSION_ID: Final[str] = "mcp-session-id"
"""The legacy-era session id the server assigns in its ``initialize`` response."""

X_MCP_METHOD: Final[str] = "x-mcp-method"
"""Derived: the JSON-RPC method of the request, set by this server."""

X_MCP_TOOL: Final[str] = "x-mcp-tool"
"""Derived: the tool a ``tools/call`` names, set by this server."""

X_MCP_SERVER: Final[str] = "x-mcp-server"
"""Derived: the name of the upstream ``MCPServer`` resource, set by this server."""

CONTENT_TYPE: Final[str] = "content-type"
CONTENT_LENGTH: Final[str] = "content-length"

TRACE_HEADERS: Final[tuple[str, str]] = ("traceparent", "tracestate")
"""W3C trace context: request headers, and (SEP-414) the same keys in ``params._meta``."""

ROUTING_HEADERS: Final[frozenset[str]] = frozenset({MCP_METHOD, MCP_NAME, MCP_PROTOCOL_VERSION})
"""Headers that mirror the body; each may appear at most once in a request."""

SINGLE_HEADERS: Final[frozenset[str]] = ROUTING_HEADERS | {MCP_SESSION_ID}
"""Headers a request may carry at most once: the routing headers and ``Mcp-Session-Id``
(which copy a server reads is its own business; the gateway refuses to guess)."""

DERIVED_HEADERS: Final[frozenset[str]] = frozenset({X_MCP_METHOD, X_MCP_TOOL, X_MCP_SERVER})
"""Headers this server sets from the parsed request; any copy an agent sends is dropped."""

NAME_BEARING_METHODS: Final[Mapping[str, str]] = MappingProxyType(
    {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
)
"""Method -> the ``params`` key whose value ``Mcp-Name`` mirrors."""

_B64_SENTINEL: Final = re.compile(r"=\?base64\?(?P<payload>.*)\?=")


def decode_header_value(value: str | None) -> str | None:
    """Decode a routing-header value that may carry the base64 sentinel.

    A value of the form ``=?base64?<payload>?=`` is replaced by its decoded
    UTF-8 payload; any other value is returned verbatim.

    Args:
        value: The header value, or ``None`` when the header is absent (so
            ``headers.get(...)`` can be passed straight in).

    Returns:
        The decoded value; ``None`` when ``value`` is ``None`` or the sentinel
        is malformed (bad or non-canonical base64, or bytes that are not
        UTF-8), so that a corrupt header never matches a body value by accident.
    """
    if value is None:
        return None
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII payload
        return None
    # validate=True still tolerates non-zero trailing bits; the encoder never emits them.
    if base64.b64encode(decoded).decode("ascii") != payload:
        return None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Era(StrEnum):
    """The two shapes of MCP on the wire."""

    LEGACY = "legacy"
    """2024-11-05 to 2025-11-25: ``initialize`` handshake and ``Mcp-Session-Id``."""
    MODERN = "modern"
    """2026-07-28 on: the protocol version rides in every request's ``params._meta``."""


@dataclass(frozen=True, slots=True)
class HeaderHints:
    """What the request headers alone say, before the body arrives.

    Attributes:
        era: ``MODERN`` for a modern ``MCP-Protocol-Version``, ``LEGACY`` for a
            handshake-era one, ``None`` when absent or unknown.
        protocol_version: The raw ``MCP-Protocol-Version`` value.
        method: The decoded ``Mcp-Method``.
        name: The decoded ``Mcp-Name``.
    """

    era: Era | None
    protocol_version: str | None
    method: str | None
    name: str | None


def header_hints(headers: Mapping[str, str]) -> HeaderHints:
    """Read the routing headers (keys lower-case); trust them only once the body agrees."""
    version = headers.get(MCP_PROTOCOL_VERSION)
    era = None
    if version in MODERN_PROTOCOL_VERSIONS:
        era = Era.MODERN
    elif version in HANDSHAKE_PROTOCOL_VERSIONS:
        era = Era.LEGACY
    method, name = decode_header_value(headers.get(MCP_METHOD)), decode_header_value(headers.get(MCP_NAME))
    return HeaderHints(era, version, method, name)


def find_duplicated_routing_header(header_list: Iterable[tuple[str, str]]) -> str | None:
    """Return the (lower-case) name of a header of :data:`SINGLE_HEADERS` sent more than once, else ``None``.

    Takes the raw header lines: a folded mapping hides duplicates, and readers
    that take the first copy and readers that take the last would disagree.
    """
    seen: set[str] = set()
    for name, _ in header_list:
        key = name.lower()
        if key in SINGLE_HEADERS:
            if key in seen:
                return key
            seen.add(key)
    return None


_DISPLAY_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {MCP_PROTOCOL_VERSION: "MCP-Protocol-Version", MCP_METHOD: "Mcp-Method", MCP_NAME: "Mcp-Name"}
)


_REPR: Final = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120


def quote(value: Any) -> str:
    """``repr`` of a client-supplied value, shortened to fit in an error message."""
    return _REPR.repr(value)


def _mismatch(headers: Mapping[str, str], header: str, body_field: str, expected: Any) -> str:
    sent, name = headers.get(header), _DISPLAY_NAMES[header]
    if sent is None:
        return f"{name} header is missing; it must equal the body's {body_field} {quote(expected)}"
    if expected is None:
        return f"{name} header is {quote(sent)} but the body has no {body_field}; a modern request carries both"
    return f"{name} header {quote(sent)} does not match the body's {body_field} {quote(expected)}"


def routing_header_mismatch(
    headers: Mapping[str, str],
    era: Era,
    method: str,
    params: Mapping[str, Any] | None,
    is_request: bool,
    meta_version: Any,
) -> str | None:
    """Say how the routing headers disagree with one request or notification, or ``None``.

    On the modern revision the headers are required: ``MCP-Protocol-Version``
    must equal the body's ``params._meta`` protocol version (a notification
    without one is let off), ``Mcp-Method`` the method, and ``Mcp-Name`` the
    name or URI of a name-bearing method. In the legacy era a routing header is
    optional, but one that is present must still agree, so that nobody deciding
    on headers alone can be told one thing while the upstream is told another.

    Args:
        headers: The request headers, keys lower-case.
        era: The era the request was classified as.
        method: The body's method.
        params: The body's ``params``.
        is_request: ``False`` for a notification.
        meta_version: The body's ``params._meta`` protocol version (``None`` when absent).

    Returns:
        A message naming the header and both values, or ``None`` when they agree.
    """
    modern = era is Era.MODERN
    version = headers.get(MCP_PROTOCOL_VERSION)
    if modern and (is_request or meta_version is not None) and (version is None or version != meta_version):
        body_field = f"params._meta[{PROTOCOL_VERSION_META_KEY!r}]"
        return _mismatch(headers, MCP_PROTOCOL_VERSION, body_field, meta_version)
    method_header = headers.get(MCP_METHOD)
    if (modern or method_header is not None) and decode_header_value(method_header) != method:
        return _mismatch(headers, MCP_METHOD, "method", method)
    name_key = NAME_BEARING_METHODS.get(method)
    name = (params or {}).get(name_key) if name_key is not None else None
    name_header = headers.get(MCP_NAME)
    if name is not None and (modern or name_header is not None) and decode_header_value(name_header) != name:
        return _mismatch(headers, MCP_NAME, f"params.{name_key}", name)
    return None
