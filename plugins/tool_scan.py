"""The ``tool-scan`` stage: flag tool definitions written to steer the model ("tool poisoning").

Not in the default pipeline; add it after ``mcp`` (e.g. after ``pins``). Data flow::

    tools/list result (JSON, SSE, batches, pages, GET replays: plugins.lib.toolgate)
        ──every entry's definition──▶ scan (plugins.lib.scan_rules): invisible or bidi
            Unicode, text addressed to the model, credential and home-directory references,
            a description past maxDescriptionChars; each finding: rule, field, offset
        flagged ──▶ audit line (once per definition) + mcp_extproc_tool_scan_findings_total{rule}
            Observe: listed as it is (read leniently, never changed)
            Enforce: hidden from the list (read failing closed)
    tools/call ──▶ the tool's last seen definition was flagged?
        Enforce ──▶ 200, JSON-RPC -32003 naming the first finding; Observe ──▶ through, explained

Findings are kept per (server, tool) for the last definition seen, in memory: after a
restart a tool is judged again when it is next listed.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from extproc.api import Context, Deny, FailureMode, StageConfig
from extproc.config.resources import MCPServer
from extproc.mcp.codes import POLICY_DENIED
from extproc.mcp.jsonrpc import Message
from plugins.lib.fingerprints import definition, fingerprint
from plugins.lib.scan_rules import DEFAULT_RULES, Finding, compile_rules, scan
from plugins.lib.toolgate import ToolGate

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("mcp_extproc.tool_scan")
audit = logging.getLogger("mcp_extproc.audit.tools")

_CACHE = 10_000
"""Definitions whose findings are remembered (per server, tool and digest: each reported once), and flagged tools."""


class ScanRuleConfig(StageConfig):
    """An operator's rule: a name and a Python regular expression."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    pattern: str
    ignore_case: bool = Field(default=False, alias="ignoreCase")


class ToolScanConfig(StageConfig):
    """Configuration of the ``tool-scan`` stage."""

    mode: Literal["Observe", "Enforce"] = Field(
        default="Observe", description="Observe: flagged tools are logged; Enforce: also hidden and refused"
    )
    rules: list[ScanRuleConfig] = Field(
        default_factory=list, description="rules added to the built-in ones (plugins/lib/scan_rules.py)"
    )
    disabled_rules: list[str] = Field(
        default_factory=list, alias="disabledRules", description="built-in or added rules not to apply, by name"
    )
    max_description_chars: int = Field(
        default=4000, gt=0, alias="maxDescriptionChars", description="a longer description is flagged"
    )
    servers: list[str] = Field(default_factory=list, description="the MCPServers to scan; empty: every one")

    @field_validator("rules")
    @classmethod
    def _compiles(cls, value: list[ScanRuleConfig]) -> list[ScanRuleConfig]:
        compile_rules([rule.model_dump(by_alias=True) for rule in value])
        return value

    @model_validator(mode="after")
    def _known(self) -> ToolScanConfig:
        names = {str(rule["name"]) for rule in DEFAULT_RULES} | {rule.name for rule in self.rules}
        unknown = sorted(set(self.disabled_rules) - names)
        if unknown:
            raise ValueError(f"disabledRules names rules that do not exist: {unknown}; the rules are {sorted(names)}")
        return self


class ToolScanStage(ToolGate[ToolScanConfig]):
    """Flag poisoned tool definitions (hidden characters, model-addressed text, secrets); Enforce hides them."""

    name: ClassVar[str] = "tool-scan"

    def __init__(self, config: ToolScanConfig, failure_mode: FailureMode = FailureMode.CLOSED) -> None:
        super().__init__(config, failure_mode)
        every = [*DEFAULT_RULES, *(rule.model_dump(by_alias=True) for rule in config.rules)]
        self.rules = compile_rules(every, config.disabled_rules)
        self._findings: OrderedDict[tuple[str, str, str], list[Finding]] = OrderedDict()  # (server, tool, digest)
        self._flagged: OrderedDict[tuple[str, str], list[Finding]] = OrderedDict()  # (server, tool) → last seen
        self._counter: Counter | None = None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self._counter = Counter(
            "mcp_extproc_tool_scan_findings",
            "Findings of the tool-scan stage in newly seen tool definitions, by rule.",
            ["rule"],
            registry=registry,
        )

    @property
    def enforce(self) -> bool:
        """True in ``Enforce`` mode."""
        return self.config.mode == "Enforce"

    def applies(self, ctx: Context, server: MCPServer) -> bool:
        return not self.config.servers or server.name in self.config.servers

    def observes_only(self, ctx: Context, server: MCPServer) -> bool:
        return not self.enforce

    def reads_streams(self, ctx: Context, server: MCPServer) -> bool:
        return self.enforce and self.applies(ctx, server)

    async def refuse_call(self, ctx: Context, server: MCPServer, message: Message) -> Deny | None:
        tool = message.tool_name or ""
        findings = self._flagged.get((server.name, tool))
        if not findings:
            return None
        first = findings[0].describe()
        ctx.explain(f"tool-scan: tool {tool!r} of MCPServer {server.name!r} was flagged: {first}")
        if not self.enforce:
            return None
        return Deny(
            status=200,
            code=POLICY_DENIED,
            message=f"tool {tool!r} on MCP server {server.name!r} was flagged by the tool scan: {first}",
            reason="tool_flagged",
            data={"findings": [f.describe() for f in findings]},
        )

    async def filter_tools(
        self, ctx: Context, server: MCPServer, tools: list[Any], result: Mapping[str, Any]
    ) -> list[Any]:
        kept = []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str):
                continue
            findings = self._scan(ctx, server, name, tool)
            if findings and self.enforce:
                ctx.log.info(
                    "tool-scan: hid tool %r of %r from tools/list: %s", name, server.name, findings[0].describe()
                )
                continue
            kept.append(tool)
        return tools if not self.enforce else kept

    def _scan(self, ctx: Context, server: MCPServer, name: str, tool: Mapping[str, Any]) -> list[Finding]:
        digest = fingerprint(tool)
        seen = (server.name, name, digest)
        findings = self._findings.get(seen)
        fresh = findings is None
        if findings is None:
            findings = scan(definition(tool), self.rules, self.config.max_description_chars)
            _remember(self._findings, seen, findings)
        key = (server.name, name)
        if fresh and findings:
            self._report(ctx, server, name, digest, findings)
        if findings:
            _remember(self._flagged, key, findings)
        else:
            self._flagged.pop(key, None)
        return findings

    def _report(self, ctx: Context, server: MCPServer, name: str, digest: str, findings: list[Finding]) -> None:
        for finding in findings:
            if self._counter is not None:
                self._counter.labels(finding.rule).inc()
        action = "hidden from tools/list and refused" if self.enforce else "logged; still listed and callable"
        shown = "; ".join(f.describe() for f in findings[:5])
        log.warning("tool-scan: tool %r on MCP server %r flagged: %s; %s", name, server.name, shown, action)
        if not audit.isEnabledFor(logging.INFO):
            return
        line = {
            "event": "tool_scan",
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": ctx.request_id,
            "server": server.name,
            "tool": name,
            "digest": digest,
            "mode": self.config.mode,
            "findings": [
                {"rule": f.rule, "field": f.field, "offset": f.offset, "excerpt": f.excerpt} for f in findings
            ],
            "action": action,
        }
        audit.info(json.dumps(line, separators=(",", ":")))


def _remember(cache: OrderedDict[Any, list[Finding]], key: Any, value: list[Finding]) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE:
        cache.popitem(last=False)
