"""Incremental, byte-preserving Server-Sent Events decoding.

MCP servers may answer with ``text/event-stream``. A stage that must rewrite
some events (say, drop a denied tool from a ``tools/list`` result) still has to
pass every other byte through unchanged, chunk by chunk, and must never buffer
a whole stream: progress notifications and long tool calls stream for minutes.

:class:`SseDecoder` splits a byte stream into events at blank lines. Each
:class:`SseEvent` keeps the exact bytes it was decoded from, so that the
concatenation of every event's :attr:`~SseEvent.raw` and the final
:meth:`SseDecoder.flush` is the input, byte for byte, however it was chunked.
Blank lines between events and comment lines (``: keepalive``) come out as
events too, with :attr:`~SseEvent.is_comment_only` set.

Parsing follows the WHATWG HTML "event stream" rules: lines end in ``\\r\\n``,
``\\n`` or ``\\r``; one space after the field colon is dropped; data lines are
joined with ``\\n``; a leading UTF-8 byte order mark is ignored; text is decoded
as UTF-8 with replacement, one complete line at a time, so a character split
across chunks decodes whole; an event with a line that was not valid UTF-8 is
marked :attr:`~SseEvent.lossy`, so that a reader that must be certain of what
it read can refuse it.

At end of stream, :meth:`SseDecoder.flush` hands back the unfinished tail as
bytes (per the rules it is never dispatched), while :meth:`SseDecoder.finish`
reads it as events, as if its blank line had come: a reader that filters what
agents see must read what a lenient client might dispatch (say, an event whose
blank line is a lone ``\\r`` at the very end, which some clients take for a
line end)::

    chunk ─▶ feed ─▶ complete events (raw bytes, data, event, id, lossy)
    end   ─▶ flush ─▶ the tail's bytes, as they are
          └▶ finish ─▶ the tail as events, terminated
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from extproc.errors import ExtProcError

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SseDecoder", "SseEvent", "SseTooLarge", "encode_event"]

DEFAULT_MAX_EVENT_BYTES: Final = 4 * 1024 * 1024
"""Largest single event :class:`SseDecoder` buffers by default (4 MiB)."""

_LINE_END: Final = re.compile(rb"[\r\n]")
_NEWLINES: Final = re.compile(r"\r\n|\r|\n")
_CR: Final = 0x0D
_LF: Final = 0x0A
_BOM: Final = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event, or a run of lines holding no event (a comment, a stray blank line).

    Attributes:
        raw: The exact bytes of the event, including its terminating blank line.
        data: The ``data`` field values joined with ``"\\n"`` (``""`` when none).
        event: The last ``event`` field value, or ``None``.
        id: The last ``id`` field value, or ``None`` (values holding NUL are ignored).
        lossy: A field line of the event was not valid UTF-8 (decoded with replacement).
    """

    raw: bytes
    data: str
    event: str | None
    id: str | None
    lossy: bool = False

    @property
    def is_comment_only(self) -> bool:
        """Whether the event carries no data, event type or id: nothing to read, pass it on as is."""
        return not self.data and self.event is None and self.id is None


class SseTooLarge(ExtProcError):
    """One event grew past the decoder's ``max_event_bytes`` before it ended."""


class SseDecoder:
    """Split an SSE byte stream, fed in arbitrary chunks, into :class:`SseEvent` values.

    Work is linear in the input: each byte is scanned once, and only the
    current, unfinished event is kept. After :class:`SseTooLarge` the decoder
    is spent; start a new one (or give up on the stream).

    Example::

        decoder = SseDecoder()
        for chunk in chunks:
            for event in decoder.feed(chunk):
                send(rewrite(event) if wanted(event) else event.raw)
        send(decoder.flush())
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        """Create a decoder.

        Args:
            max_event_bytes: Largest event (raw bytes, blank line included) to buffer.
        """
        self._max = max_event_bytes
        self._buf = bytearray()  # the unfinished event, from its first byte
        self._scan = 0  # bytes of _buf before this are split into complete lines
        self._line_start = 0
        self._at_stream_start = True
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._lossy = False

    def _reset(self) -> None:
        self._buf = bytearray()
        self._scan = self._line_start = 0
        self._at_stream_start = True
        self._data, self._event, self._id = [], None, None
        self._lossy = False

    @property
    def pending(self) -> bytes:
        """The buffered bytes of the unfinished event."""
        return bytes(self._buf)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add ``chunk`` and return the events it completes, in stream order.

        Raises:
            SseTooLarge: The unfinished event outgrew ``max_event_bytes``.
        """
        buf = self._buf
        buf += chunk
        events: list[SseEvent] = []
        start = 0  # where the unfinished event begins in buf
        while (found := _LINE_END.search(buf, self._scan)) is not None:
            i = found.start()
            if buf[i] == _CR:
                if i + 1 == len(buf):
                    self._scan = i  # a "\r" that may yet become "\r\n": wait for the next byte
                    break
                end = i + 2 if buf[i + 1] == _LF else i + 1
            else:
                end = i + 1
            if end - start > self._max:
                raise SseTooLarge(f"an SSE event grew past the {self._max}-byte limit")
            if self._take_line(buf[self._line_start : i]):
                events.append(self._dispatch(bytes(buf[start:end])))
                start = end
            self._scan = self._line_start = end
        else:
            self._scan = len(buf)
        if len(buf) - start > self._max:
            raise SseTooLarge(f"an SSE event grew past the {self._max}-byte limit")
        if start:
            del buf[:start]  # CPython drops a bytearray's head without copying the rest
            self._scan -= start
            self._line_start -= start
        return events

    def flush(self) -> bytes:
        """Return the unfinished tail and reset the decoder for a new stream.

        Call at end of stream and pass the bytes on as they are: per the SSE
        rules an event cut off before its blank line is never dispatched. (An
        event whose blank line ends in a lone ``\\r`` at the very end of the
        stream also comes back here, since the decoder was waiting for a
        possible ``\\n``.)
        """
        tail = bytes(self._buf)
        self._reset()
        return tail

    def finish(self) -> list[SseEvent]:
        """End the stream: the unfinished tail as events, as if its blank line had come; then reset.

        Each event's :attr:`~SseEvent.raw` is the tail's bytes plus the line end(s)
        that complete it, so passing it on sends a complete event. Empty when
        nothing was pending. A tail holding no field (a comment, a stray ``\\r``)
        comes back as one comment-only event.

        Raises:
            SseTooLarge: The tail outgrew ``max_event_bytes`` once terminated.
        """
        if not self._buf:
            self._reset()
            return []
        events = self.feed(b"\n")
        if self._buf:
            events += self.feed(b"\n")
        self._reset()
        return events

    def _take_line(self, line: bytes | bytearray) -> bool:
        """Apply one complete line to the current event; return whether it was blank."""
        if self._at_stream_start:
            self._at_stream_start = False
            line = line.removeprefix(_BOM)
        if not line:
            return True
        if line.startswith(b":"):
            return False
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            self._lossy = True
        name, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return False

    def _dispatch(self, raw: bytes) -> SseEvent:
        event = SseEvent(raw, "\n".join(self._data), self._event, self._id, self._lossy)
        self._data, self._event, self._id = [], None, None
        self._lossy = False
        return event


def encode_event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """Encode one event: ``event:`` and ``id:`` lines when given, a ``data:`` line per line of ``data``.

    Line breaks in ``data`` (``\\r\\n``, ``\\r`` or ``\\n``) start a new ``data:``
    line, so a decoder reads ``data`` back with ``\\n`` line breaks.

    Raises:
        ValueError: ``event`` or ``id`` holds a line break (or ``id`` a NUL),
            which would change the meaning of the stream.
    """
    lines: list[str] = []
    for field, value in (("event", event), ("id", id)):
        if value is None:
            continue
        if _NEWLINES.search(value) or (field == "id" and "\0" in value):
            raise ValueError(f"an SSE {field} may not hold a line break or NUL: {value!r}")
        lines.append(f"{field}: {value}\n")
    lines.extend(f"data: {line}\n" for line in _NEWLINES.split(data))
    lines.append("\n")
    return "".join(lines).encode("utf-8")
