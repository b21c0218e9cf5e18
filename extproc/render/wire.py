"""Names and values that the rendered Envoy configuration and the running server must agree on. Pure.

The renderer writes them into the bootstrap; the front doors read or answer with them.
One module, so neither side imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

METADATA_NAMESPACE: Final = "mcp_extproc"
"""Envoy dynamic metadata namespace our stages publish into (ext_proc)."""
EXT_AUTHZ_NAMESPACE: Final = "envoy.filters.http.ext_authz"
"""Where Envoy puts the dynamic metadata an ext_authz ``Check`` answer carries."""
SERVER_METADATA_KEY: Final = "x-mcp-server"
"""Per route: gRPC initial metadata (ext_proc) or context extension (ext_authz) naming the MCPServer."""
BACKEND_HEADER: Final = "x-mcp-backend"
"""Set by the ``virtual`` stage on a request it routes: the MCPServer whose route (cluster) takes it."""
SPLICE_HEADER: Final = "x-mcp-splice"
"""Set by a Check on a virtual server's fast call: the body splice Envoy's Lua filter applies
(:mod:`extproc.core.splice`); its presence also picks the fast backend route."""
CALL_ERA_KEY: Final = "x-mcp-call"
"""ext_authz context extension of a fast route: the era of ``tools/call`` the route promised."""

PEER_ATTRIBUTE: Final = "connection.uri_san_peer_certificate"
"""The Envoy attribute ext_proc is asked for when an MCPAgent declares a service account: the
first URI SAN (SPIFFE ID) of the client certificate Envoy verified; ext_authz sends the same
as ``source.principal``."""

MCP_FILTER: Final = "envoy.filters.http.mcp"
EXT_AUTHZ_FILTER: Final = "envoy.filters.http.ext_authz"
EXT_PROC_FILTER: Final = "envoy.filters.http.ext_proc"
LUA_FILTER: Final = "envoy.filters.http.lua"

EXTPROC_CLUSTER: Final = "mcp_extproc"
"""The cluster that reaches our gRPC server."""
AUTHZ_HTTP_CLUSTER: Final = "mcp_extproc_authz_http"
"""The cluster that reaches our HTTP authorization service."""
STREAMS_CLUSTER: Final = "mcp_extproc_streams"
"""The cluster that reaches our stream service (a virtual server's GET stream); Envoy routes
a request there when a stage set ``extproc.streams.STREAM_HEADER``."""

UPSTREAM_HEADERS: Final = (
    "authorization|mcp-session-id|mcp-name|"
    "x-(?:[^e]|e(?:[^n]|$)|en(?:[^v]|$)|env(?:[^o]|$)|envo(?:[^y]|$)|envoy(?:[^-]|$)).*"
)
"""HTTP authorization answer headers Envoy copies onto the upstream request (RE2, whole name):
``authorization``, ``mcp-session-id`` (the upstream's own id, for the gateway's signed one),
``mcp-name`` (a virtual server's call: the backend's own tool name) and ``x-*`` but not ``x-envoy-*``."""
METADATA_HEADERS: Final = ("server", "method", "tool", "principal", "decision")
"""HTTP authorization answer headers Envoy turns into dynamic metadata (the access log reads them)."""
REMOVE_HEADER: Final = "x-envoy-auth-headers-to-remove"
"""HTTP authorization answer header listing the request headers Envoy removes."""
CARRIED_STATUS: Final[Mapping[int, int]] = {200: 209, 500: 470, 501: 471, 502: 472, 503: 473, 504: 474}
"""Denial statuses Envoy would misread from an HTTP authorization service, and the status that carries each.

To Envoy, an authorization service's 200 means "allow" and a 5xx means "the service
failed" (answered with ``status_on_error`` and no body). A denial the agent must get
with 200 (a JSON-RPC error such as -32003) or a 5xx (503: a token endpoint is down)
is therefore sent with the carrier status, and local-reply mappers in the bootstrap
(:func:`extproc.render.filters.local_replies`) turn it back, body and headers kept."""
