"""The Lua filter that applies a Check's body splice on a virtual server's fast backend route. Pure.

See :mod:`extproc.core.splice` for the header. The filter is in the chain (before the
router) only when a virtual server has a fast route, and does nothing on a route that
does not name its script: it has no default script. On the fast backend routes, which
only a request the Check allowed can reach (their ``x-mcp-backend`` and ``x-mcp-splice``
are removed on arrival), it checks the header against the body Envoy buffered for the
Check and replaces those bytes. Should the header not fit (it always does: the Check
saw this very body), the call is answered with a JSON-RPC error and never forwarded.
"""

from __future__ import annotations

import json
from typing import Any, Final

from extproc.mcp.spec import INTERNAL_ERROR
from extproc.render.wire import LUA_FILTER, SPLICE_HEADER

_T: Final = "type.googleapis.com/"
SCRIPT: Final = "splice"
"""The name the fast backend routes refer to the script by (``LuaPerRoute.name``)."""

_REFUSAL: Final = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": INTERNAL_ERROR, "message": "the gateway could not rewrite this call for its MCP server"},
    }
)

_SOURCE: Final = f"""
local function refuse(handle)
  handle:respond({{[":status"] = "500", ["content-type"] = "application/json"}}, [[{_REFUSAL}]])
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local value = headers:get("{SPLICE_HEADER}")
  if value == nil then
    return refuse(handle)
  end
  local length, first, stop, replacement = string.match(value, "^(%d+):(%d+):(%d+):([%w%%._~-]*)$")
  if length == nil then
    return refuse(handle)
  end
  length, first, stop = tonumber(length), tonumber(first), tonumber(stop)
  local body = handle:body()
  local size = 0
  if body ~= nil then
    size = body:length()
  end
  if size ~= length or first > stop or stop > size then
    return refuse(handle)
  end
  if first == stop and replacement == "" then
    return
  end
  local raw = body:getBytes(0, size)
  local bytes = string.gsub(replacement, "%%(%x%x)", function(hex)
    return string.char(tonumber(hex, 16))
  end)
  local rewritten = string.sub(raw, 1, first) .. bytes .. string.sub(raw, stop + 1)
  body:setBytes(rewritten)
  headers:replace("content-length", tostring(#rewritten))
end
"""


def splice_filter() -> dict[str, Any]:
    """The Lua filter, with the splice script by name and no default script."""
    return {
        "name": LUA_FILTER,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.lua.v3.Lua",
            "source_codes": {SCRIPT: {"inline_string": _SOURCE}},
        },
    }


def splice_per_route() -> dict[str, Any]:
    """Per-route config of a fast backend route: run the splice script."""
    return {LUA_FILTER: {"@type": _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute", "name": SCRIPT}}


__all__ = ["SCRIPT", "splice_filter", "splice_per_route"]
