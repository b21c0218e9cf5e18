"""The ``pins`` stage: pin every tool's definition, and catch a server that changes it under the agent.

Per ``MCPServer``, ``spec.toolPinning`` says what to do (``Off``, ``Observe`` by default,
``Enforce``) and ``spec.pinnedTools`` may declare pins up front. Data flow::

    tools/list result (JSON, SSE, batches, pages, GET replays: plugins.lib.toolgate)
        ──every entry: fingerprint (plugins.lib.fingerprints)──▶ PinBook.observe
            first sight (no declared pins, no whole listing yet) ──▶ pinned (trust on first use)
            unlike its pin, or new after pinning ──▶ audit line + mcp_extproc_tool_pins_total
                Observe: listed as it is (the answer is read leniently, never changed)
                Enforce: hidden from this list (read failing closed: what cannot be read is refused)
    tools/call ──▶ what the book last saw of the tool, from the request alone (fast route kept)
        Enforce and changed ──▶ 200, JSON-RPC -32003 "the definition of tool 'X' on MCP server
                                'Y' changed since it was pinned", until approved
        Enforce and never pinned ──▶ -32003 too (new tools need approval)
        Observe ──▶ through; the audit line's rule says it drifted

Pins and drifts persist in ``stateFile`` (``up`` sets it to its state directory);
``mcp-extproc pins show|approve`` read and edit that file and this stage re-reads it when it
changes. Without ``stateFile`` the pins live in memory and are lost on restart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from extproc.api import Context, Deny, FailureMode, StageConfig
from extproc.config.models import ToolPinning
from extproc.config.resources import Catalog, MCPServer
from extproc.mcp.codes import POLICY_DENIED
from extproc.mcp.jsonrpc import Message
from plugins.lib.fingerprints import definition, fingerprint
from plugins.lib.pinbook import Entry, Listing, PinBook, PinEvent
from plugins.lib.toolgate import ToolGate

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("mcp_extproc.pins")
audit = logging.getLogger("mcp_extproc.audit.tools")

_WARN: frozenset[str] = frozenset({"changed", "new", "removed"})


class PinsConfig(StageConfig):
    """Configuration of the ``pins`` stage."""

    state_file: str | None = Field(
        default=None,
        alias="stateFile",
        description="the pins file; up sets it to $XDG_STATE_HOME/mcp-extproc/pins.json; none: pins kept in memory",
    )
    check_seconds: float = Field(
        default=1.0,
        ge=0,
        alias="checkSeconds",
        description="how often, at most, the file is checked for approvals (mcp-extproc pins approve)",
    )


def changed_message(tool: str, server: str) -> str:
    """The JSON-RPC error message of a refused call to a tool that changed since it was pinned."""
    return f"the definition of tool {tool!r} on MCP server {server!r} changed since it was pinned"


class PinsStage(ToolGate[PinsConfig]):
    """Pin tool definitions (first use or spec.pinnedTools); flag, hide and refuse those that change."""

    name: ClassVar[str] = "pins"

    def __init__(self, config: PinsConfig, failure_mode: FailureMode = FailureMode.CLOSED) -> None:
        super().__init__(config, failure_mode)
        self.book = PinBook(None)
        self._events: Counter | None = None

    async def startup(self) -> None:
        # From the config as startup finds it: ``up`` fills stateFile in after building the stage.
        path = Path(self.config.state_file) if self.config.state_file else None
        self.book = PinBook(path, self.config.check_seconds)
        self.book.load()
        if self.book.path is None:
            log.warning(
                "pins: no stateFile: tool pins are kept in memory, lost on restart, and `mcp-extproc pins` "
                "cannot see or approve them"
            )
        else:
            log.info("pins: kept in %s", self.book.path)

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge

        self._events = Counter(
            "mcp_extproc_tool_pins",
            "Tool pin events: pinned, changed, new, removed, restored, approved, hidden (a tools/list entry).",
            ["event"],
            registry=registry,
        )
        drift = Gauge(
            "mcp_extproc_tool_pins_unapproved",
            "Tools last seen unlike their pin, or without one, awaiting approval.",
            registry=registry,
        )
        drift.set_function(lambda: float(self.book.unapproved()))

    def check(self, catalog: Catalog) -> list[str]:
        return [
            f"warning: MCPServer {name!r} declares spec.pinnedTools but spec.toolPinning is Off: they are not checked"
            for name, server in sorted(catalog.servers.items())
            if server.spec.pinned_tools and server.spec.tool_pinning is ToolPinning.OFF
        ]

    def report(self) -> dict[str, Any]:
        """Per server, each tool's pin in force and the digest it was last seen with (the
        controller writes these into ``MCPServer`` ``status.tools[]``; ``complete``: a whole
        listing was seen, so the pins taken on first use are all there are)."""
        servers: dict[str, Any] = {}
        for name, book in self.book.document.servers.items():
            tools: dict[str, Any] = {}
            for tool, pins in book.tools.items():
                pin = pins.pin if pins.pin is not None and pins.declared is None else None
                seen = pins.current.digest if pins.current is not None else pins.pinned(pins.declared)
                tools[tool] = {
                    "pinned": pins.pinned(pins.declared),
                    "source": "declared" if pins.declared is not None else (pin.source if pin else None),
                    "pinnedAt": pin.at if pin else None,
                    "seen": None if pins.removed is not None else seen,
                    "seenAt": pins.current.at if pins.current is not None else None,
                    "changes": list(pins.current.changes) if pins.current is not None else [],
                }
            servers[name] = {"complete": book.complete, "tools": tools}
        return {"servers": servers}

    # -- what the gate decides --------------------------------------------------------------

    def applies(self, ctx: Context, server: MCPServer) -> bool:
        return server.spec.tool_pinning is not ToolPinning.OFF

    def observes_only(self, ctx: Context, server: MCPServer) -> bool:
        return server.spec.tool_pinning is ToolPinning.OBSERVE

    def reads_streams(self, ctx: Context, server: MCPServer) -> bool:
        return server.spec.tool_pinning is ToolPinning.ENFORCE

    async def refuse_call(self, ctx: Context, server: MCPServer, message: Message) -> Deny | None:
        tool = message.tool_name or ""
        self._record(ctx, self.book.refresh())
        drift = self.book.drift(server.name, server.spec.pinned_tools.get(tool), tool)
        if drift is None:
            return None
        why, pinned, current = drift
        enforce = server.spec.tool_pinning is ToolPinning.ENFORCE
        if not enforce and why == "unlisted":
            return None  # nothing seen, nothing drifted: not worth an audit rule
        what = {
            "changed": f"differs from its pin {pinned}",
            "new": "appeared after pinning",
            "unlisted": "was never listed",
        }
        ctx.explain(
            f"pins: tool {tool!r} of MCPServer {server.name!r} {what[why]}"
            + ("" if enforce else "; toolPinning Observe lets it through")
        )
        if not enforce:
            return None
        if why == "changed":
            message_text, reason = changed_message(tool, server.name), "tool_definition_changed"
        elif why == "new":
            message_text = f"tool {tool!r} on MCP server {server.name!r} appeared after its tools were pinned"
            message_text, reason = message_text + "; it needs approval", "tool_not_pinned"
        else:
            message_text = f"tool {tool!r} on MCP server {server.name!r} has no pinned definition; list the tools first"
            reason = "tool_not_pinned"
        return Deny(
            status=200,
            code=POLICY_DENIED,
            message=message_text,
            reason=reason,
            data={"pinned": pinned, "current": current},
        )

    async def filter_tools(
        self, ctx: Context, server: MCPServer, tools: list[Any], result: Mapping[str, Any]
    ) -> list[Any]:
        digests: list[str | None] = []
        entries = []
        for tool in tools:
            named = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(named, str):
                digests.append(None)
                continue
            digest = fingerprint(tool)
            digests.append(digest)
            entries.append(Entry(named, digest, definition(tool)))
        ends = "nextCursor" not in result
        listing = Listing(entries, ends=ends, whole=ends and not _paged(ctx))
        self._record(ctx, self.book.observe(server.name, server.spec.pinned_tools, listing))
        if server.spec.tool_pinning is not ToolPinning.ENFORCE:
            return tools
        kept = []
        for tool, seen in zip(tools, digests, strict=True):
            if seen is None:
                continue
            listed: str = tool["name"]
            if self.book.pinned(server.name, server.spec.pinned_tools.get(listed), listed) == seen:
                kept.append(tool)
            else:
                ctx.log.info("pins: hid tool %r of %r from tools/list: unlike its pin", listed, server.name)
                self._count("hidden")
        return kept

    # -- audit and metrics ------------------------------------------------------------------

    def _count(self, event: str) -> None:
        if self._events is not None:
            self._events.labels(event).inc()

    def _record(self, ctx: Context, events: list[PinEvent]) -> None:
        for event in events:
            self._count(event.kind)
            found = ctx.catalog.servers.get(event.server) if ctx.catalog is not None else None
            _audit(ctx, event, found.spec.tool_pinning if found is not None else None)


def _paged(ctx: Context) -> bool:
    """True when a ``tools/list`` of this exchange asked a later page (``params.cursor``)."""
    request = ctx.mcp
    if request is None:
        return True  # a GET replay: which page it answers is not known
    return any(m.method == "tools/list" and (m.params or {}).get("cursor") is not None for m in request.messages)


_ACTION: Mapping[ToolPinning | None, str] = {
    ToolPinning.OBSERVE: "logged; still listed and callable",
    ToolPinning.ENFORCE: "hidden from tools/list and refused until approved",
}


def _audit(ctx: Context, event: PinEvent, mode: ToolPinning | None) -> None:
    """One ``tool_pin`` audit line (and a log line people read) for ``event``."""
    action = _ACTION.get(mode, "") if event.kind in ("changed", "new") else ""
    if event.kind in _WARN:
        what = f" ({', '.join(event.changes)})" if event.changes else ""
        log.warning(
            "pins: tool %r on MCP server %r %s%s: %s -> %s%s",
            event.tool,
            event.server,
            {"changed": "changed since it was pinned", "new": "is new since pinning", "removed": "was removed"}[
                event.kind
            ],
            what,
            event.pinned,
            event.current,
            f"; {action}" if action else "",
        )
    else:
        log.info("pins: tool %r on MCP server %r %s: %s", event.tool, event.server, event.kind, event.current)
    if not audit.isEnabledFor(logging.INFO):
        return
    line = {
        "event": "tool_pin",
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": ctx.request_id,
        "server": event.server,
        "tool": event.tool,
        "change": event.kind,
        "mode": mode.value if mode is not None else None,
        "pinned": event.pinned,
        "current": event.current,
        "changes": list(event.changes),
        "action": action or None,
    }
    audit.info(json.dumps(line, separators=(",", ":"), ensure_ascii=False))
