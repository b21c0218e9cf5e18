"""Envoy's HTTP authorization service (ext_authz ``http_service``): the fast route without gRPC.

Why it exists: the hop to our process is cheap, grpc-python is not; a plain HTTP/1.1
answer costs a fraction of a gRPC ``Check`` (figures in ``bench/README.md``). ``up``
and the controller's sidecars serve the fast ``tools/call`` routes this way. The
request is parsed by httptools (llhttp, the parser uvicorn uses), whose C parser does
little per call beyond what Envoy already checked.

Data flow (one HTTP/1.1 connection from Envoy at a time per protocol object; Envoy
keeps them open and sends one request after another; requests that arrive while one
is answered wait their turn)::

    Envoy ──unix socket──▶ httptools: request line = the agent's method and path, every
                           header (allowed_headers: all), the body (with_request_body)
        ──▶ decision.decide (server from the path, era from the headers: the same test
            the fast routes match on)
        ──▶ allow: 200, the headers to set upstream, x-envoy-auth-headers-to-remove,
                   the metadata as headers (server, method, tool, principal) for the log
            deny:  the denial's status (carried as 209 / 47x when it is 200 / 5xx, which Envoy
                   would read as allow / service failure: see extproc.render.wire.CARRIED_STATUS), headers, body

Envoy copies to the upstream request only the response headers that the bootstrap's
``allowed_upstream_headers`` names (:data:`extproc.render.wire.UPSTREAM_HEADERS`): ``authorization``,
``mcp-session-id`` and ``x-*`` but not ``x-envoy-*``, and ``traceparent``/``tracestate`` (set only
while tracing is on), never this response's own ``content-length``. A stage
that sets any other header on a fast-route call gets the call refused (500), never
silently forwarded without it. The answer is written here (:func:`_response`): a
status line, ``content-length`` and the headers, each name an HTTP token and each value
free of CR, LF and NUL, else the call is refused (500) and the header named.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

import httptools

from extproc import tracing
from extproc.api import Continue, Deny
from extproc.config.resources import Catalog
from extproc.core.exchange import answer_of, first_values
from extproc.core.pipeline import Pipeline
from extproc.frontdoor.decision import decide, denial_facts
from extproc.mcp.headers import TRACE_HEADERS
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.render.fast_routes import promised_era
from extproc.render.wire import CARRIED_STATUS, METADATA_HEADERS, REMOVE_HEADER, UPSTREAM_HEADERS

log = logging.getLogger("mcp_extproc.authz_http")

_UPSTREAM = re.compile(UPSTREAM_HEADERS)
_MAX_BODY: Final = 64 * 1024 * 1024
_MAX_HEAD: Final = 64 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


@dataclass
class _Request:
    """One request as Envoy sent it: the agent's method and path, its headers, the body."""

    method: str
    path: str
    pairs: tuple[tuple[str, str], ...]
    body: bytes
    keep_alive: bool


class AuthzHttpServer:
    """The HTTP authorization service on a unix socket; ``catalog`` follows reloads."""

    def __init__(self, pipeline: Pipeline, catalog: Catalog, path: str) -> None:
        self.pipeline = pipeline
        self.catalog = catalog
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on ``path`` (a stale socket file is replaced)."""
        socket_path = Path(self.path)
        if socket_path.exists() and socket_path.is_socket():
            socket_path.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), self.path)
        log.info("HTTP authorization service listening on unix %s", self.path)

    async def stop(self) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def answer(
        self, method: str, path: str, pairs: tuple[tuple[str, str], ...], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body of the answer to one authorization request.

        ``pairs``: the request's header lines, names lower-case, in order.
        """
        headers = first_values(pairs)
        ctx, outcome = await decide(
            self.pipeline,
            self.catalog,
            pairs=pairs,
            method=method,
            path=path,
            body=body,
            server_hint=None,
            # Only the fast routes call us; their headers (as the stages read them) say which one it was.
            promised_era=promised_era(headers),
            # Envoy, when it traces, puts its own span's context on this request (the agent's is gone).
            envoy_trace=headers.get("traceparent") if tracing.ACTIVE is not None else None,
        )
        if isinstance(outcome, Continue):
            unsendable = _unsendable(outcome.set_headers)
            if not unsendable:
                return 200, _allowed(outcome), b""
            outcome = Deny(
                code=INTERNAL_ERROR,
                message=f"a stage set the header(s) {', '.join(unsendable)}, which the fast tools/call route "
                "forwards only for authorization, mcp-session-id and x-* names with values free of CR, LF and NUL; "
                "the call was not forwarded",
                reason="header_not_forwardable",
            )
            log.error("[%s] %s", ctx.request_id, outcome.message)
        reply, reply_headers = answer_of(outcome, ctx.jsonrpc_id)
        out = [(k, v) for k, v in reply_headers.items()]
        out += [(k, str(v)) for k, v in denial_facts(ctx, outcome).items()]
        status = outcome.status
        carried = CARRIED_STATUS.get(status, CARRIED_STATUS[503] if status >= 500 else status)
        return carried, out, reply


def _unsendable(headers: Mapping[str, str]) -> list[str]:
    """Names of the headers Envoy would not copy upstream, or that cannot be written at all.

    The trace context headers (the gateway's own, set while it traces) are copied too: the
    rendered bootstrap allows them besides :data:`~extproc.render.wire.UPSTREAM_HEADERS`.
    """
    return sorted(
        name
        for name, value in headers.items()
        if (not _UPSTREAM.fullmatch(name) and name not in TRACE_HEADERS) or _BAD_VALUE.search(value)
    )


def _allowed(outcome: Continue) -> list[tuple[str, str]]:
    out = list(outcome.set_headers.items())
    removed = [name for name in outcome.remove_headers if name not in outcome.set_headers]
    if removed:
        out.append((REMOVE_HEADER, ",".join(removed)))
    for key in METADATA_HEADERS:
        value = outcome.metadata.get(key)
        if value is not None:
            out.append((key, value if isinstance(value, str) else json.dumps(value)))
    return out


def _response(status: int, headers: list[tuple[str, str]], body: bytes, keep_alive: bool) -> bytes:
    """The HTTP/1.1 answer; ``ValueError`` names a header that cannot be written."""
    lines = [b"HTTP/1.1 %d \r\ncontent-length: %d\r\n" % (status, len(body))]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise ValueError(name)
        lines.append(f"{name}: {value}\r\n".encode())
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


_INTERNAL_ERROR: Final = (500, [("content-type", "text/plain")], b"mcp-extproc: internal error")


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection from Envoy: requests answered one at a time, in order.

    httptools calls the ``on_*`` methods from :meth:`data_received`.
    """

    def __init__(self, service: AuthzHttpServer) -> None:
        self.service = service
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = bytearray()
        self.headers: list[tuple[str, str]] = []
        self.head_size = 0
        self.body = bytearray()
        self.pending: deque[_Request] = deque()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # The type only: a parser's message can quote a header line, and headers carry tokens.
            log.warning("HTTP authorization request refused: malformed HTTP (%s)", type(exc).__name__)
            self._close()
            return
        self._next()

    # httptools' callbacks, in the order it calls them for each request.

    def on_message_begin(self) -> None:
        self.url, self.headers, self.head_size, self.body = bytearray(), [], 0, bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value))
        self.headers.append((name.decode("latin-1").lower(), value.decode("utf-8", "replace")))

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > _MAX_BODY:
            raise ValueError("body over the limit")  # feed_data raises HttpParserCallbackError

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        path = self.url.decode("latin-1")
        request = _Request(method, path, tuple(self.headers), bytes(self.body), self.parser.should_keep_alive())
        self.pending.append(request)

    def _grow_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > _MAX_HEAD:
            raise ValueError("head over the limit")  # feed_data raises HttpParserCallbackError

    def _next(self) -> None:
        if not self.busy and self.pending and self.transport is not None:
            self.busy = True
            asyncio.get_running_loop().create_task(self._answer(self.pending.popleft()))

    async def _answer(self, request: _Request) -> None:
        try:
            status, headers, reply = await self.service.answer(
                request.method, request.path, request.pairs, request.body
            )
        except Exception:
            log.exception("HTTP authorization request failed")
            status, headers, reply = _INTERNAL_ERROR
        try:
            data = _response(status, headers, reply, request.keep_alive)
        except ValueError as exc:
            # The name only: the value may be an upstream credential.
            log.error("HTTP authorization answer has a header that cannot be written: %s", exc)
            data = _response(*_INTERNAL_ERROR, request.keep_alive)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if not request.keep_alive:
            self._close()
            return
        self.busy = False
        self._next()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
