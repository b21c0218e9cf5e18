"""``mcp-extproc pins show|approve``: review and approve tool definitions, in the pins file.

Data flow::

    pins show SERVER [-f FILE]     read_pins(FILE) ──▶ per tool: pin (digest, how, when), state
                                   (as pinned, CHANGED with what changed, NEW, removed), then a
                                   unified diff of pinned and current definition for each drift
                                   (JSON, non-ASCII characters escaped: hidden ones show)
    pins approve SERVER [TOOL…]    with locked(FILE): read ──▶ approve ──▶ write
                                   each tool's current definition becomes its pin; the running
                                   server re-reads the file within a second and lists and
                                   allows the tool again

FILE defaults to ``up``'s (``$XDG_STATE_HOME/mcp-extproc/pins.json``). A tool
``spec.pinnedTools`` pins is approved by changing the resource; ``approve`` prints the digest
to put there.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.config.pins_file import ToolPins, approve, locked, read_pins, write_pins
from extproc.errors import ConfigError


def _pretty(definition: dict[str, Any] | None) -> list[str]:
    if definition is None:
        return ["(the declared pin's definition was never seen)"]
    return json.dumps(definition, indent=2, sort_keys=True, ensure_ascii=True).splitlines()


def _state(tool: ToolPins) -> str:
    drift = tool.drift(tool.declared)
    current = tool.current
    if drift == "changed" and current is not None:
        what = ", ".join(current.changes) or "definition"
        return f"CHANGED since it was pinned ({what}), seen {current.at}: {current.digest}"
    if drift == "new" and current is not None:
        return f"NEW, never pinned, seen {current.at}: {current.digest}"
    if tool.removed is not None:
        return f"removed (not listed since {tool.removed})"
    return "as pinned"


def _pin(tool: ToolPins) -> str:
    if tool.declared is not None:
        return f"pinned {tool.declared} (spec.pinnedTools)"
    if tool.pin is not None:
        return f"pinned {tool.pin.digest} ({tool.pin.source}, {tool.pin.at})"
    return "not pinned"


def show_text(path: Path, server: str) -> str:
    """What ``pins show`` prints for ``server``, from the pins file at ``path``.

    Raises:
        ConfigError: there is no such file, it is not a pins file, or no tool of ``server`` was ever seen.
    """
    if not path.exists():
        raise ConfigError(f"{path}: no pins file (the pins stage writes it when it first sees a server's tools)")
    document = read_pins(path)
    book = document.servers.get(server)
    if book is None:
        seen = ", ".join(sorted(document.servers)) or "none"
        raise ConfigError(f"{path}: no tools of MCP server {server!r} were ever seen (servers seen: {seen})")
    lines = [f"MCP server {server!r} ({path}):"]
    width = max((len(name) for name in book.tools), default=0)
    for name, tool in sorted(book.tools.items()):
        lines.append(f"  {name.ljust(width)}  {_pin(tool)}; {_state(tool)}")
    for name, tool in sorted(book.tools.items()):
        current = tool.current
        if current is None or tool.drift(tool.declared) is None:
            continue
        pinned = tool.pin.definition if tool.pin is not None and tool.declared is None else None
        before = _pretty(pinned) if tool.drift(tool.declared) == "changed" else []
        diff = difflib.unified_diff(
            before,
            _pretty(current.definition),
            fromfile=f"{name} pinned {tool.pinned(tool.declared) or '(none)'}",
            tofile=f"{name} current {current.digest}",
            lineterm="",
        )
        lines += ["", *diff]
    drifted = [n for n, t in book.tools.items() if t.drift(t.declared) is not None]
    if drifted:
        lines += ["", f"approve with: mcp-extproc pins approve {server} {' '.join(sorted(drifted))}"]
    return "\n".join(lines) + "\n"


def approve_text(path: Path, server: str, tools: Sequence[str]) -> str:
    """Approve ``tools`` of ``server`` (default: every drifted one) in the file; what to print.

    Raises:
        ConfigError: the file, the server or a tool is not there, or a named tool is declared.
    """
    with locked(path):
        document = read_pins(path)
        try:
            approved, declared = approve(document, server, tools)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if approved:
            write_pins(path, document)
    lines = [f"approved {name}: pinned to {digest}" for name, digest in approved]
    lines += [
        f"{name} is pinned by MCPServer {server!r} spec.pinnedTools: to approve it, set it to {digest} there"
        for name, digest in declared
    ]
    if approved:
        lines.append("a running gateway lists and allows them again within a second")
    return "\n".join(lines or [f"nothing to approve on MCP server {server!r}: every tool is as pinned"]) + "\n"
