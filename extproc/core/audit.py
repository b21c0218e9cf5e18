"""Audit: one structured JSON line and a set of metrics per request-side decision.

Both front doors (ext_proc and ext_authz) call :func:`record` exactly once per
exchange, when the request is allowed on to the upstream or refused::

    ctx (principal, agent, server, method, tool, explanations, start time)
        ──record(decision, reason)──▶ logger ``mcp_extproc.audit``: one JSON line
                                    ──▶ mcp_extproc_requests{method, decision}
                                        mcp_extproc_decisions{decision, reason}
                                        mcp_extproc_decision_seconds{decision}

The line never carries a token, a secret or a header value: only ids, names,
the decision, a machine reason and the human explanation stages recorded with
:meth:`extproc.api.Context.explain`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Final

from extproc.api import Answer, Context, Stop
from extproc.core.metrics import Metrics, method_label

audit = logging.getLogger("mcp_extproc.audit")

_REASON: Final = re.compile(r"^[a-z0-9_:.-]{1,64}$")
_MAX_REASONS: Final = 64


def reason_label(metrics: Metrics, reason: str) -> str:
    """A bounded label value for a denial reason (``other`` past the cap or when odd)."""
    if not reason:
        return "none"
    if not _REASON.match(reason):
        return "other"
    seen = metrics.reasons_seen
    if reason not in seen:
        if len(seen) >= _MAX_REASONS:
            return "other"
        seen.add(reason)
    return reason


def decision_of(deny: Stop) -> str:
    """``answer`` for an :class:`~extproc.api.Answer` (served directly), else ``deny``."""
    return "answer" if isinstance(deny, Answer) else "deny"


def record(metrics: Metrics, ctx: Context, decision: str, reason: str) -> None:
    """Count the decision and write its audit line."""
    elapsed = time.perf_counter() - ctx.book.started
    method = ctx.mcp.method if ctx.mcp is not None else (ctx.hints.method if ctx.hints is not None else None)
    metrics.requests.labels(method_label(method), decision).inc()
    metrics.decisions.labels(decision, reason_label(metrics, reason)).inc()
    metrics.decision_seconds.labels(decision).observe(elapsed)
    if not audit.isEnabledFor(logging.INFO):
        return
    principal = ctx.principal
    line = {
        "event": "decision",
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": ctx.request_id,
        "principal": principal.subject if principal is not None else None,
        "issuer": principal.issuer or None if principal is not None else None,
        "agent": principal.agent if principal is not None else None,
        "server": ctx.server.name if ctx.server else None,
        "virtual_server": ctx.virtual.name if ctx.virtual else None,
        "http_method": ctx.http_method,
        "method": method,
        "tool": ctx.mcp.tool_name if ctx.mcp is not None else None,
        "decision": decision,
        "reason": reason or None,
        "rule": "; ".join(ctx.book.explanations) or None,
        "latency_ms": round(elapsed * 1000, 3),
    }
    for name, value in ctx.book.audit.items():
        line.setdefault(name, value)
    audit.info(json.dumps(line, separators=(",", ":"), default=str))
