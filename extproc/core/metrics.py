"""Prometheus metrics: one registry per server process, served on ``/metrics``.

Label values are bounded: JSON-RPC methods outside the MCP vocabulary are
counted as ``other`` so an agent cannot blow up the label space.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

KNOWN_METHODS: Final = frozenset(
    {
        "initialize",
        "notifications/initialized",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "server/discover",
        "subscriptions/listen",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    }
)

_LATENCY_BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


def method_label(method: str | None) -> str:
    """A bounded label value for a JSON-RPC method."""
    if method is None:
        return "none"
    return method if method in KNOWN_METHODS else "other"


class Metrics:
    """The server's metrics, on a registry of their own (tests create many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "mcp_extproc_requests",
            "MCP requests decided, by JSON-RPC method and decision.",
            ["method", "decision"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "mcp_extproc_stage_seconds",
            "Time spent in one stage hook.",
            ["stage", "phase"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_faults = Counter(
            "mcp_extproc_stage_faults",
            "Exceptions raised by stage hooks, by stage and failure mode.",
            ["stage", "failure_mode"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "mcp_extproc_decisions",
            "Request-side decisions, by decision and reason (bounded).",
            ["decision", "reason"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "mcp_extproc_decision_seconds",
            "Time from the request headers to the decision, by decision.",
            ["decision"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reasons_seen: set[str] = set()
        self.reloads = Counter(
            "mcp_extproc_config_reloads",
            "Reloads of the resource file, by result (applied, refused: the last good one stays).",
            ["result"],
            registry=self.registry,
        )
        self._phase_children: dict[str, Any] = {}
        self.phases = Counter(
            "mcp_extproc_phases",
            "ext_proc messages received from Envoy, by phase.",
            ["phase"],
            registry=self.registry,
        )

    def phase(self, which: str) -> Any:
        """The ``mcp_extproc_phases`` counter child for ``which`` (looked up once, then reused)."""
        child = self._phase_children.get(which)
        if child is None:
            child = self._phase_children[which] = self.phases.labels(which)
        return child

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP in a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
