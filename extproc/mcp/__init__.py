"""The MCP codec: pure decoding and encoding of MCP traffic, no I/O.

* :mod:`extproc.mcp.headers` — header names, the ``=?base64?...?=`` value
  codec, and what the routing headers say before the body arrives.
* :mod:`extproc.mcp.jsonrpc` — the request ladder (:func:`parse_request`),
  JSON-RPC messages and error bodies.
* :mod:`extproc.mcp.sse` — incremental, byte-preserving Server-Sent Events.
"""

from extproc.mcp.codes import ERROR_HTTP_STATUS, http_status_for
from extproc.mcp.headers import (
    CONTENT_LENGTH,
    CONTENT_TYPE,
    DERIVED_HEADERS,
    MCP_METHOD,
    MCP_NAME,
    MCP_PROTOCOL_VERSION,
    MCP_SESSION_ID,
    NAME_BEARING_METHODS,
    ROUTING_HEADERS,
    X_MCP_METHOD,
    X_MCP_SERVER,
    X_MCP_TOOL,
    Era,
    HeaderHints,
    decode_header_value,
    find_duplicated_routing_header,
    header_hints,
)
from extproc.mcp.jsonrpc import (
    BATCH_PROTOCOL_VERSIONS,
    DEFAULT_MAX_REQUEST_BYTES,
    McpRequest,
    Message,
    Rejection,
    encode_error,
    error_object,
    parse_message,
    parse_request,
)
from extproc.mcp.sse import DEFAULT_MAX_EVENT_BYTES, SseDecoder, SseEvent, SseTooLarge, encode_event

__all__ = [
    "BATCH_PROTOCOL_VERSIONS",
    "CONTENT_LENGTH",
    "CONTENT_TYPE",
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DERIVED_HEADERS",
    "ERROR_HTTP_STATUS",
    "MCP_METHOD",
    "MCP_NAME",
    "MCP_PROTOCOL_VERSION",
    "MCP_SESSION_ID",
    "NAME_BEARING_METHODS",
    "ROUTING_HEADERS",
    "X_MCP_METHOD",
    "X_MCP_SERVER",
    "X_MCP_TOOL",
    "Era",
    "HeaderHints",
    "McpRequest",
    "Message",
    "Rejection",
    "SseDecoder",
    "SseEvent",
    "SseTooLarge",
    "decode_header_value",
    "encode_error",
    "encode_event",
    "error_object",
    "find_duplicated_routing_header",
    "header_hints",
    "http_status_for",
    "parse_message",
    "parse_request",
]
