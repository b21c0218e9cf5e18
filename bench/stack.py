"""Start and stop the processes under test: the canned upstream, our gRPC server, the front Envoys.

Every process is a :class:`tests.procs.Proc` (own process group, log file,
stopped on exit); :class:`Stack` stops them all, newest first, when its
``with`` block ends, however it ends. Every wait polls against a deadline.

Envoys bind port 0 and the harness reads the real port from the admin API (on a
unix socket per Envoy, as every rendered bootstrap has it: never a TCP port), so
nothing depends on a port staying free.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import yaml

from bench.upstream import upstream_bootstrap
from extproc.commands.envoy import envoy_binary
from extproc.config.resources import Catalog
from extproc.render.bootstrap import render_bootstrap_yaml
from extproc.render.options import BootstrapOptions, PhaseNeeds
from tests.procs import Proc, ProcessExitedError, admin_get, admin_ready

START_DEADLINE_S: Final = 30.0
_POLL_S: Final = 0.05
_VALIDATE_TIMEOUT_S: Final = 60.0
# Loopback only: never let an http_proxy setting in the environment reroute these requests.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """The harness could not set up or check what it measures."""


def http(
    url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None, timeout_s: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on loopback; returns status, headers (lower-case names) and body (error statuses included).

    Raises:
        BenchError: ``url`` is not ``http://127.0.0.1:...`` (the benchmark talks to loopback only).
    """
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"refusing to request {url!r}: the benchmark talks to http://127.0.0.1 only")
    # Scheme and host checked just above.
    request = urllib.request.Request(  # noqa: S310
        url, data=body, headers=headers or {}, method="POST" if body else "GET"
    )
    try:
        with _OPENER.open(request, timeout=timeout_s) as reply:
            return int(reply.status), _lower(reply.headers.items()), bytes(reply.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), _lower(exc.headers.items()), bytes(exc.read())


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


@dataclass(frozen=True)
class Envoy:
    """A running Envoy: its process, admin unix socket and listener port."""

    proc: Proc
    admin: Path
    port: int

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<listener port>``."""
        return f"http://127.0.0.1:{self.port}"

    def counters(self, prefix: str) -> dict[str, int]:
        """Counters and gauges whose names start with ``prefix`` (Envoy admin ``/stats``)."""
        status, body = admin_get(self.admin, "/stats?format=json&usedonly")
        if status != 200:
            raise BenchError(f"{self.proc.name}: admin /stats answered {status}")
        found: dict[str, int] = {}
        for stat in json.loads(body).get("stats", []):
            name, value = stat.get("name"), stat.get("value")
            if isinstance(name, str) and name.startswith(prefix) and isinstance(value, int):
                found[name] = value
        return found


def _deadline_passed(end: float, proc: Proc, what: str) -> None:
    if proc.popen.poll() is not None:
        raise BenchError(
            f"{proc.name} exited with status {proc.popen.returncode} {what}; log:\n{proc.output()[-3000:]}"
        )
    if time.monotonic() >= end:
        raise BenchError(
            f"{proc.name} did not become ready within {START_DEADLINE_S:.0f}s; log:\n{proc.output()[-3000:]}"
        )
    time.sleep(_POLL_S)


def _wait_envoy(proc: Proc, admin: Path) -> Envoy:
    """Poll until Envoy's admin ``/ready`` (on the unix socket ``admin``) answers 200, then read its listener's port."""
    end = time.monotonic() + START_DEADLINE_S
    while not admin_ready(admin):
        _deadline_passed(end, proc, "during startup")
    status, body = admin_get(admin, "/listeners?format=json")
    statuses: list[dict[str, Any]] = json.loads(body).get("listener_statuses", []) if status == 200 else []
    if len(statuses) != 1:
        raise BenchError(f"{proc.name}: expected one listener, admin /listeners answered {status}: {body[:500]!r}")
    port = int(statuses[0]["local_address"]["socket_address"]["port_value"])
    return Envoy(proc, admin, port)


def _wait_unix(proc: Proc, path: Path) -> None:
    """Poll until ``path`` exists and accepts a connection."""
    end = time.monotonic() + START_DEADLINE_S
    while True:
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                try:
                    sock.connect(str(path))
                    return
                except OSError:
                    pass
        _deadline_passed(end, proc, "before its socket accepted a connection")


def validate_envoy_config(path: Path) -> None:
    """``envoy --mode validate``.

    Raises:
        BenchError: Envoy rejects the file.
    """
    try:
        done = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id", "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=_VALIDATE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"envoy --mode validate {path} took longer than {_VALIDATE_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"envoy rejects {path}:\n{done.stdout}{done.stderr}")


class Stack:
    """The processes of one benchmark run, all stopped when the ``with`` block ends."""

    def __init__(self, workdir: Path, extproc_argv: list[str]) -> None:
        """Args:
        workdir: Where configs, sockets and logs go (the caller removes it).
        extproc_argv: How to run ``mcp-extproc`` (console script or ``python -m extproc``).
        """
        self.workdir = workdir
        self.extproc_argv = extproc_argv
        self.procs: list[Proc] = []

    def __enter__(self) -> Self:
        """Return self; processes start on demand."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop every process, newest first."""
        self.stop()

    def stop(self) -> None:
        """Stop every process, newest first (idempotent)."""
        while self.procs:
            self.procs.pop().stop(grace_s=3.0)

    def _start(self, argv: list[str], name: str) -> Proc:
        proc = Proc(argv, name=name, log_dir=self.workdir / "logs")
        self.procs.append(proc)
        return proc

    def admin_socket(self, name: str) -> Path:
        """Where the Envoy called ``name`` serves its admin API."""
        return self.workdir / f"{name}-admin.sock"

    def _envoy(self, name: str, config: Path) -> Envoy:
        argv = [envoy_binary(), "-c", str(config), "--use-dynamic-base-id"]
        argv += ["--log-level", "error", "--concurrency", "1"]
        return _wait_envoy(self._start(argv, name), self.admin_socket(name))

    def start_upstream(self) -> Envoy:
        """The canned upstream Envoy, its bootstrap checked with ``--mode validate`` first."""
        config = self.workdir / "upstream.yaml"
        config.write_text(yaml.safe_dump(upstream_bootstrap(str(self.admin_socket("upstream"))), sort_keys=False))
        validate_envoy_config(config)
        return self._envoy("upstream", config)

    def start_extproc(self, name: str, resources: Path, pipeline: Path | None) -> Path:
        """``mcp-extproc serve`` on a unix socket; returns the socket once it accepts.

        It also serves the HTTP authorization service at :meth:`authz_socket` of the
        returned socket, as ``up`` does for the fast tools/call routes. With
        ``pipeline=None`` the server runs no stage at all (:mod:`bench.bare`: ``serve``
        refuses a pipeline that cannot enforce the resources).
        """
        sock = self.workdir / f"{name}.sock"
        if pipeline is None:
            argv = [sys.executable, "-m", "bench.bare", "-f", str(resources), "--unix", str(sock)]
            argv += ["--authz-http", str(self.authz_socket(sock))]
        else:
            argv = [*self.extproc_argv, "serve", "-f", str(resources), "--grpc", "", "--unix", str(sock)]
            argv += ["--authz-http", str(self.authz_socket(sock))]
            argv += ["--metrics", "", "--log-level", "WARNING", "--pipeline", str(pipeline)]
            argv += ["--session-key-file", str(self.session_keys)]
        _wait_unix(self._start(argv, name), sock)
        return sock

    @property
    def session_keys(self) -> Path:
        """The key set every ``serve`` of the stack signs session ids with."""
        return self.workdir / "session-keys.json"

    @staticmethod
    def authz_socket(extproc_socket: Path) -> Path:
        """Where the server started on ``extproc_socket`` serves the HTTP authorization service."""
        return extproc_socket.with_name(extproc_socket.stem + "-authz.sock")

    def start_stage(self, name: str, address: str) -> str:
        """The benchmark's external stage (``bench.stage``) at ``address``; returns where it listens."""
        argv = [sys.executable, "-m", "bench.stage", "--address", address]
        proc = self._start(argv, name)
        try:
            return proc.wait_for_line(r"^READY (\S+)$", START_DEADLINE_S).group(1)
        except (TimeoutError, ProcessExitedError) as exc:
            raise BenchError(str(exc)) from None

    def start_front(
        self,
        name: str,
        catalog: Catalog,
        needs: PhaseNeeds,
        extproc_socket: Path,
        fast_calls: frozenset[str] = frozenset(),
    ) -> Envoy:
        """A front Envoy rendered by ``extproc.render.bootstrap`` (no ext_proc filter when ``needs`` is all False).

        ``fast_calls``: the eras whose ``tools/call`` goes to one ext_authz ``Check``
        (the ``auto`` front door); empty: everything through ext_proc.
        """
        options = BootstrapOptions(
            listen_host="127.0.0.1",
            listen_port=0,
            admin_socket=str(self.admin_socket(name)),
            extproc_tcp=None,
            extproc_unix=str(extproc_socket),
            access_log=False,
            fast_calls=fast_calls,
            authz_http_unix=str(self.authz_socket(extproc_socket)) if fast_calls else None,
        )
        config = self.workdir / f"{name}.yaml"
        config.write_text(render_bootstrap_yaml(catalog, needs, options))
        return self._envoy(name, config)
