"""The pins state file: per ``MCPServer``, each tool's pinned definition and the one last seen if it differs.

The ``pins`` stage writes it; ``mcp-extproc pins show`` reads it and ``pins approve`` edits it;
the running stage re-reads it when it changes. ``up`` keeps it at
``$XDG_STATE_HOME/mcp-extproc/pins.json``, next to the session key set::

    {"version": 1, "servers": {"demo": {"complete": true, "tools": {
        "echo": {"pin": {"digest": "sha256:…", "definition": {…}, "source": "first-use", "at": "…"},
                 "current": {"digest": "sha256:…", "definition": {…}, "at": "…", "changes": ["description"]},
                 "declared": null, "removed": null}}}}}

    pin       the definition approved: seen first (trust on first use) or approved since
    declared  the digest spec.pinnedTools declares (written by the stage, for `pins show`);
              it wins over ``pin``, and only the resource changes it
    current   the definition last seen, only while it differs from the pin (or there is none)
    complete  a whole listing was seen: a tool without a pin is new, not first seen

Data flow::

    read_pins(path) ◀─▶ PinsDocument (missing file: empty; malformed: ConfigError naming the file)
    with locked(path): read, change, write_pins(path, doc)   (atomic rename, mode 0600, dir 0700;
                       an flock on ``.pins.json.lock`` keeps the stage and the command from
                       losing each other's writes)
    approve(doc, server, tools) ──▶ each tool's current definition becomes its pin
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extproc.config.models import first_problem
from extproc.config.session_keys import default_key_file, write_private_json
from extproc.errors import ConfigError

__all__ = [
    "Pin",
    "PinsDocument",
    "Seen",
    "ServerPins",
    "ToolPins",
    "approve",
    "default_pins_file",
    "file_stamp",
    "locked",
    "now",
    "read_pins",
    "write_pins",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pin(_Model):
    """A pinned definition: its digest, the definition itself, how it was pinned and when."""

    digest: str
    definition: dict[str, Any] | None = None
    source: Literal["first-use", "approved"]
    at: str


class Seen(_Model):
    """A definition seen that differs from the pin: since when, and what differs."""

    digest: str
    definition: dict[str, Any]
    at: str
    changes: list[str] = Field(default_factory=list)


class ToolPins(_Model):
    """One tool of one server (see the module docstring)."""

    pin: Pin | None = None
    declared: str | None = None
    current: Seen | None = None
    removed: str | None = None

    def pinned(self, declared: str | None) -> str | None:
        """The digest in force: ``declared`` (from ``spec.pinnedTools``) if any, else the pin's."""
        if declared is not None:
            return declared
        return self.pin.digest if self.pin is not None else None

    def drift(self, declared: str | None) -> Literal["changed", "new"] | None:
        """``changed``: last seen unlike its pin; ``new``: seen, never pinned; ``None``: as pinned."""
        if self.current is None:
            return None
        pinned = self.pinned(declared)
        if pinned is None:
            return "new"
        return "changed" if self.current.digest != pinned else None


class ServerPins(_Model):
    """The tools of one ``MCPServer``."""

    complete: bool = False
    tools: dict[str, ToolPins] = Field(default_factory=dict)


class PinsDocument(_Model):
    """The whole file."""

    version: Literal[1] = 1
    servers: dict[str, ServerPins] = Field(default_factory=dict)


def default_pins_file() -> Path:
    """Where ``up`` keeps its pins: ``$XDG_STATE_HOME/mcp-extproc/pins.json`` (next to the session keys)."""
    return default_key_file().with_name("pins.json")


def now() -> str:
    """The current time as the file writes it (ISO 8601, UTC, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file: (inode, mtime in ns, size); ``None`` when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def read_pins(path: Path) -> PinsDocument:
    """The document at ``path``; an empty one when the file does not exist.

    Raises:
        ConfigError: the file cannot be read or is not a pins file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return PinsDocument()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the pins file: {exc.strerror or exc}") from None
    try:
        return PinsDocument.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{path}: not a pins file (written by the pins stage): {first_problem(exc)}") from None


def write_pins(path: Path, document: PinsDocument) -> None:
    """Write ``document`` atomically, readable by its owner only (mode 0600; a new directory 0700)."""
    write_private_json(path, document.model_dump(mode="json"))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the pins file's lock (an flock on ``.<name>.lock`` beside it) for one read-change-write."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def approve(
    document: PinsDocument, server: str, tools: Sequence[str] = ()
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Make the current definition of ``tools`` (default: every tool that drifted) their pin.

    A tool ``spec.pinnedTools`` pins is not approved here: only the resource changes its pin.

    Returns:
        (tool, digest) of the tools approved, and of the drifted tools declared in the resource.

    Raises:
        ConfigError: the server or a named tool was never seen, or a named tool is declared.
    """
    entry = document.servers.get(server)
    if entry is None:
        seen = ", ".join(sorted(document.servers)) or "none"
        raise ConfigError(f"no tools of MCP server {server!r} were ever seen (servers seen: {seen})")
    for name in tools:
        if name not in entry.tools:
            raise ConfigError(f"MCP server {server!r} never listed a tool {name!r}")
    names = list(tools) or sorted(n for n, t in entry.tools.items() if t.drift(t.declared) is not None)
    approved: list[tuple[str, str]] = []
    declared: list[tuple[str, str]] = []
    for name in names:
        tool = entry.tools[name]
        current = tool.current
        if current is None or tool.drift(tool.declared) is None:
            continue
        if tool.declared is not None:
            if tools:
                raise ConfigError(
                    f"tool {name!r} is pinned by MCPServer {server!r} spec.pinnedTools; "
                    f"to approve what it serves now, set it to {current.digest} there"
                )
            declared.append((name, current.digest))
            continue
        tool.pin = Pin(digest=current.digest, definition=current.definition, source="approved", at=now())
        tool.current = None
        approved.append((name, current.digest))
    return approved, declared
