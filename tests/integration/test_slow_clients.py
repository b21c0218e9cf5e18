"""Slow clients cannot lock everyone out: a flood of half-open connections through real ``up``.

One client opens more connections than Envoy's connection limit (10,000, the rendered
default) and never finishes them: either a request line and half the headers, or not a
byte. Without timeouts these connections would hold every slot for an hour (the
connection idle timeout) and every other client would be refused. The rendered
bootstrap frees them (:mod:`extproc.render.hardening`):

- headers not complete 10 s after their first byte: 408, connection closed;
- a connection with no request, once connections are above 95 % of the limit: closed
  after one second (the overload manager's scaled idle timeout).

A well-behaved agent that retries a refused connection is then served within a bounded
time while the flood sockets are still open. Bounded: ``limit + 300`` sockets, opened in
well under a second, closed at the end of each test; the process's open-file limit is
raised to its hard limit first (the test is skipped if that is too low).
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pytest
import yaml

from extproc.render.options import BootstrapOptions
from tests.agents import modern_request, modern_session, raw_post
from tests.integration.conftest import PY_TOOLS, resource_doc, start_gateway
from tests.procs import Proc, start_pyserver

pytestmark = pytest.mark.integration

LIMIT: Final = BootstrapOptions().max_connections
FLOOD: Final = LIMIT + 300
PARTIAL: Final = b"POST /modern/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
"""A request line and part of the headers: never finished."""


@dataclass
class Flooded:
    """A running ``up`` with a 2026-07-28 upstream behind ``/modern/mcp``."""

    url: str
    host: str
    port: int


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {needed} this flood needs")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flooded]:
    # This process holds the flood; `up` (and its Envoy, which raises its own soft limit
    # to the hard one) inherit the raised limit too.
    _raise_open_files(FLOOD + 2000)
    tmp = tmp_path_factory.mktemp("slow")
    upstream, port = start_pyserver("modern", tmp / "modern.jsonl")
    procs: list[Proc] = [upstream]
    try:
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump(resource_doc("modern", port, PY_TOOLS)))
        up, base, _metrics = start_gateway(resources, tmp)
        procs.append(up)
        host, _, listen = base.removeprefix("http://").rpartition(":")
        yield Flooded(url=f"{base}/modern/mcp", host=host, port=int(listen))
    finally:
        for proc in reversed(procs):
            proc.stop()


def _flood(target: Flooded, payload: bytes) -> list[socket.socket]:
    """``FLOOD`` connections to the listener, each sent ``payload`` (maybe nothing) and held."""
    held: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            sock = socket.create_connection((target.host, target.port), timeout=5)
            held.append(sock)
            if payload:
                # Envoy may already have closed a connection past its limit.
                try:
                    sock.sendall(payload)
                except OSError:
                    continue
    except BaseException:
        _close(held)
        raise
    return held


def _close(held: list[socket.socket]) -> None:
    for sock in held:
        sock.close()


async def _served_within(target: Flooded, deadline_s: float) -> float:
    """Retry one ``tools/call`` (a refused connection is retried, as an agent would) until it succeeds."""
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "still served"}})
    start = time.monotonic()
    last: str = ""
    while time.monotonic() - start < deadline_s:
        try:
            reply = await raw_post(target.url, body, headers, timeout_s=3)
        except Exception as exc:  # connection refused or reset while the slots are held
            last = f"{type(exc).__name__}: {exc}"
        else:
            assert reply.status_code == 200, reply.text
            assert "still served" in reply.text
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise AssertionError(f"no call got through within {deadline_s}s of the flood; last error: {last}")


def _answers(held: list[socket.socket]) -> set[bytes]:
    """What Envoy sent on a sample of the flood sockets (b"" when it closed without a word)."""
    seen: set[bytes] = set()
    for sock in held[:: max(1, len(held) // 50)]:
        sock.settimeout(0.5)
        try:
            seen.add(sock.recv(12))
        except OSError:
            seen.add(b"")
    return seen


async def test_half_finished_requests_do_not_lock_out_other_agents(flooded: Flooded) -> None:
    held = _flood(flooded, PARTIAL)
    try:
        waited = await _served_within(flooded, deadline_s=25)
        assert waited < 25
        # The stalled requests were answered 408 (request headers timeout), not left open.
        assert b"HTTP/1.1 408" in _answers(held)
    finally:
        _close(held)
    # And a whole SDK session works afterwards.
    async with modern_session(flooded.url) as session:
        result = await session.call_tool("echo", {"text": "after"})
    assert not result.is_error


async def test_silent_connections_are_shed_near_the_limit(flooded: Flooded) -> None:
    held = _flood(flooded, b"")
    try:
        # The overload manager shortens the idle timeout to 1 s above 95 % of the limit
        # (refreshed every 0.25 s): far sooner than the request headers timeout.
        waited = await _served_within(flooded, deadline_s=8)
        assert waited < 8
    finally:
        _close(held)
