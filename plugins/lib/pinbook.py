"""The ``pins`` stage's book: what each tool is pinned to and what was last seen, kept in memory and on disk.

Data flow::

    a tools/list result ──Listing (name, digest, definition of every entry)──▶ PinBook.observe
        no pin, the server still unpinned (no spec.pinnedTools, no whole listing seen yet)
                                     ──▶ pinned now (trust on first use)            "pinned"
        the pin's digest             ──▶ as pinned; a drift recorded before is over "restored"
        another digest               ──▶ recorded as ``current``, with what changed "changed"
                                         (or, without a pin, "new")
        the only page, a pinned tool missing                                      "removed"
    ──▶ [PinEvent] for the audit lines and metrics; the file is written only when something changed

    a tools/call ──PinBook.drift(server, declared, tool)──▶ None | ("changed" | "new" | "unlisted", pin, current)

    every ``check_seconds`` (on use): the file changed? (``mcp-extproc pins approve``)
        ──▶ re-read; a pin approved there is an "approved" event, its tool as pinned again

Each write happens under the file's lock after re-reading a file changed meanwhile, so an
approval is never lost to the stage's own write. Without a path the book lives in memory.
A file that cannot be read or written is logged and the book carries on in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from extproc.config.pins_file import (
    Pin,
    PinsDocument,
    Seen,
    ServerPins,
    ToolPins,
    file_stamp,
    locked,
    now,
    read_pins,
    write_pins,
)
from extproc.errors import ConfigError
from plugins.lib.fingerprints import changes

log = logging.getLogger("mcp_extproc.pins")

EventKind = Literal["pinned", "changed", "new", "removed", "restored", "approved"]


@dataclass(frozen=True, slots=True)
class PinEvent:
    """Something that happened to one tool's pin."""

    kind: EventKind
    server: str
    tool: str
    pinned: str | None
    current: str | None
    changes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """One tool of a ``tools/list`` result: its name, digest and defining fields."""

    name: str
    digest: str
    definition: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Listing:
    """One ``tools/list`` result: its entries; ``ends``: no ``nextCursor``; ``whole``: the only page."""

    entries: list[Entry]
    ends: bool
    whole: bool


def apply_listing(
    document: PinsDocument, server: str, declared: Mapping[str, str], listing: Listing
) -> tuple[list[PinEvent], bool]:
    """Record ``listing`` of ``server`` in ``document``; the events, and whether ``document`` changed."""
    book = document.servers.get(server)
    fresh = book is None
    if book is None:
        book = document.servers[server] = ServerPins()
    first_use = not declared and not book.complete
    events: list[PinEvent] = []
    changed = fresh
    chosen: dict[str, Entry] = {}  # per name: the first entry unlike its pin (a list naming a tool twice)
    for entry in listing.entries:
        tool = book.tools.get(entry.name)
        pinned = tool.pinned(declared.get(entry.name)) if tool else declared.get(entry.name)
        held = chosen.get(entry.name)
        if held is None or (held.digest == pinned and entry.digest != pinned):
            chosen[entry.name] = entry
    for name, entry in chosen.items():
        tool = book.tools.get(name)
        if tool is None:
            tool = book.tools[name] = ToolPins()
            changed = True
        own = declared.get(name)
        if tool.declared != own or tool.removed is not None:
            tool.declared, tool.removed, changed = own, None, True
        pinned = tool.pinned(own)
        if pinned is None and first_use:
            tool.pin = Pin(digest=entry.digest, definition=entry.definition, source="first-use", at=now())
            tool.current, changed = None, True
            events.append(PinEvent("pinned", server, name, entry.digest, entry.digest))
        elif pinned == entry.digest:
            if tool.current is not None:
                tool.current, changed = None, True
                events.append(PinEvent("restored", server, name, pinned, entry.digest))
        elif tool.current is None or tool.current.digest != entry.digest:
            base = tool.pin.definition if tool.pin is not None and tool.pin.digest == pinned else None
            what = changes(base, entry.definition) if base is not None else []
            tool.current = Seen(digest=entry.digest, definition=entry.definition, at=now(), changes=what)
            changed = True
            kind: EventKind = "new" if pinned is None else "changed"
            events.append(PinEvent(kind, server, name, pinned, entry.digest, tuple(what)))
    if listing.whole:
        for name, tool in book.tools.items():
            if name not in chosen and tool.removed is None and tool.pinned(declared.get(name)) is not None:
                tool.removed, changed = now(), True
                events.append(PinEvent("removed", server, name, tool.pinned(declared.get(name)), None))
    if listing.ends and not book.complete:
        book.complete = changed = True
    return events, changed


def _approvals(before: PinsDocument, after: PinsDocument) -> list[PinEvent]:
    """The pins ``after`` approved that ``before`` did not have."""
    events = []
    for server, book in after.servers.items():
        old = before.servers.get(server)
        for name, tool in book.tools.items():
            was = old.tools.get(name) if old is not None else None
            pin = tool.pin
            if pin is None or pin.source != "approved" or (was is not None and was.pin == pin):
                continue
            events.append(PinEvent("approved", server, name, was.pin.digest if was and was.pin else None, pin.digest))
    return events


class PinBook:
    """Pins and drifts of every server; see the module docstring.

    Args:
        path: the pins file, or ``None`` to keep everything in memory.
        check_seconds: how often, at most, the file is checked for changes made by others.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self, path: Path | None, check_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.document = PinsDocument()
        self._check_seconds = check_seconds
        self._clock = clock
        self._checked = float("-inf")
        self._stamp: tuple[int, int, int] | None = None
        self._bad_stamp: tuple[int, int, int] | None = None

    def load(self) -> None:
        """Read the file, once, at startup.

        Raises:
            ConfigError: it exists and is not a pins file.
        """
        if self.path is not None:
            self._stamp = file_stamp(self.path)
            self.document = read_pins(self.path)

    def refresh(self) -> list[PinEvent]:
        """Re-read the file if it changed since it was last read (at most every ``check_seconds``)."""
        if self.path is None or self._clock() - self._checked < self._check_seconds:
            return []
        self._checked = self._clock()
        if file_stamp(self.path) == self._stamp:
            return []
        return self._reread()

    def _reread(self) -> list[PinEvent]:
        assert self.path is not None
        stamp = file_stamp(self.path)
        try:
            document = read_pins(self.path)
        except ConfigError as exc:
            if stamp != self._bad_stamp:
                log.error("pins: keeping the pins in memory: %s", exc)
                self._bad_stamp = stamp
            return []
        events = _approvals(self.document, document)
        self.document, self._stamp = document, stamp
        return events

    def observe(self, server: str, declared: Mapping[str, str], listing: Listing) -> list[PinEvent]:
        """Record one ``tools/list`` result of ``server`` (``declared``: its ``spec.pinnedTools``)."""
        events = self.refresh()
        found, changed = apply_listing(self.document, server, declared, listing)
        if not changed or self.path is None:
            return events + found
        try:
            with locked(self.path):
                if file_stamp(self.path) != self._stamp:  # approved meanwhile: apply to what is there now
                    events += self._reread()
                    if file_stamp(self.path) != self._stamp:
                        return events + found  # unreadable: an operator's edit is not overwritten
                    found, _ = apply_listing(self.document, server, declared, listing)
                write_pins(self.path, self.document)
                self._stamp = file_stamp(self.path)
        except OSError as exc:
            log.error("pins: cannot write %s (the pins are kept in memory): %s", self.path, exc.strerror or exc)
        return events + found

    def pinned(self, server: str, declared: str | None, tool: str) -> str | None:
        """The digest ``tool`` of ``server`` is pinned to (``declared`` wins), if any."""
        book = self.document.servers.get(server)
        entry = book.tools.get(tool) if book is not None else None
        return entry.pinned(declared) if entry is not None else declared

    def drift(
        self, server: str, declared: str | None, tool: str
    ) -> tuple[Literal["changed", "new", "unlisted"], str | None, str | None] | None:
        """Why a call of ``tool`` would not be as pinned: (why, pinned digest, last seen digest); else ``None``."""
        book = self.document.servers.get(server)
        entry = book.tools.get(tool) if book is not None else None
        if entry is None:
            return None if declared is not None else ("unlisted", None, None)
        kind = entry.drift(declared)
        if kind is None:
            return None if entry.pinned(declared) is not None else ("unlisted", None, None)
        return kind, entry.pinned(declared), entry.current.digest if entry.current is not None else None

    def unapproved(self) -> int:
        """How many tools were last seen unlike their pin, or without one (the file's ``declared``)."""
        return sum(
            1 for book in self.document.servers.values() for t in book.tools.values() if t.drift(t.declared) is not None
        )
