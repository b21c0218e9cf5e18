"""``serve --report HOST:PORT``: the report the controller reads (:mod:`extproc.core.report`).

Data flow (a thread of the standard library's HTTP server per connection, so a slow
client never holds the event loop; each times out after :data:`TIMEOUT_S`)::

    GET /report, Authorization: Bearer <token>
        ──verify_token(the session key set)──▶ no or bad token: 401 (the reason logged at
                                                debug level, never the token)
        ──the report, made on the event loop (stages' state is only touched there)──▶
          200 application/json {"version": 1, "stages": {...}}
    another path: 404; another method: 405

Nothing here changes any state, and nothing in the report is a secret (tool names and
digests of their public definitions, counts); the token keeps what an agent uses from
anyone else in the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from extproc.config.session_keys import SessionKeys
from extproc.core.report import PATH, VERSION, BadReportToken, verify_token

log = logging.getLogger("mcp_extproc.report")

TIMEOUT_S: Final = 5.0


class ReportServer:
    """The report endpoint; ``port`` is the bound port after :meth:`start`."""

    def __init__(self, host: str, port: int, keys: SessionKeys, report: Callable[[], dict[str, Any]]) -> None:
        self.host, self.port = host, port
        self.keys = keys
        self.report = report
        self._http: ThreadingHTTPServer | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> int:
        """Listen, answering from a background thread; returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        handler = _handler(self, loop)
        http = ThreadingHTTPServer((self.host, self.port), handler)
        http.daemon_threads = True
        self._http = http
        self.port = int(http.server_address[1])
        threading.Thread(target=http.serve_forever, name="report", daemon=True).start()
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _handler(server: ReportServer, loop: asyncio.AbstractEventLoop) -> type[BaseHTTPRequestHandler]:
    async def made() -> dict[str, Any]:
        return {"version": VERSION, "stages": server.report()}

    class Handler(BaseHTTPRequestHandler):
        timeout = TIMEOUT_S
        server_version = "mcp-extproc"
        sys_version = ""

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != PATH:
                self._send(404, {"error": f"not found: only GET {PATH} is served here"})
                return
            scheme, _, token = (self.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                self._send(401, {"error": "a bearer token is required"}, challenge=True)
                return
            try:
                verify_token(server.keys, token.strip())
            except BadReportToken as exc:
                log.debug("report refused to %s: %s", self.client_address[0], exc.reason)
                self._send(401, {"error": "the token is not accepted"}, challenge=True)
                return
            try:
                body = asyncio.run_coroutine_threadsafe(made(), loop).result(TIMEOUT_S)
            except Exception as exc:  # the loop is gone or stuck: say so, never a traceback
                log.warning("report failed: %s", type(exc).__name__)
                self._send(503, {"error": "the report could not be made"})
                return
            self._send(200, body)

        def _refuse_method(self) -> None:
            self._send(405, {"error": f"only GET {PATH} is served here"}, allow=True)

        do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse_method

        def _send(self, status: int, body: dict[str, Any], *, challenge: bool = False, allow: bool = False) -> None:
            data = json.dumps(body, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("cache-control", "no-store")
            if challenge:
                self.send_header("www-authenticate", 'Bearer realm="mcp-extproc-report"')
            if allow:
                self.send_header("allow", "GET")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("report %s " + format, self.client_address[0], *args)

    return Handler


__all__ = ["ReportServer"]
