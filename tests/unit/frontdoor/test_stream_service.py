"""The stream service in process: offered bodies streamed once, keepalives, the body closed when Envoy goes.

A raw HTTP/1.1 client on the unix socket stands in for Envoy (the integration tests in
tests/integration/test_virtual_server.py run the real one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extproc.frontdoor.stream_service import StreamService
from extproc.streams import STREAM_HEADER, StreamOffers


async def _get(path: Path, ticket: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    extra = f"{STREAM_HEADER}: {ticket}\r\n" if ticket is not None else ""
    writer.write(f"GET /tools/mcp HTTP/1.1\r\nhost: x\r\n{extra}\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


async def _chunk(reader: asyncio.StreamReader) -> bytes:
    size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[StreamService, StreamOffers, Path]]:
    offers = StreamOffers()
    path = tmp_path / "streams.sock"
    running = StreamService(str(path), offers, keepalive_s=0.2)
    await running.start()
    assert offers.services == 1 and oct(path.stat().st_mode & 0o777) == "0o600"
    yield running, offers, path
    await running.stop()
    assert offers.services == 0 and not path.exists()


async def test_an_offered_body_is_streamed_chunk_by_chunk_and_closed_when_the_client_goes(
    service: tuple[StreamService, StreamOffers, Path],
) -> None:
    _, offers, path = service
    closed = asyncio.Event()
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"data: one\n\n"
            await release.wait()
            yield b"data: two\n\n"
            await asyncio.get_running_loop().create_future()  # open until the client goes
        finally:
            closed.set()

    ticket = offers.offer(body)
    reader, writer, head = await _get(path, ticket)
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/event-stream" in head
    assert await _chunk(reader) == b"data: one\n\n"
    release.set()
    assert await _chunk(reader) == b"data: two\n\n"
    writer.close()
    await asyncio.wait_for(closed.wait(), 5)  # the body's finally ran: listeners are detached


async def test_silence_is_filled_with_keepalive_comments_without_disturbing_the_body(
    service: tuple[StreamService, StreamOffers, Path],
) -> None:
    _, offers, path = service
    later = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        await later.wait()  # a body waiting this long must not be cancelled by a keepalive
        yield b"data: late\n\n"

    reader, writer, _ = await _get(path, offers.offer(body))
    assert await _chunk(reader) == b": keepalive\n\n"
    assert await _chunk(reader) == b": keepalive\n\n"
    later.set()
    chunks = [await _chunk(reader)]
    while chunks[-1] == b": keepalive\n\n":
        chunks.append(await _chunk(reader))
    assert chunks[-1] == b"data: late\n\n"
    assert await _chunk(reader) == b""  # the body ended: the last chunk
    writer.close()


async def test_a_ticket_works_once_and_an_unknown_or_missing_one_is_405(
    service: tuple[StreamService, StreamOffers, Path],
) -> None:
    _, offers, path = service

    async def body() -> AsyncIterator[bytes]:
        yield b"data: x\n\n"

    ticket = offers.offer(body)
    _reader, writer, head = await _get(path, ticket)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    for ticket_sent in (ticket, "made-up", None):
        _reader, writer, head = await _get(path, ticket_sent)
        assert head.startswith(b"HTTP/1.1 405"), ticket_sent  # never 404: a client would drop its session
        assert b"allow: POST, DELETE" in head
        writer.close()


def test_offers_expire_and_are_bounded() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b""

    expired = StreamOffers(ttl_s=0)
    assert expired.claim(expired.offer(body)) is None
    bounded = StreamOffers(max_offers=2)
    first = bounded.offer(body)
    second, third = bounded.offer(body), bounded.offer(body)
    assert bounded.claim(first) is None and bounded.claim(second) is body and bounded.claim(third) is body
