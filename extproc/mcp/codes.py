"""Every JSON-RPC error code the gateway emits, and the HTTP status it travels with. Pure.

One table (:data:`ERROR_HTTP_STATUS`) for every denial: a :class:`extproc.api.Deny`
that names no status gets the one listed for its code, and codes not listed travel
with HTTP 200, as the MCP SDK's servers send them. The protocol's own codes map as the
SDK maps them (``mcp.shared.inbound.ERROR_CODE_HTTP_STATUS``; a test keeps them equal).

A denial may still name another status where the transport says more than the code:
413 for a body over the limit (``INVALID_REQUEST``), 502/503 for an upstream or a
backend that failed (``INTERNAL_ERROR``), 403 for a token that lacks a scope.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from extproc.mcp.spec import (
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)

UNAUTHENTICATED: Final = -32001
"""No valid agent token (the ``authn`` stage), or the upstream refused ours (``credentials``)."""
AUTH_UNAVAILABLE: Final = -32002
"""The agent's token issuer (its JWKS) could not be reached: nothing could be checked."""
POLICY_DENIED: Final = -32003
"""A call refused by policy (allow-list, Rego, trust, scopes)."""
RATE_LIMITED: Final = -32029
"""A rate limit of an ``MCPToolPolicy`` rule was reached."""

ERROR_HTTP_STATUS: Final[Mapping[int, int]] = MappingProxyType(
    {
        PARSE_ERROR: 400,
        INVALID_REQUEST: 400,
        METHOD_NOT_FOUND: 404,
        INVALID_PARAMS: 400,
        INTERNAL_ERROR: 500,
        HEADER_MISMATCH: 400,
        UNAUTHENTICATED: 401,
        AUTH_UNAVAILABLE: 503,
        POLICY_DENIED: 200,
        RATE_LIMITED: 429,
    }
)
"""JSON-RPC error code → the HTTP status of a denial carrying it."""


def http_status_for(code: int, default: int = 200) -> int:
    """The HTTP status to send with JSON-RPC error ``code`` (``default`` when unlisted)."""
    return ERROR_HTTP_STATUS.get(code, default)


__all__ = [
    "AUTH_UNAVAILABLE",
    "ERROR_HTTP_STATUS",
    "POLICY_DENIED",
    "RATE_LIMITED",
    "UNAUTHENTICATED",
    "http_status_for",
]
