"""What the extension servers observed, as resource status; and the pins the status keeps. Pure.

Each extension server of a namespace (an injected sidecar, a replica of the shared one)
reports what its stages saw (:mod:`extproc.core.report`; :mod:`controller.runtime.reports`
fetches them). Data flow::

    reports (validated here: parse_report; anything malformed is left out whole)
        + an MCPServer's spec (toolPinning, pinnedTools) + its previous status.tools[]
        ──server_tools──▶ status.tools[]: per tool
            digest     the pin in force: spec.pinnedTools (source declared), else the pin
                       the status already holds, else the earliest pin an extension server
                       took on first use after a whole listing (source first-use)
            firstSeen  when it was pinned (or, for a tool never pinned, first seen)
            changed    an extension server last saw a definition unlike the pin (or the
                       tool has no pin: it appeared after pinning); current: that digest,
                       changes: what differs. Approve by writing current into spec.pinnedTools.
        + an MCPVirtualServer's spec + its previous status.backends[]
        ──virtual_backends──▶ status.backends[]: per backend, the tools it last listed and
                              the merged names it shares with another backend (conflicts)

    an MCPServer's status ──first_use_pins──▶ the pins to give every extension server as its
        pinnedTools (spec.pinnedTools wins): a new pod, or a restarted one, starts from the
        namespace's pins instead of trusting what it sees first (controller.render.view)

A tool no report mentions keeps what the status said: pins outlive every pod.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from extproc.config.models import TOOL_DIGEST_PATTERN, MCPServer, MCPVirtualServer, ToolDigest, ToolPinning

log = logging.getLogger("mcp_extproc.controller")

MAX_TOOLS: Final = 512
"""Tools per MCPServer status at most (an object in etcd is at most 1.5 MB); the rest are left out, logged."""

_DIGEST: Final = re.compile(TOOL_DIGEST_PATTERN)
_Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_Time = Annotated[str, StringConstraints(max_length=64)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ReportedTool(_Model):
    pinned: ToolDigest | None = None
    source: Literal["first-use", "approved", "declared"] | None = None
    pinned_at: _Time | None = Field(default=None, alias="pinnedAt")
    seen: ToolDigest | None = None
    seen_at: _Time | None = Field(default=None, alias="seenAt")
    changes: list[Annotated[str, StringConstraints(max_length=256)]] = Field(default_factory=list, max_length=64)


class ReportedServer(_Model):
    complete: bool = False
    tools: dict[_Name, ReportedTool] = Field(default_factory=dict)


class ReportedBackend(_Model):
    tools: int = Field(ge=0)


class ReportedVirtual(_Model):
    backends: dict[_Name, ReportedBackend] = Field(default_factory=dict)
    conflicts: dict[_Name, list[_Name]] = Field(default_factory=dict)


class _Pins(_Model):
    servers: dict[_Name, ReportedServer] = Field(default_factory=dict)


class _Virtual(_Model):
    virtual_servers: dict[_Name, ReportedVirtual] = Field(default_factory=dict, alias="virtualServers")


class _Stages(_Model):
    pins: _Pins | None = None
    virtual: _Virtual | None = None


class Report(_Model):
    """One extension server's report, as far as the controller reads it."""

    version: Literal[1]
    stages: _Stages


def parse_report(body: Any, source: str) -> Report | None:
    """``body`` as a :class:`Report`, or ``None`` (logged, naming ``source``) when it is not one."""
    try:
        return Report.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        log.warning("report of %s left out: %s at %s", source, first["msg"], ".".join(map(str, first["loc"])))
        return None


def _reported_servers(reports: Sequence[Report], name: str) -> list[ReportedServer]:
    return [s for r in reports if r.stages.pins is not None and (s := r.stages.pins.servers.get(name)) is not None]


def server_tools(
    server: MCPServer,
    declared: Mapping[str, str],
    previous: Mapping[str, Any] | None,
    reports: Sequence[Report],
    now: str,
) -> list[dict[str, Any]] | None:
    """``server``'s ``status.tools[]`` (module docstring); ``None`` under ``toolPinning: Off``.

    ``declared``: the resource's own ``spec.pinnedTools`` (the view's copy of ``server`` holds
    the status's first-use pins too).
    """
    if server.spec.tool_pinning is ToolPinning.OFF:
        return None
    before = {t["name"]: t for t in (previous or {}).get("tools") or [] if isinstance(t, dict) and "name" in t}
    reported = _reported_servers(reports, server.name)
    names = sorted(set(declared) | set(before) | {n for s in reported for n in s.tools})
    if len(names) > MAX_TOOLS:
        log.warning("MCPServer %r lists %d tools; its status keeps the first %d", server.name, len(names), MAX_TOOLS)
        names = names[:MAX_TOOLS]
    out: list[dict[str, Any]] = []
    for name in names:
        old = before.get(name) or {}
        seen = [(s.tools[name], s) for s in reported if name in s.tools]
        if name in declared:
            digest: str | None = declared[name]
            source: str | None = "declared"
        elif old.get("source") == "first-use" and old.get("digest"):
            digest, source = old["digest"], "first-use"
        else:
            taken = sorted((t.pinned_at or "", t.pinned) for t, s in seen if s.complete and t.pinned is not None)
            digest, source = (taken[0][1], "first-use") if taken else (None, None)
        entry: dict[str, Any] = {"name": name}
        if digest is not None:
            entry["digest"] = digest
            entry["source"] = source
        first = old.get("firstSeen") if old.get("digest") == digest else None
        times = sorted(t.pinned_at or t.seen_at or now for t, _ in seen)
        if first or times:
            entry["firstSeen"] = first or times[0]
        unlike = [t for t, _ in seen if t.seen is not None and t.seen != digest]
        if seen:
            entry["changed"] = bool(unlike)
            if unlike:
                latest = max(unlike, key=lambda t: t.seen_at or "")  # the definition seen last
                entry["current"] = latest.seen
                if latest.changes:
                    entry["changes"] = list(latest.changes)
        else:  # nothing new said of it: what the status said stands, against the pin in force now
            current = old.get("current")
            entry["changed"] = digest is None or (current is not None and current != digest)
            if entry["changed"] and current is not None:
                entry["current"] = current
                if old.get("changes"):
                    entry["changes"] = list(old["changes"])
        out.append(entry)
    return out


def virtual_backends(
    virtual: MCPVirtualServer, previous: Mapping[str, Any] | None, reports: Sequence[Report]
) -> list[dict[str, Any]]:
    """``virtual``'s ``status.backends[]`` (module docstring)."""
    before = {b["name"]: b for b in (previous or {}).get("backends") or [] if isinstance(b, dict) and "name" in b}
    reported = [
        v
        for r in reports
        if r.stages.virtual is not None and (v := r.stages.virtual.virtual_servers.get(virtual.name)) is not None
    ]
    out: list[dict[str, Any]] = []
    for backend in virtual.spec.servers:
        counts = [v.backends[backend.name].tools for v in reported if backend.name in v.backends]
        entry: dict[str, Any] = {"name": backend.name}
        if backend.prefix is not None:
            entry["prefix"] = backend.prefix
        if counts:
            entry["tools"] = max(counts)
            shared = sorted(
                {final for v in reported for final, owners in v.conflicts.items() if backend.name in owners}
            )
            entry["conflicts"] = shared
        else:
            old = before.get(backend.name) or {}
            for key in ("tools", "conflicts"):
                if key in old:
                    entry[key] = old[key]
        out.append(entry)
    return out


def first_use_pins(status: Mapping[str, Any] | None) -> dict[str, str]:
    """The pins ``status.tools[]`` took on first use, by tool (what every extension server starts from)."""
    pins: dict[str, str] = {}
    for tool in (status or {}).get("tools") or []:
        if isinstance(tool, dict) and tool.get("source") == "first-use":
            name, digest = tool.get("name"), tool.get("digest")
            if isinstance(name, str) and 0 < len(name) <= 256 and isinstance(digest, str) and _DIGEST.fullmatch(digest):
                pins[name] = digest
    return pins


__all__ = ["MAX_TOOLS", "Report", "first_use_pins", "parse_report", "server_tools", "virtual_backends"]
