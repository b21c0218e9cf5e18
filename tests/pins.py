"""Helpers for the tool-pinning tests: a ``pins`` stage behind ``mcp`` in the stage harness.

``Pins`` plays an agent listing and calling the tools of one server named ``demo``, with
upstream answers the test writes (``listed(...)``), and reads the audit lines and metrics
the stage wrote.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from extproc.testing import ExchangeResult, Reply, StageHarness
from plugins.pins import PinsConfig, PinsStage

LIST: Final = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
SSE: Final = {"content-type": "text/event-stream"}


def tool(name: str, description: str = "", **fields: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    return {"name": name, "description": description or f"The {name} tool.", "inputSchema": schema, **fields}


def listed(tools: list[dict[str, Any]], id_: Any = 1, **result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": {"tools": tools, **result}}


def call(name: str, id_: Any = 2) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": {}}}


def server_doc(mode: str = "Observe", pinned: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": "http://127.0.0.1:9/mcp", "allowedTools": ["*"], "toolPinning": mode}
    if pinned:
        spec["pinnedTools"] = pinned
    return {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "demo"}, "spec": spec}


def names(message: Any) -> list[str]:
    return [t["name"] for t in message["result"]["tools"]]


@dataclass
class Pins:
    """One ``pins`` stage (and its harness) for server ``demo`` in ``mode``."""

    mode: str = "Observe"
    pinned: dict[str, str] | None = None
    state_file: Path | None = None
    harness: StageHarness = field(init=False)

    def __post_init__(self) -> None:
        config = PinsConfig.model_validate(
            {"stateFile": str(self.state_file) if self.state_file else None, "checkSeconds": 0}
        )
        self.stage = PinsStage(config)
        self.harness = StageHarness(self.stage, stages_before=["mcp"], resources=[server_doc(self.mode, self.pinned)])

    async def start(self) -> Pins:
        await self.stage.startup()
        return self

    async def list(self, *answers: dict[str, Any], request: Any = None, sse: bool = False) -> Reply:
        """``tools/list`` (or ``request``), answered by the upstream with ``answers`` (one: JSON; SSE: events)."""
        result = await self.harness.post(request if request is not None else LIST)
        assert result.stop is None, result.stop
        if sse:
            events = [b"event: message\ndata: " + json.dumps(a).encode() + b"\n\n" for a in answers]
            return await result.respond(headers=SSE, chunks=events)
        body = answers[0] if len(answers) == 1 else list(answers)
        return await result.respond(body=json.dumps(body).encode())

    async def call(self, name: str) -> ExchangeResult:
        return await self.harness.post(call(name))

    def count(self, event: str) -> float:
        value = self.harness.pipeline.metrics.registry.get_sample_value("mcp_extproc_tool_pins_total", {"event": event})
        return value or 0.0


def pin_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The ``tool_pin`` audit lines written so far."""
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mcp_extproc.audit.tools"]
    return [line for line in lines if line.get("event") == "tool_pin"]


def audit_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcp_extproc.audit")
    caplog.set_level(logging.INFO, logger="mcp_extproc.pins")
