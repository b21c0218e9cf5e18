"""Process helpers for integration tests and benchmarks.

Every child runs in its own session (`start_new_session=True`), so it leads a process
group; `Proc.stop` signals the whole group, and an `atexit` hook stops whatever a crashed
or interrupted test run left behind. Readiness is always polled against a deadline,
never waited for with a fixed sleep.

Typical use::

    proc, port = start_pyserver("legacy-sse", tmp_path / "upstream.jsonl")
    try:
        ...  # talk to http://127.0.0.1:{port}/mcp
    finally:
        proc.stop()

`Proc` is also a context manager that stops the process on exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    from tests.upstreams.pyserver import Mode

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
EVERYTHING_SCRIPT: Final = REPO_ROOT / "node_modules/@modelcontextprotocol/server-everything/dist/index.js"
PLAYWRIGHT_SCRIPT: Final = REPO_ROOT / "node_modules/@playwright/mcp/cli.js"
CHROMIUM: Final = Path("/usr/bin/chromium")

DEFAULT_START_DEADLINE_S: Final = 20.0
_POLL_INTERVAL_S: Final = 0.02
_LOG_TAIL_CHARS: Final = 4000
_PORT_RACE_ATTEMPTS: Final = 3

# server-everything calls `app.listen(PORT)`, which binds every interface, and has no host
# setting. Preloaded with `node --import`, this makes a port-only listen() bind loopback.
_NODE_LOOPBACK_PRELOAD: Final = """data:text/javascript,
import net from "node:net";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const portOnly = /^[0-9]+$/.test(String(args[0])) && (args.length === 1 || typeof args[1] === "function");
  if (portOnly) args.splice(1, 0, "127.0.0.1");
  return listen.apply(this, args);
};
"""

_live: set[Proc] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL: Final = _ephemeral_range()
_FIXED_PORTS: Final = range(20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago and that port 0 never hands out.

    Prefer letting a server bind port 0 and report its port; use this only for servers
    that cannot (server-everything reads a fixed `PORT`, Envoy's listener is rendered
    before it starts). The port lies outside the kernel's ephemeral range, so a later
    bind to port 0 (our metrics server, Envoy's admin) cannot be given the same port
    while the server that was promised it is still starting. Another process may
    still take it; callers retry on "address in use".
    """
    low, high = _EPHEMERAL
    candidates = [port for port in _FIXED_PORTS if not low <= port <= high and port not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_FIXED_PORTS.start}-{_FIXED_PORTS.stop - 1} outside {low}-{high}")


def assert_envoy_accepts(config: str, path: Path) -> None:
    """Write ``config`` to ``path`` and assert the pinned Envoy's ``--mode validate`` accepts it."""
    from extproc.commands.envoy import envoy_binary

    path.write_text(config)
    checked = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK" in checked.stdout


def admin_get(admin_socket: str | Path, path: str, *, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """``GET path`` (e.g. ``/stats?format=json``) on an Envoy admin interface at ``admin_socket``.

    Every rendered bootstrap puts Envoy's admin on a unix socket (mode 0600), never on
    TCP; this is the one way tests and benchmarks read it.

    Returns:
        The status and the body.

    Raises:
        OSError: nothing answers on the socket (yet).
    """
    from extproc.commands.envoy import admin_get as envoy_admin_get

    return envoy_admin_get(admin_socket, path, timeout_s)


def admin_ready(admin_socket: str | Path) -> bool:
    """True when Envoy's admin ``/ready`` at ``admin_socket`` answers 200 (Envoy is LIVE)."""
    try:
        return admin_get(admin_socket, "/ready", timeout_s=1.0)[0] == 200
    except OSError:
        return False


def wait_for_tcp(host: str, port: int, deadline_s: float) -> None:
    """Poll until `host:port` accepts a TCP connection.

    Args:
        host: Address to connect to.
        port: TCP port.
        deadline_s: Seconds from now after which to give up.

    Raises:
        TimeoutError: Nothing accepted a connection within `deadline_s`.
    """
    deadline = time.monotonic() + deadline_s
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=_POLL_INTERVAL_S * 5):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept a connection within {deadline_s}s: {last_error}")
        time.sleep(_POLL_INTERVAL_S)


class ProcessExitedError(RuntimeError):
    """A process exited while a caller was waiting for it to become ready."""


class Proc:
    """A child process in its own process group, with stdout and stderr captured to one log file.

    Attributes:
        name: Short label used in error messages and the log file name.
        argv: The command line.
        log_path: File receiving the child's combined stdout and stderr.
        popen: The underlying `subprocess.Popen`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        """Start `argv` as a new session leader.

        Args:
            argv: Program and arguments.
            name: Short label for messages and the log file name.
            env: Complete environment for the child; None inherits this process's.
            cwd: Working directory; None means the repository root.
            log_dir: Directory for the log file; None means a fresh temporary directory.
        """
        self.name = name
        self.argv = list(argv)
        directory = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="mcp-extproc-"))
        directory.mkdir(parents=True, exist_ok=True)
        fd, raw_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=directory)
        self.log_path = Path(raw_path)
        with os.fdopen(fd, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd if cwd is not None else REPO_ROOT,
                start_new_session=True,
            )
        _live.add(self)

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    def output(self) -> str:
        """Everything the child has written to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_line(
        self, regex: str | re.Pattern[str], deadline_s: float = DEFAULT_START_DEADLINE_S
    ) -> re.Match[str]:
        """Poll the child's output until a line matches `regex`.

        Args:
            regex: Pattern searched (`re.search`) in each complete output line.
            deadline_s: Seconds from now after which to give up.

        Returns:
            The match of the first matching line.

        Raises:
            ProcessExitedError: The child exited before printing a matching line.
            TimeoutError: No matching line within `deadline_s`.
        """
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + deadline_s
        while True:
            # Read the exit status first: output written before exit is then surely in the file.
            exited = self.popen.poll() is not None
            for line in self.output().splitlines():
                if match := pattern.search(line):
                    return match
            if exited:
                raise ProcessExitedError(
                    f"{self.name} exited with status {self.popen.returncode} before printing a line "
                    f"matching {pattern.pattern!r}; output:\n{self._tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name} printed no line matching {pattern.pattern!r} within {deadline_s}s; "
                    f"output:\n{self._tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, grace_s: float = 5.0) -> int:
        """Stop the child and everything in its process group.

        Sends SIGTERM to the group, waits up to `grace_s` for the child, then SIGKILLs
        the group (which also reaches grandchildren that outlived the child).

        Returns:
            The child's exit status (negative: killed by that signal).
        """
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
        # The leader is gone; make sure nothing it started survives it.
        self._signal_group(signal.SIGKILL)
        _live.discard(self)
        return self.popen.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def _tail(self) -> str:
        return self.output()[-_LOG_TAIL_CHARS:]

    def __enter__(self) -> Self:
        """Return self; the process is already running."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the process."""
        self.stop()

    def __repr__(self) -> str:
        """Name, pid and exit status, for test failure messages."""
        return f"Proc({self.name!r}, pid={self.pid}, returncode={self.popen.returncode}, log={self.log_path})"


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_live):
        proc.stop(grace_s=1.0)


def start_pyserver(
    mode: Mode,
    record_path: Path | None = None,
    *,
    log_dir: Path | None = None,
    deadline_s: float = DEFAULT_START_DEADLINE_S,
) -> tuple[Proc, int]:
    """Start `tests.upstreams.pyserver` on a port of its choosing and wait for `READY <port>`.

    Args:
        mode: `legacy-sse`, `legacy-json` or `modern` (see `tests.upstreams.pyserver`).
        record_path: JSONL file the server appends each received HTTP request to, or None.
        log_dir: Where to keep the process log; defaults to `record_path`'s directory.
        deadline_s: Seconds to wait for readiness.

    Returns:
        The process and the port it serves `/mcp` on (127.0.0.1).
    """
    args = ["--mode", mode]
    if record_path is not None:
        args += ["--record", str(record_path)]
    if log_dir is None and record_path is not None:
        log_dir = record_path.parent
    return start_ready_server(
        "tests.upstreams.pyserver", *args, name=f"pyserver-{mode}", log_dir=log_dir, deadline_s=deadline_s
    )


def start_everything(*, log_dir: Path | None = None, deadline_s: float = DEFAULT_START_DEADLINE_S) -> tuple[Proc, int]:
    """Start `@modelcontextprotocol/server-everything` in streamableHttp mode on a free port.

    It serves Streamable HTTP (legacy era, stateful, SSE responses) at `/mcp`, bound to
    127.0.0.1 by a preload (it would otherwise bind every interface). It reads its port
    from `PORT` and cannot report a port-0 choice, so a port that looked free is retried a
    few times if another process takes it first.

    Args:
        log_dir: Where to keep the process log; None means a temporary directory.
        deadline_s: Seconds to wait for readiness on each attempt.

    Returns:
        The process and its port on 127.0.0.1.

    Raises:
        FileNotFoundError: `node` is not on PATH or `npm ci` has not been run.
    """
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is not on PATH; server-everything needs Node.js 20 or newer")
    if not EVERYTHING_SCRIPT.is_file():
        raise FileNotFoundError(f"{EVERYTHING_SCRIPT} is missing; run `npm ci` in {REPO_ROOT}")
    last_error: Exception | None = None
    for _ in range(_PORT_RACE_ATTEMPTS):
        port = free_port()
        env = {**os.environ, "PORT": str(port)}
        argv = [node, "--import", _NODE_LOOPBACK_PRELOAD, str(EVERYTHING_SCRIPT), "streamableHttp"]
        proc = Proc(argv, name="everything", env=env, log_dir=log_dir)
        try:
            proc.wait_for_line(r"listening on port \d+", deadline_s)
            wait_for_tcp("127.0.0.1", port, deadline_s)
        except ProcessExitedError as exc:
            proc.stop()
            if "EADDRINUSE" not in str(exc) and "already in use" not in str(exc):
                raise
            last_error = exc
            continue
        except BaseException:
            proc.stop()
            raise
        return proc, port
    raise RuntimeError(f"server-everything found no free port in {_PORT_RACE_ATTEMPTS} attempts: {last_error}")


def start_playwright(
    *,
    log_dir: Path,
    port: int = 0,
    chromium: Path = CHROMIUM,
    env: Mapping[str, str] | None = None,
    deadline_s: float = DEFAULT_START_DEADLINE_S,
) -> tuple[Proc, int]:
    """Start the official Playwright MCP (npm ``@playwright/mcp``) over Streamable HTTP on 127.0.0.1.

    It drives Debian's chromium (``make chromium`` installs it), headless and without the
    sandbox (tests run as root), each HTTP session in its own in-memory browser context
    (``--isolated``). ``--allowed-hosts '*'`` turns off its Host header check, which would
    refuse requests that come through Envoy (whose route rewrites ``Host``). It runs in
    ``log_dir`` and writes its snapshot files under ``log_dir/playwright-output``, never in
    the repository. Port 0 (the default) lets it choose, and its ``Listening on`` line
    says which.

    Args:
        log_dir: Working directory, output directory and process log.
        port: TCP port to listen on; 0 lets the server choose.
        chromium: The browser executable.
        env: Complete environment; None inherits this process's.
        deadline_s: Seconds to wait for it to listen.

    Returns:
        The process and its port on 127.0.0.1 (``/mcp`` is the endpoint).

    Raises:
        FileNotFoundError: ``node``, ``npm ci``'s ``@playwright/mcp`` or the browser is missing.
    """
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is not on PATH; Playwright MCP needs Node.js 20 or newer")
    if not PLAYWRIGHT_SCRIPT.is_file():
        raise FileNotFoundError(f"{PLAYWRIGHT_SCRIPT} is missing; run `npm ci` in {REPO_ROOT}")
    if not chromium.is_file():
        raise FileNotFoundError(f"{chromium} is missing; run `make chromium` (Debian's chromium package)")
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [node, str(PLAYWRIGHT_SCRIPT), "--port", str(port), "--host", "127.0.0.1", "--allowed-hosts", "*"]
    argv += ["--headless", "--browser", "chromium", "--executable-path", str(chromium), "--no-sandbox"]
    argv += ["--isolated", "--output-dir", str(log_dir / "playwright-output")]
    proc = Proc(argv, name="playwright-mcp", env=env, cwd=log_dir, log_dir=log_dir)
    try:
        bound = int(proc.wait_for_line(r"Listening on http://\S+:(\d+)", deadline_s).group(1))
        wait_for_tcp("127.0.0.1", bound, deadline_s)
    except BaseException:
        proc.stop()
        raise
    return proc, bound


def start_ready_server(
    module: str,
    *args: str,
    name: str,
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    deadline_s: float = DEFAULT_START_DEADLINE_S,
) -> tuple[Proc, int]:
    """Start `python -m <module> --port 0 <args>` and wait for its `READY <port>` line.

    Every test upstream follows this convention (`tests.upstreams.pyserver`, `oauth_server`,
    `heartbeat`, `opa_standin`; see `tests.upstreams.serving`).

    Returns:
        The process and the port it bound on 127.0.0.1.
    """
    proc = Proc([sys.executable, "-m", module, "--port", "0", *args], name=name, log_dir=log_dir, env=env)
    try:
        port = int(proc.wait_for_line(r"^READY (\d+)$", deadline_s).group(1))
    except BaseException:
        proc.stop()
        raise
    return proc, port


def start_opa_standin(module: Path, *, log_dir: Path | None = None) -> tuple[Proc, int]:
    """Start the OPA Data API stand-in (``tests.upstreams.opa_standin``) serving ``module``."""
    args = ("--module", str(module))
    return start_ready_server(
        "tests.upstreams.opa_standin", *args, name="opa-standin", log_dir=log_dir or module.parent
    )


TS_STAGE_SCRIPT: Final = REPO_ROOT / "examples/external-ts/dist/stage.js"


def start_stage(argv: Sequence[str], name: str, *, log_dir: Path | None = None) -> tuple[Proc, str]:
    """Start an external stage server that prints ``READY <address>``; return it and the address.

    Args:
        argv: the command line (e.g. ``[sys.executable, "-m", "tests.upstreams.stages", ...]``).
        name: a label for logs.
        log_dir: where to keep the process log.
    """
    proc = Proc(argv, name=name, log_dir=log_dir)
    try:
        address = proc.wait_for_line(r"^READY (\S+)$", DEFAULT_START_DEADLINE_S).group(1)
    except BaseException:
        proc.stop()
        raise
    return proc, address


def start_ts_stage(address: str, patterns: Sequence[str], *, log_dir: Path | None = None) -> tuple[Proc, str]:
    """Start the TypeScript example stage (``examples/external-ts``, built by ``make node``).

    Raises:
        FileNotFoundError: ``node`` is missing or the example is not built.
    """
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is not on PATH; the TypeScript stage needs Node.js 20 or newer")
    if not TS_STAGE_SCRIPT.is_file():
        raise FileNotFoundError(f"{TS_STAGE_SCRIPT} is missing; run `make node`")
    argv = [node, str(TS_STAGE_SCRIPT), "--address", address]
    for pattern in patterns:
        argv += ["--pattern", pattern]
    return start_stage(argv, "ts-stage", log_dir=log_dir)


def start_collector(record_path: Path, *, log_dir: Path | None = None) -> tuple[Proc, int, int]:
    """Start the OpenTelemetry collector stand-in (``tests.upstreams.otlp_collector``).

    Returns:
        The process, its OTLP/HTTP port and its OTLP/gRPC port (127.0.0.1); spans go to
        ``record_path`` (``tests.upstreams.otlp_collector.read_spans``).
    """
    args = ("--record", str(record_path))
    proc, port = start_ready_server(
        "tests.upstreams.otlp_collector", *args, name="otlp-collector", log_dir=log_dir or record_path.parent
    )
    grpc_port = int(proc.wait_for_line(r"^GRPC (\d+)$", DEFAULT_START_DEADLINE_S).group(1))
    return proc, port, grpc_port


def until_ready(ready: Callable[[], bool], proc: Proc, what: str, deadline_s: float = 30) -> None:
    """Poll ``ready`` as a startup probe would; fail with ``proc``'s output if it exits or times out."""
    end = time.monotonic() + deadline_s
    while not ready():
        if proc.popen.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"{what} never became ready; output:\n{proc.output()[-4000:]}")
        time.sleep(0.05)


def unix_connects(path: str) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
        return True
