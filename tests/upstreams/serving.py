"""Serve an ASGI app on loopback for a test process: bind, start uvicorn, print ``READY <port>``.

Every test upstream (pyserver, heartbeat, oauth_server, opa_standin) starts the same way::

    sock = bind_loopback(port)          # port 0 = a free one; the bound port is known at once
    app = build(...)                    # may use sock.getsockname()[1] (an issuer URL, say)
    await serve_ready(sock, app, "name", **uvicorn_options)

``serve_ready`` prints ``READY <port>`` once connections are accepted (the test's
readiness signal) and returns when SIGTERM/SIGINT stops uvicorn, with status 0.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn


def bind_loopback(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:``port`` (0 picks a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def serve_ready(sock: socket.socket, app: Any, name: str, **options: Any) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM/SIGINT, printing ``READY <port>`` once started."""
    config = uvicorn.Config(app, **{"log_level": "warning", "access_log": False, **options})
    server = uvicorn.Server(config)

    def request_exit(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn swaps in its own handlers while serving and, once shut down, re-raises the
    # signal it caught against the handlers it found. Finding these (not the defaults)
    # turns that re-raise into a no-op, so SIGTERM ends the process with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_exit)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # startup failed: surface the error
            raise SystemExit(f"{name}: uvicorn exited during startup")
        await asyncio.sleep(0.01)
    sys.stdout.write(f"READY {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    await task
