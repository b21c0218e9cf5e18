"""The virtual server rows: a ``tools/call`` and a ``tools/list`` through an MCPVirtualServer,
each next to the same request on a backend's own route, on the same server and front Envoy.

Set-up::

    resources   MCPServer a, b ─▶ the upstream's echoing route (/echoing/a/mcp, /echoing/b/mcp:
                the Lua backends of bench.upstream, which echo the request's id);
                allowedTools echo, tool_*; the bench's policy (rule + Rego) and upstream bearer
                MCPVirtualServer virt: a (prefix a_), b (prefix b_)
    serve       the default pipeline (virtual included; its keyFile from --session-key-file)
    front       rendered by extproc.render.bootstrap, front door auto:
                /a/mcp    a's own route (a tools/call: one ext_authz Check)
                /virt/mcp the virtual server's routes (ext_proc; a routed call re-routed by
                          x-mcp-backend to a's cluster)

Groups (each measured interleaved, compared with its first case)::

    2026-07-28 tools/call          /a/mcp echo      vs /virt/mcp a_echo (sent on to a as echo)
    2026-07-28 tools/list          /a/mcp           vs /virt/mcp: a's and b's lists asked by the
                                                       gateway (2 upstream requests), merged
    2025-06-18+session tools/call  the same calls in a session: on /a/mcp a gateway-signed id
    2025-06-18+session tools/list  for a (as bench.run mints); on /virt/mcp the virtual server's
                                   own id, from an initialize through it (the gateway then opens
                                   a session on a and b; their keeper stops at the backends' 405
                                   to its GET, so it does not spin)

Before measuring, :func:`build_virtual` checks every case does what its label says: the
calls come back with the canned result from backend a (its header), b_echo from b, the
Lua backends refuse any name they do not have (so a_echo reaching a proves the prefix was
taken off); a tool outside allowedTools is refused with -32003 on both paths; the own
list holds a's allowed tools, the merged one a_ and b_ of each, in that order.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Final

from bench.checks import check_lists, check_passes, check_refused, post
from bench.run import (
    API_VERSION,
    Case,
    documents,
    mint_session_id,
    pipeline_file,
    write_resources,
)
from bench.shapes import (
    ALLOWED_TOOL,
    DENIED_TOOL,
    MODERN_VERSION,
    SESSION_SHAPE,
    Shape,
    initialize,
    modern_call,
    modern_list,
    session_call,
    session_list,
)
from bench.stack import BenchError, Envoy, Stack
from bench.upstream import BACKEND_TOOLS, echoing_url
from extproc.config.pipeline_file import DEFAULT_PIPELINE, load_pipeline_config
from extproc.core.registry import Registry

VIRTUAL: Final = "virt"
BACKENDS: Final = ("a", "b")
OWNER: Final = BACKENDS[0]
"""The backend whose tool the calls call, and whose own route is the baseline."""
ALLOWED: Final = (ALLOWED_TOOL, "tool_*")
LISTED: Final = tuple(name for name in BACKEND_TOOLS if name != DENIED_TOOL)
"""The tools a backend's list keeps once the allow-list filtered it."""
OWN: Final = f"/{OWNER}/mcp, own route"
VIA_CALL: Final = f"/{VIRTUAL}/mcp, as {OWNER}_{ALLOWED_TOOL}"
VIA_LIST: Final = f"/{VIRTUAL}/mcp, {' + '.join(BACKENDS)} merged"
NOTE: Final = (
    "virtual server rows: one server (the default pipeline), one front Envoy (front door auto);\n"
    f"+ms, % of own route: against the same request on backend {OWNER}'s own route /{OWNER}/mcp; "
    f"the merged list: the gateway asks {len(BACKENDS)} backends (one upstream request each)"
)

ShapeOf = Callable[[str], Shape]
"""A ``tools/call`` of the given tool, in one era (and session)."""


def _documents(upstream: Envoy) -> list[dict[str, Any]]:
    servers = documents({name: echoing_url(upstream.base_url, name) for name in BACKENDS}, ALLOWED)
    virtual = {
        "apiVersion": API_VERSION,
        "kind": "MCPVirtualServer",
        "metadata": {"name": VIRTUAL},
        "spec": {"servers": [{"name": name, "prefix": f"{name}_"} for name in BACKENDS]},
    }
    return [*servers, virtual]


def _start(stack: Stack, upstream: Envoy) -> Envoy:
    """The server with the default pipeline and its front Envoy (front door auto)."""
    resources = stack.workdir / "virtual-resources.yaml"
    catalog = write_resources(resources, _documents(upstream))
    path = pipeline_file(stack.workdir / "virtual.yaml", [spec.name for spec in DEFAULT_PIPELINE.stages])
    pipeline = Registry().build_pipeline(load_pipeline_config(path))
    sock = stack.start_extproc("extproc-virtual", resources, path)
    return stack.start_front("virtual", catalog, pipeline.needs, sock, pipeline.fast_call_eras)


def open_session(url: str) -> str:
    """``initialize`` through the virtual server at ``url``; returns its ``Mcp-Session-Id``.

    Raises:
        BenchError: the virtual server did not answer it as itself, with a session id.
    """
    status, headers, reply = post(url, initialize())
    result = reply.get("result") if isinstance(reply, dict) else None
    server = result.get("serverInfo", {}).get("name") if isinstance(result, dict) else None
    session = headers.get("mcp-session-id")
    if status != 200 or server != VIRTUAL or not session:
        raise BenchError(f"{url}: initialize answered {status} {reply!r} (session id {session!r})")
    return session


def _check(own: str, via: str, call: ShapeOf, virtual_call: ShapeOf, listing: Shape, virtual_listing: Shape) -> None:
    """The checks of the module docstring, for one era."""
    check_passes(OWN, own, call(ALLOWED_TOOL), OWNER)
    for name in BACKENDS:
        check_passes(f"/{VIRTUAL}/mcp, as {name}_{ALLOWED_TOOL}", via, virtual_call(f"{name}_{ALLOWED_TOOL}"), name)
    check_refused(OWN, own, call(DENIED_TOOL))
    check_refused(VIA_CALL, via, virtual_call(f"{OWNER}_{DENIED_TOOL}"))
    check_lists(OWN, own, listing, LISTED)
    check_lists(VIA_LIST, via, virtual_listing, [f"{name}_{tool}" for name in BACKENDS for tool in LISTED])


def _checked_groups(
    front: Envoy, era: str, call: ShapeOf, virtual_call: ShapeOf, listing: Shape, virtual_listing: Shape
) -> list[list[Case]]:
    """One era's call group and list group, once :func:`_check` passed."""
    own, via = f"{front.base_url}/{OWNER}/mcp", f"{front.base_url}/{VIRTUAL}/mcp"
    _check(own, via, call, virtual_call, listing, virtual_listing)
    calls, lists = f"{era} tools/call", f"{era} tools/list"
    return [
        [
            Case(calls, OWN, front, own, call(ALLOWED_TOOL), OWN),
            Case(calls, VIA_CALL, front, via, virtual_call(f"{OWNER}_{ALLOWED_TOOL}"), OWN),
        ],
        [
            Case(lists, OWN, front, own, listing, OWN),
            Case(lists, VIA_LIST, front, via, virtual_listing, OWN, upstream_per_request=len(BACKENDS)),
        ],
    ]


def build_virtual(stack: Stack, upstream: Envoy) -> list[list[Case]]:
    """Start the virtual rows' server and front Envoy, check them (module docstring); returns their groups."""
    own_session = mint_session_id(stack.session_keys, OWNER)  # creates the key set before serve reads it
    front = _start(stack, upstream)
    virtual_session = open_session(f"{front.base_url}/{VIRTUAL}/mcp")
    modern = _checked_groups(front, MODERN_VERSION, modern_call, modern_call, modern_list(), modern_list())
    legacy = _checked_groups(
        front,
        SESSION_SHAPE,
        partial(session_call, own_session),
        partial(session_call, virtual_session),
        session_list(own_session),
        session_list(virtual_session),
    )
    return [*modern, *legacy]
