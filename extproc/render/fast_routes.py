"""The fast path for ``tools/call``: one ext_authz ``Check`` instead of ext_proc round trips. Pure.

A ``tools/call`` whose response no stage reads (see
:func:`extproc.core.plan.fast_call_eras`) can be decided from the
request alone. ext_proc would cost two or three gRPC round trips for it
(request headers, request body, maybe response headers); one ext_authz
``Check`` carries the headers and the body together and can still set and
remove headers (the upstream credential). The ``auto`` front door renders::

    POST /N/mcp ─▶ envoy.filters.http.mcp (Envoy's own MCP parser: the JSON-RPC
                   method into dynamic metadata, then the route is chosen again)
      route "N call modern":  Mcp-Method: tools/call and a 2026-07-28 version header
      route "N call legacy":  metadata method == tools/call, no modern version header
          ─▶ ext_authz Check (headers + body; context_extensions name the server and
             the era the route promised); ext_proc is off on these routes, and the
             upstream's Mcp-Session-Id is removed from their responses (no response
             phase can swap it for the agent's signed id)
      route "N oversized" (first; Content-Length over the limit): Envoy's MCP filter off,
          so the mcp stage answers 413 from the headers, before the upload
      route "N unsized" (next; a POST without Content-Length: chunked, or HTTP/2):
          Envoy's MCP filter off too, ext_proc as on "N". Envoy's MCP filter stops
          reading at the limit and holds the stream, while ext_proc waits for the whole
          body: a chunked upload over the limit would hang (or reach a stage cut
          short). Without it, ext_proc gets the body, or Envoy refuses it past the
          buffer limit (413, turned into a JSON-RPC -32600 by the local replies)
      route "N" (everything else: tools/list, initialize, GET, DELETE, ...)
          ─▶ ext_proc, exactly as with the ``ext_proc`` front door; ext_authz is off
             on this and every other route

The native filter only picks the route; our parser still decides. The check
(:mod:`extproc.frontdoor.decision`, over gRPC or HTTP) refuses a request whose parse is not
what the route promised (one
``tools/call`` of that era), so a body that fools Envoy's parser (a repeated
key, say) is refused, never waved through on the fast route.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any, Final

from extproc.mcp.headers import MCP_METHOD, MCP_PROTOCOL_VERSION, MCP_SESSION_ID
from extproc.mcp.spec import MODERN_PROTOCOL_VERSIONS
from extproc.render.wire import CALL_ERA_KEY, EXT_AUTHZ_FILTER, EXT_PROC_FILTER, MCP_FILTER, SERVER_METADATA_KEY

_T: Final = "type.googleapis.com/"
ERAS: Final = ("modern", "legacy")

_MODERN_VERSION = {
    "name": MCP_PROTOCOL_VERSION,
    "string_match": {"safe_regex": {"regex": "|".join(re.escape(v) for v in sorted(MODERN_PROTOCOL_VERSIONS))}},
}


def promised_era(headers: Mapping[str, str]) -> str:
    """The era a fast route promised, from the request headers the routes match on.

    The Python twin of :func:`_match` for a caller that gets no context extensions
    (the HTTP authorization service): only the modern route requires a modern
    version header together with ``Mcp-Method: tools/call``.
    """
    modern = headers.get(MCP_PROTOCOL_VERSION) in MODERN_PROTOCOL_VERSIONS and headers.get(MCP_METHOD) == "tools/call"
    return "modern" if modern else "legacy"


def native_mcp_filter(max_request_bytes: int) -> dict[str, Any]:
    """Envoy's MCP filter: parses JSON-RPC POST bodies into metadata and re-selects the route."""
    return {
        "name": MCP_FILTER,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.mcp.v3.Mcp",
            # Anything it cannot parse goes on to ext_proc, where our parser answers it.
            "traffic_mode": "PASS_THROUGH",
            "clear_route_cache": True,
            "max_request_body_size": max_request_bytes,
        },
    }


_POST: Final = {"name": ":method", "string_match": {"exact": "POST"}}


def modern_call_match(path: str) -> dict[str, Any]:
    """A 2026-07-28 ``tools/call`` POST to ``path``, by its headers alone."""
    method = {"name": MCP_METHOD, "string_match": {"exact": "tools/call"}}
    return {"path": path, "headers": [_POST, method, _MODERN_VERSION]}


def _match(path: str, era: str) -> dict[str, Any]:
    if era == "modern":
        return modern_call_match(path)
    return {
        "path": path,
        "headers": [_POST, {**_MODERN_VERSION, "invert_match": True}],
        "dynamic_metadata": [
            {"filter": MCP_FILTER, "path": [{"key": "method"}], "value": {"string_match": {"exact": "tools/call"}}}
        ],
    }


def fast_per_filter(server: str, era: str) -> dict[str, Any]:
    """Per-route config of a fast route: the Check (naming ``server`` and ``era``), no ext_proc.

    A modern route is chosen by its headers alone, so Envoy's MCP parser, which would
    only re-select it, is off there too (the Check parses the body anyway).
    """
    per_filter: dict[str, Any] = {
        EXT_AUTHZ_FILTER: {
            "@type": _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"context_extensions": {SERVER_METADATA_KEY: server, CALL_ERA_KEY: era}},
        },
        EXT_PROC_FILTER: {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "disabled": True,
        },
    }
    if era == "modern":
        per_filter[MCP_FILTER] = {"@type": _T + "envoy.config.route.v3.FilterConfig", "disabled": True}
    return per_filter


def without_authz(route: dict[str, Any]) -> dict[str, Any]:
    """``route`` with ext_authz switched off, unless it configures it: every route but the fast ones.

    Per route, not with the filter's own ``disabled`` flag: Envoy builds a request's
    filter chain from the route chosen *before* the MCP filter re-selects it, so a
    filter disabled in the chain would stay off on the fast route too, while ext_proc
    is off there: nothing would check the call.
    """
    route.setdefault("typed_per_filter_config", {}).setdefault(
        EXT_AUTHZ_FILTER,
        {"@type": _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", "disabled": True},
    )
    return route


def oversized_route(route: dict[str, Any], server: str, max_request_bytes: int) -> dict[str, Any]:
    """A route for bodies announced larger than the limit: Envoy's MCP filter off, ext_proc on.

    Envoy's MCP filter would wait for the whole body before anything else runs; with
    it off on this route, the ``mcp`` stage answers 413 from the request headers,
    before the agent uploads a byte. Placed before the fast routes.
    """
    big = copy.deepcopy(route)
    big["name"] = f"{server} oversized"
    big["match"] = {
        "path": route["match"]["path"],
        "headers": [{"name": "content-length", "range_match": {"start": max_request_bytes + 1, "end": 2**62}}],
    }
    big.setdefault("typed_per_filter_config", {})[MCP_FILTER] = {
        "@type": _T + "envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }
    return big


def unsized_route(route: dict[str, Any], server: str) -> dict[str, Any]:
    """A route for POSTs that announce no length (chunked, HTTP/2): Envoy's MCP filter off, ext_proc on.

    Only a body whose length is known up front (at most the limit: a longer one took
    :func:`oversized_route`) meets Envoy's MCP filter, which never sees more than it
    may buffer. Placed after the oversized route and before the fast routes, so an
    unsized ``tools/call`` goes through ext_proc.
    """
    unsized = copy.deepcopy(route)
    unsized["name"] = f"{server} unsized"
    unsized["match"] = {
        "path": route["match"]["path"],
        "headers": [
            {"name": ":method", "string_match": {"exact": "POST"}},
            {"name": "content-length", "present_match": False},
        ],
    }
    unsized.setdefault("typed_per_filter_config", {})[MCP_FILTER] = {
        "@type": _T + "envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }
    return unsized


def call_routes(route: dict[str, Any], server: str, eras: frozenset[str]) -> list[dict[str, Any]]:
    """The fast routes for ``server``, placed before its ordinary ``route`` (whose action they copy)."""
    routes = []
    for era in ERAS:
        if era not in eras:
            continue
        fast = copy.deepcopy(route)
        fast["name"] = f"{server} call {era}"
        fast["match"] = _match(route["match"]["path"], era)
        fast["typed_per_filter_config"] = fast_per_filter(server, era)
        # No response phase runs here, so the session stage cannot swap the upstream's
        # Mcp-Session-Id (which SDK servers repeat on every response) for the agent's
        # signed one: drop it. Clients keep the id they have when a response has none.
        fast["response_headers_to_remove"] = [MCP_SESSION_ID]
        routes.append(fast)
    return routes


__all__ = [
    "ERAS",
    "call_routes",
    "fast_per_filter",
    "modern_call_match",
    "native_mcp_filter",
    "oversized_route",
    "promised_era",
    "unsized_route",
    "without_authz",
]
