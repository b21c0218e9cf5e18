"""The stream service: SSE bodies that stages make up themselves, served to Envoy on a unix socket.

Envoy routes a request here when a stage offered its answer (:mod:`extproc.streams`):
the request carries the offer's ticket in ``x-mcp-stream``. One request per connection::

    Envoy ──unix socket──▶ request head (at most 64 KiB, within 10 s; no body is read)
        ticket unknown, claimed or expired ──▶ 405 JSON-RPC error (what a server without a
                 stream answers: never 404, which a client reads as its session gone)
        else ──▶ 200 text/event-stream (chunked), every chunk the body yields;
                 a ``: keepalive`` comment after 15 s of silence (proxies and Envoy's
                 stream idle timeout see a live stream);
                 Envoy closes the connection (the agent went away) ──▶ the body is closed
                 the body ends ──▶ the last chunk, connection closed
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from extproc.mcp.spec import INVALID_REQUEST
from extproc.streams import OFFERS, STREAM_HEADER, StreamOffers, replica_tag

log = logging.getLogger("mcp_extproc.streams")

_MAX_HEAD: Final = 64 * 1024
_HEAD_TIMEOUT_S: Final = 10.0
KEEPALIVE_S: Final = 15.0
_KEEPALIVE: Final = b": keepalive\n\n"


class StreamService:
    """Serves offered bodies on ``path`` (a stale socket file is replaced)."""

    def __init__(self, path: str, offers: StreamOffers = OFFERS, keepalive_s: float = KEEPALIVE_S) -> None:
        self.path = path
        self.offers = offers
        self.keepalive_s = keepalive_s
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on ``path``."""
        socket_path = Path(self.path)
        if socket_path.exists() and socket_path.is_socket():
            socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=_MAX_HEAD)
        os.chmod(self.path, 0o600)
        self.offers.services += 1
        self.offers.tag = replica_tag(self.path)
        log.info("stream service listening on unix %s", self.path)

    async def stop(self) -> None:
        """Stop listening, end every open stream, remove the socket file."""
        if self._server is not None:
            self.offers.services -= 1
            self._server.close()
            for task in list(self._open):
                task.cancel()
            await self._server.wait_closed()
            self._server = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        try:
            ticket = await _ticket(reader)
            open_body = self.offers.claim(ticket) if ticket else None
            if open_body is None:
                writer.write(_refusal())
                await writer.drain()
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            )
            await writer.drain()
            await self._stream(reader, writer, open_body())
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._open.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: AsyncIterator[bytes]
    ) -> None:
        gone = asyncio.ensure_future(reader.read())  # b"" (or an error) when Envoy closes the connection
        step: asyncio.Future[bytes] | None = None
        try:
            while True:
                if step is None:
                    step = asyncio.ensure_future(anext(body))
                done, _ = await asyncio.wait(
                    {step, gone}, timeout=self.keepalive_s, return_when=asyncio.FIRST_COMPLETED
                )
                if gone in done:
                    return
                if step not in done:  # silence: the body is still waiting (never cancelled mid-step)
                    _chunk(writer, _KEEPALIVE)
                    await writer.drain()
                    continue
                try:
                    data = step.result()
                except StopAsyncIteration:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return
                step = None
                if data:
                    _chunk(writer, data)
                    await writer.drain()
        finally:
            gone.cancel()
            if step is not None:
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def _ticket(reader: asyncio.StreamReader) -> str | None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == STREAM_HEADER:
            return value.strip()
    return None


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n" % len(data) + data + b"\r\n")


def _refusal() -> bytes:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": INVALID_REQUEST,
                "message": "this stream is unknown or was already opened; no stream is served for it",
            },
        }
    ).encode()
    return (
        b"HTTP/1.1 405 Method Not Allowed\r\nallow: POST, DELETE\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    ) + body


__all__ = ["KEEPALIVE_S", "StreamService"]
