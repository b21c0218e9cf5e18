"""The ``allowlist`` stage: enforce ``MCPServer.spec.allowedTools`` / ``deniedTools``.

A tool is callable when it matches a glob of ``allowedTools`` (empty: none;
``["*"]``: all) and no glob of ``deniedTools``. A call of any other tool is
refused with HTTP 200 and a JSON-RPC error (-32003) carrying the call's id, and
the tool is removed from ``tools/list`` results. The batch, JSON and SSE
machinery is :class:`plugins.lib.toolgate.ToolGate`'s.

A server that allows ``"*"`` and denies nothing has nothing to refuse or hide: the
stage skips its exchanges (and reads none of their responses).
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from extproc.api import Context, Deny, StageConfig
from extproc.config.resources import MCPServer
from extproc.mcp.codes import POLICY_DENIED
from extproc.mcp.jsonrpc import Message
from plugins.lib.toolgate import ToolGate


def tool_allowed(server: MCPServer, tool: str) -> bool:
    """True when ``tool`` matches ``allowedTools`` and no glob of ``deniedTools``."""
    spec = server.spec
    if not any(fnmatchcase(tool, glob) for glob in spec.allowed_tools):
        return False
    return not any(fnmatchcase(tool, glob) for glob in spec.denied_tools)


class AllowlistStage(ToolGate[StageConfig]):
    """Refuse calls to tools outside the server's allow-list; hide them from tools/list."""

    name: ClassVar[str] = "allowlist"

    def applies(self, ctx: Context, server: MCPServer) -> bool:
        spec = server.spec
        return "*" not in spec.allowed_tools or bool(spec.denied_tools)

    async def refuse_call(self, ctx: Context, server: MCPServer, message: Message) -> Deny | None:
        tool = message.tool_name or ""
        if tool_allowed(server, tool):
            return None
        ctx.explain(f"allowlist: {tool!r} is not in allowedTools of MCPServer {server.name!r} (or is denied)")
        return Deny(
            status=200,
            code=POLICY_DENIED,
            message=f"tool {tool!r} is not allowed on MCP server {server.name!r}",
            reason="tool_not_allowed",
        )

    async def hide_tool(self, ctx: Context, server: MCPServer, name: str, tool: Mapping[str, Any]) -> bool:
        return not tool_allowed(server, name)
