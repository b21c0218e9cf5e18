"""The fast upstream: an Envoy answering every request itself, with no MCP server behind it.

Not a product feature, so the bootstrap is a small dict here rather than in
``extproc.render.bootstrap``. Pure: no I/O. Routes::

    /echoing/<backend>/...  ─▶ Lua (envoy.filters.http.lua): a tiny MCP server that echoes
                               the request's id (what the virtual stage's own requests need):
                               initialize ─▶ an InitializeResult + Mcp-Session-Id
                               notifications/* ─▶ 202; GET (any non-POST) ─▶ 405
                               tools/list ─▶ BACKEND_TOOLS; tools/call of one ─▶ the canned
                               content, else JSON-RPC -32602; anything else ─▶ -32601
                               every answer carries x-bench-backend: <backend>
    any other GET           ─▶ 405 (no GET stream: the session keeper of a kept session stops
                               at once instead of reconnecting every few hundred milliseconds)
    everything else         ─▶ direct_response 200: CANNED_RESULT (fixed id 1; Lua disabled)

The Lua script takes the first ``"id":`` of the body as the request's id (a string
without escaped quotes, or an integer): true of every request the benchmark and the
gateway send, which put the id before ``params``.

A ``buffer`` filter reads the whole request body before either route answers:
answering a request that has not finished arriving makes Envoy send
``connection: close``, and the front Envoy would then open a new upstream
connection for every request.
"""

from __future__ import annotations

import json
from typing import Any, Final

from bench.shapes import ALLOWED_TOOL, DENIED_TOOL

CANNED_RESULT: Final[dict[str, Any]] = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {"content": [{"type": "text", "text": "hi"}]},
}
"""What the canned route answers to every request (and the echoing route to a tools/call of id 1)."""

ECHOING_PREFIX: Final = "/echoing/"
BACKEND_HEADER: Final = "x-bench-backend"
"""Response header of the echoing route: the backend whose path the request came in on."""
BACKEND_TOOLS: Final = (ALLOWED_TOOL, *(f"tool_{n}" for n in range(1, 9)), DENIED_TOOL)
"""The tools every echoing backend lists (and answers calls of)."""

_T: Final = "type.googleapis.com/"
_MAX_REQUEST_BYTES: Final = 1024 * 1024
_LUA_FILTER: Final = "envoy.filters.http.lua"

_LUA: Final = """
local CALLABLE = {%(callable)s}
local TOOLS = [==[%(tools)s]==]
local CALLED = [==[%(called)s]==]

local function request_id(text)
  local _, stop = string.find(text, '"id"%%s*:%%s*')
  if stop == nil then
    return "null"
  end
  return string.match(text, '^%%b""', stop + 1) or string.match(text, "^%%-?%%d+", stop + 1) or "null"
end

local function answer(handle, backend, id, member, value, extra)
  local headers = {[":status"] = "200", ["content-type"] = "application/json", ["%(header)s"] = backend}
  for name, header in pairs(extra or {}) do
    headers[name] = header
  end
  handle:respond(headers, '{"jsonrpc":"2.0","id":' .. id .. ',"' .. member .. '":' .. value .. '}')
end

local function refuse(handle, backend, id, code, message)
  answer(handle, backend, id, "error", '{"code":' .. code .. ',"message":"' .. message .. '"}')
end

local function initialized(backend, text)
  local version = string.match(text, '"protocolVersion"%%s*:%%s*"([^"]*)"') or "2025-06-18"
  return '{"protocolVersion":"' .. version .. '","capabilities":{"tools":{}},'
    .. '"serverInfo":{"name":"bench-' .. backend .. '","version":"1"}}'
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local backend = string.match(headers:get(":path"), "^%(prefix)s([^/?]+)") or ""
  if headers:get(":method") ~= "POST" then
    handle:respond({[":status"] = "405", ["allow"] = "POST"}, "")
    return
  end
  local body = handle:body()
  local text = body and body:getBytes(0, body:length()) or ""
  local method = string.match(text, '"method"%%s*:%%s*"([^"]*)"') or ""
  if string.find(method, "^notifications/") then
    handle:respond({[":status"] = "202"}, "")
    return
  end
  local id = request_id(text)
  if method == "initialize" then
    answer(handle, backend, id, "result", initialized(backend, text), {["mcp-session-id"] = "bench-" .. backend})
  elseif method == "tools/list" then
    answer(handle, backend, id, "result", TOOLS)
  elseif method == "tools/call" then
    local tool = string.match(text, '"name"%%s*:%%s*"([^"]*)"')
    if CALLABLE[tool] then
      answer(handle, backend, id, "result", CALLED)
    else
      refuse(handle, backend, id, -32602, "unknown tool")
    end
  else
    refuse(handle, backend, id, -32601, "method not found")
  end
end
"""


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def echoing_url(base_url: str, backend: str) -> str:
    """The URL of the echoing backend ``backend`` on the upstream at ``base_url``."""
    return f"{base_url}{ECHOING_PREFIX}{backend}/mcp"


def lua_script() -> str:
    """The echoing route's Lua script (see the module docstring)."""
    tools = {"tools": [{"name": name, "inputSchema": {"type": "object"}} for name in BACKEND_TOOLS]}
    return _LUA % {
        "callable": ", ".join(f'["{name}"] = true' for name in BACKEND_TOOLS),
        "tools": _compact(tools),
        "called": _compact(CANNED_RESULT["result"]),
        "header": BACKEND_HEADER,
        "prefix": ECHOING_PREFIX,
    }


def _socket(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _json_header() -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


def _routes() -> list[dict[str, Any]]:
    unanswered = {"jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message": "the Lua script did not answer"}}
    lua_off = {_LUA_FILTER: {"@type": _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute", "disabled": True}}
    return [
        {
            # The Lua filter answers first; this is only reached should it not.
            "match": {"prefix": ECHOING_PREFIX},
            "direct_response": {"status": 500, "body": {"inline_string": _compact(unanswered)}},
            "response_headers_to_add": _json_header(),
        },
        {
            "match": {"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
            "direct_response": {"status": 405},
            "response_headers_to_add": [{"header": {"key": "allow", "value": "POST"}}],
            "typed_per_filter_config": lua_off,
        },
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": _compact(CANNED_RESULT)}},
            "response_headers_to_add": _json_header(),
            "typed_per_filter_config": lua_off,
        },
    ]


def upstream_bootstrap(admin_socket: str, listen_port: int = 0) -> dict[str, Any]:
    """The canned upstream's Envoy bootstrap (port 0: Envoy picks; read it from the admin API at ``admin_socket``)."""
    hcm = {
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "canned",
        "route_config": {
            "name": "canned",
            "virtual_hosts": [{"name": "canned", "domains": ["*"], "routes": _routes()}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": _T + "envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": _MAX_REQUEST_BYTES,
                },
            },
            {
                "name": _LUA_FILTER,
                "typed_config": {
                    "@type": _T + "envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua_script()},
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "node": {"id": "bench-upstream", "cluster": "bench-upstream"},
        # Like every Envoy here: the admin API (no authentication) on a private unix socket.
        "admin": {"address": {"pipe": {"path": admin_socket, "mode": 0o600}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "canned",
                    "address": _socket(listen_port),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ]
        },
    }
