"""The ``mcp`` stage: parse and classify every MCP request.

Data flow::

    request headers ─▶ drop agent-supplied x-mcp-* headers (they are ours to set)
                    ─▶ refuse: unknown server (404), oversized Content-Length (413),
                       a routing header sent twice (400)
                    ─▶ ctx.hints = what Mcp-Method / Mcp-Name / MCP-Protocol-Version say
    request body    ─▶ parse_request (JSON-RPC, batches, era, 2026 header checks, size)
                    ─▶ refuse with the codec's rejection (400/413 + JSON-RPC error)
                    ─▶ ctx.mcp = the parsed request
                    ─▶ x-mcp-method / x-mcp-tool / x-mcp-server to the upstream, and the
                       same as Envoy dynamic metadata (routing, RBAC, access logs)

For a batch, ``x-mcp-method`` and ``x-mcp-tool`` list every element's method
and tool, comma-separated, so a header-based rule cannot be dodged by putting
a call second in a batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from extproc.api import Context, Continue, Deny, Stage, StageConfig, Verdict
from extproc.mcp.headers import CONTENT_LENGTH, DERIVED_HEADERS, X_MCP_METHOD, X_MCP_SERVER, X_MCP_TOOL
from extproc.mcp.jsonrpc import (
    DEFAULT_MAX_REQUEST_BYTES,
    McpRequest,
    Rejection,
    encode_error,
    find_duplicated_routing_header,
    header_hints,
    parse_request,
)
from extproc.mcp.spec import INVALID_REQUEST, METHOD_NOT_FOUND


class McpConfig(StageConfig):
    """Configuration of the ``mcp`` stage."""

    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, gt=0, alias="maxRequestBytes")


def _unique(values: list[str]) -> str:
    return ",".join(dict.fromkeys(values))


def derived_headers(request: McpRequest, server: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The x-mcp-* headers and the dynamic metadata that describe ``request``."""
    methods = [m.method for m in request.messages if m.method is not None]
    tools = [m.tool_name for m in request.messages if m.tool_name is not None]
    headers = {X_MCP_SERVER: server}
    metadata: dict[str, Any] = {"server": server, "era": request.era.value, "batch": request.is_batch}
    if methods:
        headers[X_MCP_METHOD] = metadata["method"] = _unique(methods)
    if tools:
        headers[X_MCP_TOOL] = metadata["tool"] = _unique(tools)
    return headers, metadata


class McpStage(Stage[McpConfig]):
    """Parse and classify MCP requests; expose method, tool and server to Envoy."""

    name: ClassVar[str] = "mcp"
    # Parses and sets headers, never rewrites a body: fine on the fast tools/call route.
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def max_request_bytes(cls, config: McpConfig) -> int | None:
        return config.max_request_bytes

    async def on_request_headers(self, ctx: Context) -> Verdict:
        spoofed = tuple(name for name in DERIVED_HEADERS if name in ctx.request_headers)
        if ctx.route_name is None:
            return Deny(
                status=404,
                code=METHOD_NOT_FOUND,
                message=f"no MCPServer is routed at {ctx.path.split('?', 1)[0]!r}; agents reach a server "
                "at /<name>/mcp (or set the x-mcp-server gRPC metadata on the route)",
                reason="unknown_server",
            )
        length = ctx.request_headers.get(CONTENT_LENGTH)
        if length is not None and length.isdigit() and int(length) > self.config.max_request_bytes:
            return Deny(
                status=413,
                code=INVALID_REQUEST,
                message=f"request body of {length} bytes exceeds the {self.config.max_request_bytes}-byte limit",
                reason="too_large",
            )
        duplicated = find_duplicated_routing_header(ctx.request_header_list)
        if duplicated is not None:
            return Deny(
                status=400,
                code=INVALID_REQUEST,
                message=f"the {duplicated} header was sent more than once; send it once",
                reason="duplicate_header",
            )
        ctx.hints = header_hints(ctx.request_headers)
        return Continue(remove_headers=spoofed, metadata={"server": ctx.route_name})

    async def on_request_body(self, ctx: Context) -> Verdict:
        if not ctx.request_has_body and not ctx.body:
            return None
        parsed = parse_request(ctx.body, ctx.request_headers, max_bytes=self.config.max_request_bytes)
        if isinstance(parsed, Rejection):
            return Deny(
                status=parsed.status,
                code=parsed.code,
                message=parsed.message,
                data=parsed.data,
                reason="malformed",
                body=encode_error(parsed.id, parsed.code, parsed.message, parsed.data),
            )
        ctx.mcp = parsed
        headers, metadata = derived_headers(parsed, ctx.route_name or "")
        return Continue(set_headers=headers, metadata=metadata)
