"""Rewrite a JSON-RPC response body one message at a time, JSON or SSE.

Stages that change responses (``allowlist`` and ``policy`` through
:mod:`plugins.lib.toolgate`, ``external``) share this machinery; each says only what
to do with one decoded message (a :data:`RewriteMessage`).

Data flow::

    response body ─▶ compressed (content-encoding) → 502, fail closed: unread is unfiltered
                 ─▶ JSON (buffered): one message or a batch, each rewritten; extra
                       messages (e.g. a batch's held errors) appended; re-encoded only
                       when something changed; a body that is not JSON passes through
                 ─▶ SSE (streamed, chunk by chunk): complete events decoded and their
                       data (a message, or a batch of them) rewritten; an event left as
                       it was passes through byte for byte, a changed one is re-encoded
                       with its event name and id; an incomplete trailing event is held
                       back until it completes (or the stream ends); extra messages are
                       sent as ``message`` events at the end of the stream

A reader that must see everything it filters (the ``tools/list`` filter) sets
:class:`FailClosed`; then nothing it cannot read with certainty is passed on::

    JSON  not strictly readable (extproc.mcp.strict_json: invalid UTF-8, a repeated key,
          NaN, an integer past the digit limit, nesting too deep), a charset other than
          UTF-8, or a message the callback finds unreadable (it raises Unreadable)
              → Deny 502, INTERNAL_ERROR "the gateway could not read the upstream's
                answer: …", one error per request of the exchange (FailClosed.refusals)
    SSE   the response headers are gone already, so a refusal is in-band: an event not
          strictly readable (or lossy UTF-8, or one the callback finds unreadable) is
          replaced by error events for the requests still unanswered (a comment when
          none is) and the rest of the stream is read on; a stream unreadable as a
          whole (charset, an event past the size limit) gets the error events once and
          every later byte is dropped
          the tail at end of stream is read as an event (SseDecoder.finish): a lenient
          client may dispatch it, so it is filtered and sent complete
    GET   (FailClosed.stream) a 2xx body is read as SSE whatever its content-type,
          as clients read it; any other is passed on unread
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from extproc.api import Context, Deny
from extproc.errors import ExtProcError
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.mcp.sse import SseDecoder, SseEvent, SseTooLarge, encode_event
from extproc.mcp.strict_json import JsonUnreadable, read_json

__all__ = [
    "UNREADABLE",
    "FailClosed",
    "ResponseRewriter",
    "RewriteMessage",
    "Unreadable",
    "dumps",
    "refuse_compressed",
]

RewriteMessage: TypeAlias = Callable[[Any], Awaitable[Any]]
"""One decoded message → the message itself (the same object) when unchanged, else its replacement."""

UNREADABLE: Final = "the gateway could not read the upstream's answer"
"""How every fail-closed refusal's message begins."""

_DROPPED: Final = b": mcp-extproc dropped an event it could not read\n\n"
_JSON_SPACE: Final = b" \t\r\n"
_UTF8: Final = frozenset({"utf-8", "utf8"})


class Unreadable(ExtProcError):
    """Raised by a :data:`RewriteMessage` of a fail-closed reader: the message cannot be read with certainty."""


@dataclass(frozen=True, slots=True)
class FailClosed:
    """Read strictly: what cannot be read with certainty is refused, never passed on.

    Attributes:
        refusals: given the refusal's message, the JSON-RPC errors that answer in place
            of what could not be read: one per request of the exchange still unanswered
            (none: an SSE event is dropped, a JSON body answered with one error).
        stream: read a 2xx body as SSE whatever its content-type (a GET stream).
    """

    refusals: Callable[[str], list[Any]]
    stream: bool = False


def dumps(value: Any) -> bytes:
    """Compact JSON, as every rewritten body is encoded."""
    return json.dumps(value, separators=(",", ":")).encode()


def _text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def refuse_compressed(ctx: Context, reader: str) -> Deny | None:
    """A 502 when the upstream compressed a body ``reader`` must read (fail closed), else ``None``."""
    encoding = ctx.response_headers.get("content-encoding", "identity").lower()
    if encoding in ("", "identity"):
        return None
    return Deny(
        status=502,
        code=INTERNAL_ERROR,
        message=f"the upstream answered with content-encoding {encoding!r}; {reader} cannot read it",
        reason="compressed_response",
    )


def _foreign_charset(ctx: Context) -> str | None:
    """Why the body's declared charset cannot be read as UTF-8, or ``None`` (none declared, or UTF-8)."""
    for param in ctx.response_headers.get("content-type", "").split(";")[1:]:
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in _UTF8:
            return f"it declares charset {charset!r}, and only UTF-8 is read"
    return None


async def _rewrite_value(value: Any, rewrite_message: RewriteMessage) -> Any:
    """A decoded message, or a batch of them, rewritten; ``value`` itself when nothing changed."""
    if not isinstance(value, list):
        return await rewrite_message(value)
    out = [await rewrite_message(item) for item in value]
    return value if all(new is old for new, old in zip(out, value, strict=True)) else out


@dataclass
class ResponseRewriter:
    """The response body rewriting of one exchange; keep one per exchange (it holds the SSE decoder).

    Attributes:
        decoder: the SSE decoder, once the first streamed chunk arrived.
        fail_closed: set by a reader that must see everything it filters (see the module docstring).
        spent: the stream could not be read at all; every later byte is dropped.
    """

    decoder: SseDecoder | None = None
    fail_closed: FailClosed | None = None
    spent: bool = False

    async def rewrite(
        self,
        ctx: Context,
        chunk: bytes,
        rewrite_message: RewriteMessage | None,
        *,
        reader: str,
        extra: list[Any] | None = None,
    ) -> Deny | bytes | None:
        """The body (or, streamed, this chunk) to send instead of ``chunk``; ``None`` when unchanged.

        Args:
            ctx: the exchange (its response headers say compressed or SSE, and end of stream).
            chunk: the whole buffered body, or the current chunk of a stream.
            rewrite_message: applied to every decoded message, in order; ``None`` to rewrite none
                (and decode no event) when there are only ``extra`` messages to add.
            reader: who cannot read a compressed body, for the 502's message.
            extra: messages to add at the end: appended to a JSON body (a single message becomes
                a batch), or sent as SSE ``message`` events at the end of the stream and then
                removed from the list.

        Returns:
            A :class:`Deny` for a compressed (or, failing closed, unreadable) body, the new
            bytes, or ``None``.
        """
        compressed = refuse_compressed(ctx, reader)
        if compressed is not None:
            return compressed
        strict = self.fail_closed
        sse = ctx.response_is_sse
        if strict is not None and strict.stream and not sse:
            if not 200 <= (ctx.response_status or 0) < 300:
                return None  # no client reads a failed GET's body as events
            sse = True
        if sse:
            return await self._sse_chunk(ctx, chunk, rewrite_message, extra, reader)
        return await self._json_body(ctx, chunk, rewrite_message, extra, reader)

    # -- JSON ---------------------------------------------------------------------------------

    async def _json_body(
        self, ctx: Context, body: bytes, rewrite_message: RewriteMessage | None, extra: list[Any] | None, reader: str
    ) -> Deny | bytes | None:
        strict = self.fail_closed
        if strict is None:
            try:
                decoded = json.loads(body)
            except ValueError:
                return None  # not JSON (an upstream error page): nothing of ours to rewrite
        elif not body.strip(_JSON_SPACE):
            return None  # nothing to read (a 202, say)
        else:
            try:
                if (why := _foreign_charset(ctx)) is not None:
                    raise JsonUnreadable(why)
                decoded = read_json(body)
            except JsonUnreadable as exc:
                return self._refuse_body(ctx, f"its body is {exc}", extra, reader)
        items = decoded if isinstance(decoded, list) else [decoded]
        out = []
        changed = False
        for item in items:
            try:
                new = item if rewrite_message is None else await rewrite_message(item)
            except Unreadable as exc:
                if strict is None:
                    raise
                return self._refuse_body(ctx, str(exc), extra, reader)
            changed |= new is not item
            out.append(new)
        if extra:
            out.extend(extra)
            changed = True
        if not changed:
            return None
        return dumps(out if isinstance(decoded, list) or extra else out[0])

    def _refuse_body(self, ctx: Context, why: str, extra: list[Any] | None, reader: str) -> Deny:
        assert self.fail_closed is not None
        message = f"{UNREADABLE}: {why}"
        ctx.log.warning("%s: refused an upstream answer it could not read: %s", reader, why)
        errors = [*self.fail_closed.refusals(message), *(extra or [])]
        if extra:
            extra.clear()
        batch = ctx.mcp is not None and ctx.mcp.is_batch
        body = dumps(errors if batch or len(errors) > 1 else errors[0]) if errors else None
        return Deny(status=502, code=INTERNAL_ERROR, message=message, reason="unreadable_response", body=body)

    # -- SSE ----------------------------------------------------------------------------------

    async def _sse_chunk(
        self, ctx: Context, chunk: bytes, rewrite_message: RewriteMessage | None, extra: list[Any] | None, reader: str
    ) -> bytes | None:
        if self.decoder is None:
            self.decoder = SseDecoder()
        strict = self.fail_closed
        out = bytearray()
        if strict is not None and not self.spent and (why := _foreign_charset(ctx)) is not None:
            out += self._spend(ctx, f"the stream {why}", reader)
        if not self.spent:
            try:
                events = self.decoder.feed(chunk)
                tail = b""
                if ctx.end_of_stream and strict is not None:
                    tail = self.decoder.pending
                    finished = self.decoder.finish()
                    if any(not event.is_comment_only for event in finished):
                        events += finished
                    else:
                        events.append(SseEvent(tail, "", None, None))
                elif ctx.end_of_stream:
                    tail = self.decoder.flush()
            except SseTooLarge as exc:
                if strict is None:
                    raise
                out += self._spend(ctx, str(exc), reader)
            else:
                for event in events:
                    out += await self._sse_event(ctx, event, rewrite_message, reader)
                if strict is None:
                    out += tail
        if ctx.end_of_stream and extra:
            for message in extra:
                out += encode_event(_text(message), event="message")
            extra.clear()
        return None if bytes(out) == chunk else bytes(out)

    async def _sse_event(
        self, ctx: Context, event: SseEvent, rewrite_message: RewriteMessage | None, reader: str
    ) -> bytes:
        if not event.data or rewrite_message is None:
            return event.raw
        strict = self.fail_closed is not None
        if event.lossy and strict:
            return self._refuse_event(ctx, "an event of its stream is not valid UTF-8", reader)
        try:
            message = read_json(event.data) if strict else json.loads(event.data)
        except JsonUnreadable as exc:
            return self._refuse_event(ctx, f"an event of its stream is {exc}", reader)
        except ValueError:
            return event.raw  # lenient: not JSON, nothing of ours to rewrite
        if message is None:
            return event.raw  # ``data: null`` is no message
        try:
            new = await _rewrite_value(message, rewrite_message)
        except Unreadable as exc:
            if not strict:
                raise
            return self._refuse_event(ctx, str(exc), reader)
        if new is message:
            return event.raw
        return encode_event(_text(new), event=event.event, id=event.id)

    def _refusal_events(self, ctx: Context, why: str, reader: str) -> bytes:
        assert self.fail_closed is not None
        message = f"{UNREADABLE}: {why}"
        ctx.log.warning("%s: refused an upstream answer it could not read: %s", reader, why)
        errors = self.fail_closed.refusals(message)
        return b"".join(encode_event(_text(error), event="message") for error in errors)

    def _refuse_event(self, ctx: Context, why: str, reader: str) -> bytes:
        return self._refusal_events(ctx, why, reader) or _DROPPED

    def _spend(self, ctx: Context, why: str, reader: str) -> bytes:
        self.spent = True
        self.decoder = SseDecoder()  # what was held back is dropped with the rest
        return self._refuse_event(ctx, why, reader)
