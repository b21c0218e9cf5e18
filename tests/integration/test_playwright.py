"""The official Playwright MCP through the gateway: the agent's browser page survives.

    agent (httpx, legacy MCP) ──▶ Envoy + mcp-extproc ──▶ Playwright MCP (npm @playwright/mcp)
                                                              └─ chromium (Debian, headless) ──▶ page server (loopback)

Playwright MCP gives every HTTP session its own browser context (``--isolated``). A session
that is lost is gone with its page: the next call is answered 404 "Session not found", and a
re-initialized session starts on ``about:blank``. Its heartbeat: once a tool call has started
the session's browser and a GET stream has been opened for the session, it pings every 3 s
on the standalone GET stream and closes the session when a ping stays unanswered for 5 s. A
ping sent while no GET stream is open is lost (there is no event store), so it times out.

Each agent here is a plain httpx client speaking the legacy era by hand: ``initialize``,
``notifications/initialized``, ``browser_navigate`` to a page served by this test on
loopback (no internet), later ``browser_snapshot``, which must show the same page.

One Playwright MCP process and one page server serve the whole module; every test has its
own sessions (and so its own browser contexts).
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.commands.envoy import envoy_binary
from tests.agents import BASE_HEADERS, response_messages
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import Proc, admin_ready, assert_envoy_accepts, free_port, start_playwright

pytestmark = pytest.mark.integration

VERSION = "2025-11-25"
IDLE_REQUEST_RESPONSE_S = 15.0  # (a): several of Playwright's 3 s pings, each answered by the keeper
IDLE_AFTER_DROP_S = 12.0  # (b): well past the 5 s ping timeout
IDLE_AFTER_TAKEOVER_S = 8.0  # (c), (d): past the next ping and its timeout
START_DEADLINE_S = 30.0
STREAM_PING_DEADLINE_S = 10.0  # a ping every 3 s once the heartbeat runs


# --- the page the browser visits: a loopback HTTP server in this process -------------------------


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        name = self.path.strip("/") or "index"
        title = html.escape(page_title(name))
        body = f"<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
        payload = body.encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test's output is the assertions'."""


def page_title(name: str) -> str:
    return f"mcp-extproc kept this page: {name}"


@dataclass
class Pages:
    base: str

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture(scope="module")
def pages() -> Iterator[Pages]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        yield Pages(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- Playwright MCP and the gateway in front of it ---------------------------------------------


@pytest.fixture(scope="module")
def playwright(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Streamable HTTP endpoint of one Playwright MCP for the module."""
    proc, port = start_playwright(log_dir=tmp_path_factory.mktemp("playwright"))
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.stop()


def mcp_server(name: str, url: str, keepalive: str = "Auto") -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": url, "allowedTools": ["browser_*"], "keepalive": keepalive},
    }


@dataclass
class Gateway:
    base: str
    metrics: str
    proc: Proc

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics, name, **labels)


@pytest.fixture(scope="module")
def gateway(playwright: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """``mcp-extproc up`` with Playwright MCP as ``pw`` (keepalive Auto) and ``pwnever`` (Never)."""
    tmp = tmp_path_factory.mktemp("playwright-gateway")
    resources = tmp / "resources.yaml"
    resources.write_text(yaml.safe_dump_all([mcp_server("pw", playwright), mcp_server("pwnever", playwright, "Never")]))
    proc, base, metrics = start_gateway(resources, tmp, "--session-key-file", str(tmp / "session-keys.json"))
    try:
        yield Gateway(base, metrics, proc)
    finally:
        proc.stop()


# --- the agent ---------------------------------------------------------------------------------


@dataclass
class Page:
    """What a Playwright tool result says about the page."""

    url: str
    title: str


class Agent:
    """A legacy-era agent driven by hand: every request explicit, nothing in the background."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.headers: dict[str, str] = {}
        self.next_id = 0
        self.initializations = 0

    async def initialize(self) -> str:
        params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "agent", "version": "0"}}
        reply = await self.request("initialize", params)
        assert reply.status_code == 200, reply.text
        session_id = reply.headers["mcp-session-id"]
        self.headers = {"mcp-session-id": session_id, "mcp-protocol-version": VERSION}
        self.initializations += 1
        note = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert note.status_code == 202, note.text
        return session_id

    async def post(self, message: dict[str, Any]) -> httpx.Response:
        return await self.client.post(self.url, content=json.dumps(message), headers={**BASE_HEADERS, **self.headers})

    async def request(self, method: str, params: dict[str, Any]) -> httpx.Response:
        self.next_id += 1
        return await self.post({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})

    async def call(self, tool: str, arguments: dict[str, Any]) -> httpx.Response:
        return await self.request("tools/call", {"name": tool, "arguments": arguments})

    async def navigate(self, url: str) -> Page:
        page = page_of(await self.call("browser_navigate", {"url": url}))
        assert page.url == url, page
        return page

    async def snapshot(self) -> httpx.Response:
        return await self.call("browser_snapshot", {})

    @asynccontextmanager
    async def get_stream(self) -> AsyncIterator[httpx.Response]:
        """The session's standalone GET stream."""
        headers = {**self.headers, "accept": "text/event-stream"}
        async with self.client.stream("GET", self.url, headers=headers) as reply:
            yield reply

    async def read_until_ping(self, stream: httpx.Response) -> list[str]:
        """Read the stream until a ping arrives (or the gateway's note that it answered one);
        return the lines read. The caller then drops the stream without answering."""
        lines: list[str] = []
        async with asyncio.timeout(STREAM_PING_DEADLINE_S):
            async for line in stream.aiter_lines():
                lines.append(line)
                if line.startswith(":") and "answered a ping" in line:
                    break
                if line.startswith("data:") and json.loads(line[5:]).get("method") == "ping":
                    break
        return lines


def page_of(reply: httpx.Response) -> Page:
    """The page a ``browser_*`` tool result describes (``- Page URL:`` / ``- Page Title:`` lines)."""
    assert reply.status_code == 200, f"HTTP {reply.status_code}: {reply.text!r}"
    messages = response_messages(reply)
    assert messages and "result" in messages[-1], messages
    result = messages[-1]["result"]
    text = "\n".join(part["text"] for part in result.get("content", []) if part.get("type") == "text")
    assert not result.get("isError"), text
    url = re.search(r"^- Page URL: (.*)$", text, re.MULTILINE)
    title = re.search(r"^- Page Title: (.*)$", text, re.MULTILINE)
    assert url is not None and title is not None, text
    return Page(url.group(1).strip(), title.group(1).strip())


def assert_same_page(reply: httpx.Response, url: str, name: str, note: str = "") -> None:
    assert reply.status_code == 200, f"the session was lost: HTTP {reply.status_code} {reply.text!r} {note}"
    page = page_of(reply)
    assert page == Page(url, page_title(name)), f"{page} {note}"  # not about:blank: the same browser context


# --- (a) and (b): one gateway, keepalive Auto and Never ----------------------------------------


async def test_a_request_response_agent_idles_and_keeps_its_page(gateway: Gateway, pages: Pages) -> None:
    """No GET stream of its own: the keeper's stream starts Playwright's heartbeat and answers it."""
    answered = gateway.metric("mcp_extproc_keeper_pings_answered_total", server="pw")
    async with httpx.AsyncClient(timeout=60) as client:
        agent = Agent(client, gateway.url("pw"))
        await agent.initialize()
        url = pages.url("request-response")
        await agent.navigate(url)
        await asyncio.sleep(IDLE_REQUEST_RESPONSE_S)
        reply = await agent.snapshot()
    assert_same_page(reply, url, "request-response")
    # The heartbeat ran (the keeper's GET started it) and the keeper answered it.
    assert gateway.metric("mcp_extproc_keeper_pings_answered_total", server="pw") >= answered + 3


async def drop_stream_at_a_ping_then_idle(gateway: Gateway, server: str, url: str) -> tuple[httpx.Response, list[str]]:
    """Initialize, navigate, open the GET stream, drop it at the first ping without answering,
    idle past Playwright's ping timeout, snapshot. Returns the snapshot's reply and the lines
    the agent's stream carried."""
    async with httpx.AsyncClient(timeout=60) as client:
        agent = Agent(client, gateway.url(server))
        await agent.initialize()
        await agent.navigate(url)  # starts the session's browser, and with it the heartbeat
        async with agent.get_stream() as stream:
            assert stream.status_code == 200, (await stream.aread()).decode(errors="replace")
            seen = await agent.read_until_ping(stream)
        print(f"{server}: the agent's GET stream carried {seen!r}")
        await asyncio.sleep(IDLE_AFTER_DROP_S)
        return await agent.snapshot(), seen


async def test_b_agent_drops_its_stream_with_a_ping_unanswered_and_keeps_its_page(
    gateway: Gateway, pages: Pages
) -> None:
    """The ping that arrived on the agent's stream is answered by the gateway, so Playwright's
    5 s ping timeout never fires, and the keeper takes the stream over when the agent's ends."""
    url = pages.url("dropped-stream")
    reply, seen = await drop_stream_at_a_ping_then_idle(gateway, "pw", url)
    assert_same_page(reply, url, "dropped-stream", f"(the agent's stream carried {seen!r})")


async def test_b_control_without_keepalive_the_session_is_lost(gateway: Gateway, pages: Pages) -> None:
    """``keepalive: Never``: nobody answers the ping the agent dropped; Playwright closes the session."""
    reply, seen = await drop_stream_at_a_ping_then_idle(gateway, "pwnever", pages.url("never"))
    print(f"pwnever: after the idle: HTTP {reply.status_code} {reply.headers.get('content-type')} {reply.text!r}")
    assert reply.status_code == 404, f"{reply.status_code} {reply.text!r} (the agent's stream carried {seen!r})"
    assert "Session not found" in reply.text


# --- (c): `up` restarted between two calls -----------------------------------------------------


def start_up(resources: Path, log_dir: Path, port: int, key_file: Path) -> tuple[Proc, str]:
    """``mcp-extproc up`` on ``port`` (fixed: a restart keeps the agents' URL); its metrics URL."""
    argv = [sys.executable, "-m", "extproc", "up", "-f", str(resources), "--listen", f"127.0.0.1:{port}"]
    argv += ["--metrics", "127.0.0.1:0", "--session-key-file", str(key_file)]
    proc = Proc(argv, name="mcp-extproc-up", log_dir=log_dir)
    try:
        metrics = proc.wait_for_line(r"metrics at (http://\S+)", START_DEADLINE_S).group(1)
        proc.wait_for_line(r"ready: MCP server", START_DEADLINE_S)
    except BaseException:
        proc.stop()
        raise
    return proc, metrics


async def just_after_a_ping_answer(metrics: str, server: str) -> None:
    """Return as soon as the keeper behind ``metrics`` answers one more of ``server``'s pings."""
    answered = metric_value(metrics, "mcp_extproc_keeper_pings_answered_total", server=server)
    deadline = time.monotonic() + STREAM_PING_DEADLINE_S
    while metric_value(metrics, "mcp_extproc_keeper_pings_answered_total", server=server) == answered:
        assert time.monotonic() < deadline, "the keeper answered no ping"
        await asyncio.sleep(0.02)


async def test_c_a_restarted_up_keeps_the_session(playwright: str, pages: Pages, tmp_path: Path) -> None:
    """The restarted ``up`` verifies the session id it signed before (the same key file) and
    keeps the session again from the agent's first call.

    The restart is made just after a ping was answered: Playwright's next ping comes 3 s
    later, and one sent while no GET stream is open is lost, which closes the session 5 s
    later whatever the gateway does then. A restart that spans a ping loses the session.
    """
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(mcp_server("pw", playwright)))
    key_file = tmp_path / "keys" / "session-keys.json"
    port = free_port()
    first, metrics = start_up(resources, tmp_path, port, key_file)
    procs = [first]
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            agent = Agent(client, f"http://127.0.0.1:{port}/pw/mcp")
            session_id = await agent.initialize()
            url = pages.url("restart")
            await agent.navigate(url)  # starts the browser, and the heartbeat on the keeper's stream
            await just_after_a_ping_answer(metrics, "pw")
            stopping = time.monotonic()
            first.stop()
            second, _ = start_up(resources, tmp_path, port, key_file)
            procs.append(second)
            restart_s = time.monotonic() - stopping
            note = f"(restart took {restart_s:.1f}s)"
            print(f"up restarted in {restart_s:.2f}s")
            # The same session id, no initialize: the restarted gateway verifies the id it signed.
            assert_same_page(await agent.snapshot(), url, "restart", note)
            # And keeps the session from then on (Playwright's heartbeat is running).
            await asyncio.sleep(IDLE_AFTER_TAKEOVER_S)
            assert_same_page(await agent.snapshot(), url, "restart", note)
        assert agent.initializations == 1 and agent.headers["mcp-session-id"] == session_id
    finally:
        for proc in reversed(procs):
            proc.stop()


# --- (d): two `serve` replicas behind one Envoy, one killed --------------------------------------


@dataclass
class Replica:
    proc: Proc
    grpc: str
    authz_socket: Path
    metrics: str

    def holds_a_stream(self) -> bool:
        return gauge(self.metrics, "mcp_extproc_keeper_streams") >= 1


def gauge(metrics_url: str, name: str) -> float:
    """An unlabelled Prometheus sample (``name value``; 0 when absent)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:  # noqa: S310 - loopback
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def start_serve(resources: Path, tmp: Path, index: int, key_file: Path) -> Replica:
    """``mcp-extproc serve`` on a free TCP port and its own HTTP authorization socket."""
    grpc = f"127.0.0.1:{free_port()}"
    authz = tmp / f"authz-{index}.sock"
    argv = [sys.executable, "-m", "extproc", "serve", "-f", str(resources), "--grpc", grpc]
    argv += ["--authz-http", str(authz), "--metrics", "127.0.0.1:0", "--session-key-file", str(key_file)]
    proc = Proc(argv, name=f"serve-{index}", log_dir=tmp)
    try:
        metrics = proc.wait_for_line(r"metrics at (http://\S+)", START_DEADLINE_S).group(1)
        proc.wait_for_line(r"gRPC server listening", START_DEADLINE_S)
    except BaseException:
        proc.stop()
        raise
    return Replica(proc, grpc, authz, metrics)


def start_envoy(resources: Path, tmp: Path, replicas: list[Replica]) -> tuple[Proc, int]:
    """Envoy on a bootstrap from ``render envoy --grpc A --grpc B --authz-http S1 --authz-http S2``."""
    port = free_port()
    admin = tmp / "admin.sock"
    argv = [sys.executable, "-m", "extproc", "render", "envoy", "-f", str(resources)]
    argv += ["--listen", f"127.0.0.1:{port}", "--admin-socket", str(admin)]
    for replica in replicas:
        argv += ["--grpc", replica.grpc, "--authz-http", str(replica.authz_socket)]
    rendered = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    bootstrap = tmp / "envoy.yaml"
    assert_envoy_accepts(rendered, bootstrap)
    envoy = Proc([envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id"], name="envoy", log_dir=tmp)
    deadline = time.monotonic() + START_DEADLINE_S
    while not admin_ready(admin):
        if envoy.popen.poll() is not None or time.monotonic() > deadline:
            envoy.stop()
            raise AssertionError(f"Envoy did not become ready:\n{envoy.output()}")
        time.sleep(0.05)
    return envoy, port


async def test_d_a_killed_replica_loses_no_session(playwright: str, pages: Pages, tmp_path: Path) -> None:
    """Two ``serve`` replicas share one key file behind one Envoy; the one holding the
    session's GET stream is killed. The other verifies the session id, serves the next
    call and keeps the session from then on."""
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(mcp_server("pw", playwright)))
    key_file = tmp_path / "session-keys.json"  # shared: either replica verifies the other's ids
    procs: list[Proc] = []
    try:
        replicas = [start_serve(resources, tmp_path, i, key_file) for i in (1, 2)]
        procs += [r.proc for r in replicas]
        envoy, port = start_envoy(resources, tmp_path, replicas)
        procs.append(envoy)
        async with httpx.AsyncClient(timeout=60) as client:
            agent = Agent(client, f"http://127.0.0.1:{port}/pw/mcp")
            await agent.initialize()
            url = pages.url("replicas")
            await agent.navigate(url)
            for _ in range(4):  # spread the session over both replicas (Envoy balances each exchange)
                listed = await agent.request("tools/list", {})
                assert listed.status_code == 200, listed.text

            def holder() -> Replica | None:
                return next((r for r in replicas if r.holds_a_stream()), None)

            deadline = time.monotonic() + 10
            while (held := holder()) is None:
                assert time.monotonic() < deadline, "no replica holds the session's GET stream"
                await asyncio.sleep(0.05)
            # Kill the replica holding the session's stream (the hard case), just after a ping
            # answer: the survivor must hold the stream before Playwright's next ping, 3 s later.
            await just_after_a_ping_answer(held.metrics, "pw")
            os.killpg(held.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            held.proc.popen.wait(timeout=10)
            assert_same_page(await agent.snapshot(), url, "replicas", "(right after the kill)")
            print(f"the survivor answered {time.monotonic() - killed:.2f}s after the kill")
            await asyncio.sleep(IDLE_AFTER_TAKEOVER_S)  # the survivor keeps the session now
            assert_same_page(await agent.snapshot(), url, "replicas", "(after idling on the survivor)")
        assert agent.initializations == 1
    finally:
        for proc in reversed(procs):
            proc.stop()
