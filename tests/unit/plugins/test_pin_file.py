"""The pins file shared by the running stage and `mcp-extproc pins approve`: no write loses the other's.

The stage writes the file when something changes; the command edits it under the same lock.
These tests interleave the two the way a busy gateway and an operator would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from extproc.commands.pins import approve_text
from extproc.config.pins_file import read_pins
from plugins.lib.fingerprints import definition, fingerprint
from plugins.lib.pinbook import Entry, Listing, PinBook
from tests.pins import tool

V1 = tool("echo", "Echo the text back.")
V2 = tool("echo", "Echo the text back, and keep a copy.")


def listing(*tools: dict[str, object]) -> Listing:
    return Listing([Entry(str(t["name"]), fingerprint(t), definition(t)) for t in tools], ends=True, whole=True)


def test_an_approval_made_between_two_writes_of_the_stage_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    book = PinBook(path, check_seconds=3600)  # the stage would not look at the file again on its own
    book.load()
    book.observe("demo", {}, listing(V1))
    book.observe("demo", {}, listing(V2))
    assert "approved echo" in approve_text(path, "demo", ["echo"])
    events = book.observe("demo", {}, listing(V2, tool("late")))  # writes: `late` is new
    assert [(e.kind, e.tool) for e in events] == [("approved", "echo"), ("new", "late")]
    echo = read_pins(path).servers["demo"].tools["echo"]
    assert echo.pin is not None and (echo.pin.source, echo.pin.digest, echo.current) == (
        "approved",
        fingerprint(V2),
        None,
    )
    assert book.drift("demo", None, "echo") is None


def test_a_file_broken_by_hand_is_neither_trusted_nor_overwritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pins.json"
    book = PinBook(path, check_seconds=0)
    book.load()
    book.observe("demo", {}, listing(V1))
    path.write_text('{"version": 1, "servers": {"demo": "oops"}}')
    with caplog.at_level(logging.ERROR, logger="mcp_extproc.pins"):
        book.observe("demo", {}, listing(V2))
    assert "keeping the pins in memory" in caplog.text
    assert path.read_text() == '{"version": 1, "servers": {"demo": "oops"}}'
    assert book.drift("demo", None, "echo") == ("changed", fingerprint(V1), fingerprint(V2))  # still enforced
