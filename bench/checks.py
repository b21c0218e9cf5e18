"""The sanity check run before measuring: each configuration really does what it claims.

* every configuration passes an allowed ``tools/call`` through and returns the
  upstream's canned result with status 200;
* the default pipeline refuses a tool outside ``allowedTools`` with JSON-RPC error
  -32003 (so the pipeline is really in the path), while plain Envoy and the
  empty pipeline pass that same call through to the upstream;
* the configurations with an external stage refuse a call the benchmark's external
  stage denies (so the external stage is really called).

The virtual server rows (:mod:`bench.virtual`) use :func:`check_passes` with the
backend that must answer (the echoing upstream names itself in a header) and
:func:`check_lists` for the exact tool names a list must hold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bench.shapes import Shape, denied_variant, external_denied_variant
from bench.stack import BenchError, http
from bench.stage import DENY_TEXT
from bench.upstream import BACKEND_HEADER, CANNED_RESULT
from extproc.mcp.codes import POLICY_DENIED


def post(url: str, shape: Shape) -> tuple[int, dict[str, str], Any]:
    """POST ``shape`` to ``url``; returns the status, the response headers and the decoded JSON body
    (None if not JSON)."""
    status, headers, body = http(url, body=shape.body_bytes, headers=dict(shape.headers))
    try:
        return status, headers, json.loads(body)
    except ValueError:
        return status, headers, None


def _what(label: str, shape: Shape) -> str:
    method = shape.body["method"]
    name = shape.body["params"].get("name")
    return f"{label}: {shape.name} {method}" + (f" of {name!r}" if name else "")


def check_passes(label: str, url: str, shape: Shape, backend: str | None = None) -> None:
    """The request must come back 200 with the canned result (and, given ``backend``, from that
    backend of the echoing upstream).

    Raises:
        BenchError: naming the configuration, the request and what came back.
    """
    status, headers, reply = post(url, shape)
    if status != 200 or reply != CANNED_RESULT:
        raise BenchError(f"{_what(label, shape)} answered {status} {reply!r}, expected 200 {CANNED_RESULT!r}")
    if backend is not None and headers.get(BACKEND_HEADER) != backend:
        raise BenchError(
            f"{_what(label, shape)} was answered by backend {headers.get(BACKEND_HEADER)!r}, expected {backend!r}"
        )


def check_refused(label: str, url: str, shape: Shape) -> None:
    """The request must be refused with JSON-RPC error :data:`POLICY_DENIED` for the same id.

    Raises:
        BenchError: naming the configuration, the request and what came back.
    """
    status, _, reply = post(url, shape)
    error = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(error, dict) or error.get("code") != POLICY_DENIED or reply.get("id") != shape.body["id"]:
        raise BenchError(f"{_what(label, shape)} answered {status} {reply!r}, expected JSON-RPC error {POLICY_DENIED}")


def check_lists(label: str, url: str, shape: Shape, names: Sequence[str]) -> None:
    """The ``tools/list`` must come back 200 with exactly the tools ``names``, in that order, for the same id.

    Raises:
        BenchError: naming the configuration, the request and what came back.
    """
    status, _, reply = post(url, shape)
    result = reply.get("result") if isinstance(reply, dict) else None
    tools = result.get("tools") if isinstance(result, dict) else None
    listed = [t.get("name") for t in tools if isinstance(t, dict)] if isinstance(tools, list) else None
    if status != 200 or listed != list(names) or reply.get("id") != shape.body["id"]:
        raise BenchError(f"{_what(label, shape)} answered {status} {reply!r}, expected the tools {list(names)!r}")


def sanity_check(
    label: str, url: str, shapes: Sequence[Shape], *, enforces_allowlist: bool, external: bool = False
) -> None:
    """Check one configuration with every shape (see the module docstring)."""
    for shape in shapes:
        if external:
            check_refused(label, url, external_denied_variant(shape, DENY_TEXT))
        check_passes(label, url, shape)
        if enforces_allowlist:
            check_refused(label, url, denied_variant(shape))
        else:
            check_passes(label, url, denied_variant(shape))
