"""MCP protocol constants: JSON-RPC error codes, protocol revisions, the ``_meta`` version key. Pure.

The same values as the MCP SDK's ``mcp_types`` package, which a test keeps them
equal to (``tests/unit/mcp/test_spec.py``). They are written out here because
importing ``mcp_types`` loads every protocol model (pydantic): about 8 MB of
resident memory and 0.17 s of startup for a dozen constants.
"""

from __future__ import annotations

from typing import Final

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
HEADER_MISMATCH: Final = -32020
"""2026-07-28: a routing header disagrees with the body."""

HANDSHAKE_PROTOCOL_VERSIONS: Final[tuple[str, ...]] = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
"""Revisions with the ``initialize`` handshake and sessions (the legacy era)."""
MODERN_PROTOCOL_VERSIONS: Final[tuple[str, ...]] = ("2026-07-28",)
"""Revisions without a handshake: the version rides in every request's ``params._meta``."""
PROTOCOL_VERSION_META_KEY: Final = "io.modelcontextprotocol/protocolVersion"
