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
                       data rewritten; an event left as it was passes through byte for
                       byte, a changed one is re-encoded with its event name and id; an
                       incomplete trailing event is held back until it completes (or the
                       stream ends); extra messages are sent as ``message`` events at
                       the end of the stream
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from extproc.api import Context, Deny
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.mcp.sse import SseDecoder, SseEvent, encode_event

__all__ = ["ResponseRewriter", "RewriteMessage", "dumps", "refuse_compressed"]

RewriteMessage: TypeAlias = Callable[[Any], Awaitable[Any]]
"""One decoded message → the message itself (the same object) when unchanged, else its replacement."""


def dumps(value: Any) -> bytes:
    """Compact JSON, as every rewritten body is encoded."""
    return json.dumps(value, separators=(",", ":")).encode()


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


@dataclass
class ResponseRewriter:
    """The response body rewriting of one exchange; keep one per exchange (it holds the SSE decoder)."""

    decoder: SseDecoder | None = None

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
            A :class:`Deny` for a compressed body, the new bytes, or ``None``.
        """
        compressed = refuse_compressed(ctx, reader)
        if compressed is not None:
            return compressed
        if ctx.response_is_sse:
            return await self._sse_chunk(ctx, chunk, rewrite_message, extra)
        return await _json_body(chunk, rewrite_message, extra)

    async def _sse_chunk(
        self, ctx: Context, chunk: bytes, rewrite_message: RewriteMessage | None, extra: list[Any] | None
    ) -> bytes | None:
        if self.decoder is None:
            self.decoder = SseDecoder()
        out = bytearray()
        for event in self.decoder.feed(chunk):
            out += await _sse_event(event, rewrite_message)
        if ctx.end_of_stream:
            out += self.decoder.flush()
            if extra:
                for message in extra:
                    out += encode_event(json.dumps(message, separators=(",", ":")), event="message")
                extra.clear()
        return None if bytes(out) == chunk else bytes(out)


async def _sse_event(event: SseEvent, rewrite_message: RewriteMessage | None) -> bytes:
    if not event.data or rewrite_message is None:
        return event.raw
    try:
        message = json.loads(event.data)
    except ValueError:
        return event.raw
    if message is None:
        return event.raw  # ``data: null`` is no message
    new = await rewrite_message(message)
    if new is message:
        return event.raw
    return encode_event(json.dumps(new, separators=(",", ":")), event=event.event, id=event.id)


async def _json_body(body: bytes, rewrite_message: RewriteMessage | None, extra: list[Any] | None) -> bytes | None:
    try:
        decoded = json.loads(body)
    except ValueError:
        return None  # not JSON (an upstream error page): nothing of ours to rewrite
    items = decoded if isinstance(decoded, list) else [decoded]
    out = []
    changed = False
    for item in items:
        new = item if rewrite_message is None else await rewrite_message(item)
        changed |= new is not item
        out.append(new)
    if extra:
        out.extend(extra)
        changed = True
    if not changed:
        return None
    return dumps(out if isinstance(decoded, list) or extra else out[0])
