"""The sanity check run before measuring: each configuration really does what it claims.

* every configuration passes an allowed ``tools/call`` through and returns the
  upstream's canned result with status 200;
* the default pipeline refuses a tool outside ``allowedTools`` with JSON-RPC error
  -32003 (so the pipeline is really in the path), while plain Envoy and the
  empty pipeline pass that same call through to the upstream;
* the configurations with an external stage refuse a call the benchmark's external
  stage denies (so the external stage is really called).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bench.shapes import Shape, denied_variant, external_denied_variant
from bench.stack import BenchError, http
from bench.stage import DENY_TEXT
from bench.upstream import CANNED_RESULT
from extproc.mcp.codes import POLICY_DENIED


def post(url: str, shape: Shape) -> tuple[int, Any]:
    """POST ``shape`` to ``url``; returns the status and the decoded JSON body (None if not JSON)."""
    status, body = http(url, body=shape.body_bytes, headers=dict(shape.headers))
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _what(label: str, shape: Shape) -> str:
    return f"{label}: {shape.name} tools/call of {shape.body['params']['name']!r}"


def check_passes(label: str, url: str, shape: Shape) -> None:
    """The request must come back 200 with the canned result.

    Raises:
        BenchError: naming the configuration, the request and what came back.
    """
    status, reply = post(url, shape)
    if status != 200 or reply != CANNED_RESULT:
        raise BenchError(f"{_what(label, shape)} answered {status} {reply!r}, expected 200 {CANNED_RESULT!r}")


def check_refused(label: str, url: str, shape: Shape) -> None:
    """The request must be refused with JSON-RPC error :data:`POLICY_DENIED` for the same id.

    Raises:
        BenchError: naming the configuration, the request and what came back.
    """
    status, reply = post(url, shape)
    error = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(error, dict) or error.get("code") != POLICY_DENIED or reply.get("id") != shape.body["id"]:
        raise BenchError(f"{_what(label, shape)} answered {status} {reply!r}, expected JSON-RPC error {POLICY_DENIED}")


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
