"""Envoy's HTTP authorization service (ext_authz ``http_service``): the fast route without gRPC.

Why it exists: the hop to our process is cheap, grpc-python is not. In one run on
the 2-core machine, a no-op grpc.aio ``Check`` added 0.93 ms at p50 and capped at
2,867 req/s; a no-op asyncio + h11 service behind Envoy's ``http_service``, 0.38 ms
and 4,188 req/s. ``up`` serves the fast ``tools/call`` routes this way.

Data flow (one HTTP/1.1 connection from Envoy at a time per protocol object; Envoy
keeps them open and sends one request after another)::

    Envoy ──unix socket──▶ h11: request line = the agent's method and path, every header
                           (allowed_headers: all), the body (with_request_body)
        ──▶ authz_core.decide (server from the path, era from the headers: the same test
            the fast routes match on)
        ──▶ allow: 200, the headers to set upstream, x-envoy-auth-headers-to-remove,
                   the metadata as headers (server, method, tool, principal) for the log
            deny:  the denial's status (carried as 209 / 47x when it is 200 / 5xx, which Envoy
                   would read as allow / service failure: see CARRIED_STATUS), headers, body

Envoy copies to the upstream request only the response headers that the bootstrap's
``allowed_upstream_headers`` names (:data:`UPSTREAM_HEADERS`): ``authorization`` and
``x-*`` but not ``x-envoy-*``, never this response's own ``content-length``. A stage
that sets any other header on a fast-route call gets the call refused (500), never
silently forwarded without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path
from typing import Final

import h11

from extproc.api import Continue, Deny
from extproc.authz_core import decide, denial_facts
from extproc.envoy_adapter import denial_answer
from extproc.fast_calls import promised_era
from extproc.pipeline import Pipeline
from extproc.resources import Catalog

log = logging.getLogger("mcp_extproc.authz_http")

UPSTREAM_HEADERS: Final = (
    "authorization|x-(?:[^e]|e(?:[^n]|$)|en(?:[^v]|$)|env(?:[^o]|$)|envo(?:[^y]|$)|envoy(?:[^-]|$)).*"
)
"""Response headers Envoy copies onto the upstream request (RE2, whole name)."""
METADATA_HEADERS: Final = ("server", "method", "tool", "principal", "decision")
"""Response headers Envoy turns into dynamic metadata (the access log reads them)."""
REMOVE_HEADER: Final = "x-envoy-auth-headers-to-remove"
CARRIED_STATUS: Final = {200: 209, 500: 470, 501: 471, 502: 472, 503: 473, 504: 474}
"""Denial statuses Envoy would misread, and the status that carries each instead.

To Envoy, an authorization service's 200 means "allow" and a 5xx means "the service
failed" (answered with ``status_on_error`` and no body). A denial the agent must get
with 200 (a JSON-RPC error such as -32003) or a 5xx (503: a token endpoint is down)
is therefore sent with the carrier status, and local-reply mappers in the bootstrap
(:func:`extproc.bootstrap_filters.local_replies`) turn it back, body and headers kept."""
_UPSTREAM = re.compile(UPSTREAM_HEADERS)
_MAX_BODY: Final = 64 * 1024 * 1024


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

    async def answer(self, request: h11.Request, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body of the answer to one authorization request."""
        pairs = tuple((k.decode("latin-1").lower(), v.decode("utf-8", "replace")) for k, v in request.headers)
        path = request.target.decode("latin-1")
        ctx, outcome = await decide(
            self.pipeline,
            self.catalog,
            pairs=pairs,
            method=request.method.decode("latin-1"),
            path=path,
            body=body,
            server_hint=None,
            # Only the fast routes call us; their headers say which one it was.
            promised_era=promised_era(dict(pairs)),
        )
        if isinstance(outcome, Continue):
            foreign = sorted(name for name in outcome.set_headers if not _UPSTREAM.fullmatch(name))
            if not foreign:
                return 200, _allowed(outcome), b""
            outcome = Deny(
                status=500,
                code=-32603,
                message=f"a stage set the header(s) {', '.join(foreign)}, which the fast tools/call route "
                "forwards only for authorization and x-* names; the call was not forwarded",
                reason="header_not_forwardable",
            )
            log.error("[%s] %s", ctx.request_id, outcome.message)
        reply, reply_headers = denial_answer(outcome, ctx.jsonrpc_id)
        out = [(k, v) for k, v in reply_headers.items()]
        out += [(k, str(v)) for k, v in denial_facts(ctx, outcome).items()]
        status = outcome.status
        carried = CARRIED_STATUS.get(status, CARRIED_STATUS[503] if status >= 500 else status)
        return carried, out, reply


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


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection from Envoy: requests answered one at a time, in order."""

    def __init__(self, service: AuthzHttpServer) -> None:
        self.service = service
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        self._pump()
        return None

    def _pump(self) -> None:
        while not self.busy:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                # The type only: h11's messages can quote a header line, and headers carry tokens.
                log.warning("HTTP authorization request refused: malformed HTTP (%s)", type(exc).__name__)
                self._close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > _MAX_BODY:
                    self._close()
                    return
            elif isinstance(event, h11.EndOfMessage):
                self.busy = True
                request, body = self.request, bytes(self.body)
                assert request is not None
                asyncio.get_running_loop().create_task(self._answer(request, body))
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    async def _answer(self, request: h11.Request, body: bytes) -> None:
        try:
            status, headers, reply = await self.service.answer(request, body)
        except Exception:
            log.exception("HTTP authorization request failed")
            status, headers, reply = 500, [("content-type", "text/plain")], b"mcp-extproc: internal error"
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            framing = [("content-length", str(len(reply)))]
            data = self.conn.send(h11.Response(status_code=status, headers=framing + headers))
            data += (self.conn.send(h11.Data(data=reply)) or b"") if reply else b""
            data += self.conn.send(h11.EndOfMessage()) or b""
            transport.write(data or b"")
            self.conn.start_next_cycle()
        except h11.LocalProtocolError as exc:
            # The type only: the message can quote a header we set (an upstream credential).
            log.warning("HTTP authorization answer not sent (%s)", type(exc).__name__)
            self._close()
            return
        self.busy = False
        self._pump()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
