"""The HTTP authorization service: what Envoy copies upstream, carrier statuses, the HTTP/1.1 it speaks."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import httptools
import pytest

from extproc.api import Context, Continue, Stage, StageConfig, Verdict
from extproc.config.pipeline_file import PipelineConfig, StageSpec
from extproc.config.resources import Catalog
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.frontdoor.http_check import AuthzHttpServer, _response
from extproc.render.wire import CARRIED_STATUS, REMOVE_HEADER, UPSTREAM_HEADERS

LEGACY = {"content-type": "application/json", "mcp-protocol-version": "2025-06-18"}


def _request(headers: dict[str, str], path: str = "/demo/mcp") -> tuple[str, str, tuple[tuple[str, str], ...]]:
    return "POST", path, (("host", "envoy"), *headers.items())


def _call(tool: str, id: int = 3) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool}}).encode()


@pytest.fixture
async def service(catalog: Catalog, tmp_path: Path) -> AsyncIterator[AuthzHttpServer]:
    pipeline = Registry().build_pipeline(
        PipelineConfig(stages=[StageSpec(name=n) for n in ("mcp", "allowlist", "credentials")])
    )
    await pipeline.startup()
    yield AuthzHttpServer(pipeline, catalog, str(tmp_path / "authz.sock"))
    await pipeline.shutdown()


async def test_an_allowed_call_sets_only_headers_envoy_may_copy(service: AuthzHttpServer) -> None:
    status, headers, body = await service.answer(*_request({**LEGACY, "authorization": "Bearer agent"}), _call("echo"))
    assert (status, body) == (200, b"")
    answer = dict(headers)
    assert answer["x-mcp-tool"] == "echo" and answer["server"] == "demo" and answer["method"] == "tools/call"
    assert "authorization" in answer[REMOVE_HEADER].split(",")  # the agent's token never goes upstream
    copied = [name for name, _ in headers if re.fullmatch(UPSTREAM_HEADERS, name)]
    assert set(copied) == {"x-mcp-server", "x-mcp-method", "x-mcp-tool"}  # not the metadata, not x-envoy-*


@pytest.mark.parametrize("name", ["content-length", "x-envoy-auth-headers-to-remove", "x-envoy-original-path", "date"])
def test_framing_and_envoy_headers_are_never_copied_upstream(name: str) -> None:
    assert not re.fullmatch(UPSTREAM_HEADERS, name)


@pytest.mark.parametrize("name", ["authorization", "x-mcp-tool", "x-argument-keys-checked", "x-e", "x-envoyish"])
def test_stage_headers_are_copied_upstream(name: str) -> None:
    assert re.fullmatch(UPSTREAM_HEADERS, name)


async def test_a_denial_answered_with_200_travels_on_its_carrier(service: AuthzHttpServer) -> None:
    status, headers, body = await service.answer(*_request(LEGACY), _call("rm_everything"))
    assert status == CARRIED_STATUS[200] != 200  # Envoy would read 200 as "allow"
    reply = json.loads(body)
    assert reply["id"] == 3 and reply["error"]["code"] == -32003
    assert dict(headers)["content-type"] == "application/json"


async def test_a_route_promise_follows_the_headers(service: AuthzHttpServer) -> None:
    listing = json.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}).encode()
    status, _headers, body = await service.answer(*_request(LEGACY), listing)
    assert status == 400
    assert (
        "routed this request as one legacy-era tools/call, but it is tools/list" in json.loads(body)["error"]["message"]
    )


class _SetsHeader(Stage[StageConfig]):
    name: ClassVar[str] = "sets-header"
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()
    header: ClassVar[tuple[str, str]] = ("", "")

    async def on_request_body(self, ctx: Context) -> Verdict:
        return Continue(set_headers=dict([self.header]))


@pytest.mark.parametrize(
    "header",
    [("odd-header", "1"), ("x-smuggled", "1\r\nx-admin: yes")],
    ids=["not-copied-by-envoy", "would-split-the-answer"],
)
async def test_a_header_that_cannot_reach_the_upstream_refuses_the_call(
    catalog: Catalog, tmp_path: Path, header: tuple[str, str]
) -> None:
    stage = type("_Stage", (_SetsHeader,), {"header": header})(Stage.Config())
    base: Any = Registry().build_pipeline(PipelineConfig(stages=[StageSpec(name="mcp")]))
    service = AuthzHttpServer(Pipeline([*base.stages, stage]), catalog, str(tmp_path / "authz.sock"))
    status, headers, body = await service.answer(*_request(LEGACY), _call("echo"))
    assert status == CARRIED_STATUS[500]
    assert header[0] in json.loads(body)["error"]["message"]
    assert all("x-admin" not in value for _, value in headers)


@pytest.mark.parametrize(("name", "value"), [("x-ok", "a\r\nx-admin: yes"), ("x-ok", "a\nb"), ("x ok", "a"), ("", "a")])
def test_the_writer_refuses_what_would_split_or_break_the_answer(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        _response(200, [(name, value)], b"", keep_alive=True)


class _Answers:
    """Parses the service's answers off a socket (httptools' response parser)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, dict[str, str], bytes]] = []
        self._headers: dict[str, str] = {}
        self._body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, bytes(self._body)))
        self._headers, self._body = {}, bytearray()

    async def read(self, reader: Any, count: int) -> list[tuple[int, dict[str, str], bytes]]:
        while len(self.done) < count:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            self.parser.feed_data(data)
        return self.done


def _wire(headers: dict[str, str], body: bytes, path: str = "/demo/mcp") -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in {"host": "envoy", **headers, "content-length": str(len(body))}.items())
    return f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode() + body


@pytest.fixture
async def listening(service: AuthzHttpServer) -> AsyncIterator[AuthzHttpServer]:
    await service.start()
    yield service
    await service.stop()


async def test_requests_sent_back_to_back_are_answered_in_order_on_one_connection(listening: AuthzHttpServer) -> None:
    reader, writer = await asyncio.open_unix_connection(listening.path)
    writer.write(
        _wire(LEGACY, _call("echo", 1)) + _wire(LEGACY, _call("rm_everything", 2)) + _wire(LEGACY, _call("echo", 3))
    )
    answers = await _Answers().read(reader, 3)
    assert [status for status, _, _ in answers] == [200, CARRIED_STATUS[200], 200]
    assert [headers.get("x-mcp-tool") for status, headers, _ in answers if status == 200] == ["echo", "echo"]
    assert json.loads(answers[1][2])["id"] == 2
    writer.close()


async def test_connection_close_is_honoured(listening: AuthzHttpServer) -> None:
    reader, writer = await asyncio.open_unix_connection(listening.path)
    writer.write(_wire({**LEGACY, "connection": "close"}, _call("echo")))
    answers = await _Answers().read(reader, 1)
    assert answers[0][0] == 200 and answers[0][1]["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the service closed its end
    writer.close()


@pytest.mark.parametrize(
    "wire",
    [
        b"POST /demo/mcp HTTP/1.1\r\nauthorization: Bearer s3cret-agent-token\r\nbroken header line\r\n\r\n",
        b"POST /demo/mcp HTTP/1.1\r\nx-big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
    ],
    ids=["malformed", "oversized-head"],
)
async def test_bad_http_closes_the_connection_unanswered_and_quotes_nothing(
    listening: AuthzHttpServer, wire: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_unix_connection(listening.path)
    writer.write(wire)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # Envoy then fails closed (status_on_error)
    assert "malformed HTTP" in caplog.text and "s3cret" not in caplog.text
    writer.close()
    # The service itself is unharmed: a new connection is answered.
    reader, writer = await asyncio.open_unix_connection(listening.path)
    writer.write(_wire(LEGACY, _call("echo")))
    assert (await _Answers().read(reader, 1))[0][0] == 200
    writer.close()
