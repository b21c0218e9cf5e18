"""A 2026-07-28 ``tools/call`` through a virtual server is one ext_authz Check, and the backend
gets the client's bytes with only the tool's name changed.

Behind ``/vt/mcp`` (through `mcp-extproc up`, front door ``auto``): two Python SDK servers in
their 2026-07-28 mode that record every request byte for byte, ``m`` (prefix ``m_``) and
``n`` (no prefix). Envoy's Lua filter applies the Check's splice on the backend's fast
route (extproc.core.splice); everything else about the call is decided as on the backend's
own route.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.agents import modern_request, modern_session, raw_post, response_messages
from tests.integration.conftest import PY_TOOLS, metric_value, resource_doc, start_gateway
from tests.procs import Proc, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    url: str
    metrics: str
    records: dict[str, Path]

    def received(self, server: str) -> list[dict[str, Any]]:
        return [dict(r) for r in read_records(self.records[server]) if r["method"] == "POST"]

    def calls(self, server: str) -> list[dict[str, Any]]:
        return [r for r in self.received(server) if isinstance(r["body"], dict) and r["body"]["method"] == "tools/call"]

    def phases(self) -> dict[str, float]:
        return {
            phase: metric_value(self.metrics, "mcp_extproc_phases_total", phase=phase)
            for phase in ("check", "request_headers", "request_body")
        }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("virtual-fast")
    procs: list[Proc] = []
    try:
        records: dict[str, Path] = {}
        docs: list[dict[str, Any]] = []
        for name in ("m", "n"):
            records[name] = tmp / f"{name}.jsonl"
            proc, port = start_pyserver("modern", records[name])
            procs.append(proc)
            docs.append(resource_doc(name, port, PY_TOOLS))
        docs.append(
            {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPVirtualServer",
                "metadata": {"name": "vt"},
                "spec": {"servers": [{"name": "m", "prefix": "m_"}, {"name": "n"}]},
            }
        )
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        up, base, metrics = start_gateway(resources, tmp)
        procs.append(up)
        stack = Stack(url=f"{base}/vt/mcp", metrics=metrics, records=records)
        asyncio.run(_list(stack.url))  # the gateway learns who owns which tool
        yield stack
    finally:
        for proc in reversed(procs):
            proc.stop()


async def _list(url: str) -> set[str]:
    async with modern_session(url) as session:
        return {t.name for t in (await session.list_tools()).tools}


def _call(name: str, text: str, id: Any = 7) -> tuple[bytes, dict[str, str]]:
    body, headers = modern_request("tools/call", {"name": name, "arguments": {"text": text}}, id=id)
    return json.dumps(body, separators=(",", ":")).encode(), headers


def _text(response: httpx.Response) -> str:
    [message] = [m for m in response_messages(response) if "id" in m]
    assert "result" in message, message
    return str(message["result"]["content"][0]["text"])


async def test_a_call_is_one_check_and_reaches_its_backend_with_only_the_name_changed(stack: Stack) -> None:
    body, headers = modern_request("tools/call", {"name": "m_echo", "arguments": {"text": "x"}}, id="req-7")
    meta = json.dumps(body["params"]["_meta"])
    # Written as no serializer would: spaces, members out of order, an escaped prefix,
    # a non-ASCII argument, a number the gateway must not reformat.
    raw = (
        '{ "params" : { "arguments" : {"text": "h\u00e9llo \\u00e9", "n": 1.50e1},\n'
        f'  "name" :  "m\\u005fecho", "_meta": {meta} }}, "id": "req-7", "method": "tools/call", "jsonrpc":"2.0" }}'
    ).encode()
    before = stack.phases()
    response = await raw_post(stack.url, raw, headers=headers)
    after = stack.phases()
    assert response.status_code == 200
    assert _text(response) == "h\u00e9llo \u00e9"
    assert after["check"] - before["check"] == 1
    assert after["request_body"] == before["request_body"]  # no ext_proc round trip
    [call] = [c for c in stack.calls("m") if c["body"]["id"] == "req-7"]
    expected = raw.replace(b'"m\\u005fecho"', b'"echo"')
    assert expected != raw
    assert call["body_latin1"].encode("latin-1") == expected
    assert call["headers"]["mcp-name"] == "echo"
    assert int(call["headers"]["content-length"]) == len(expected)
    assert not {"x-mcp-backend", "x-mcp-splice", "authorization"} & set(call["headers"])


async def test_a_backend_without_prefix_gets_the_body_byte_for_byte(stack: Stack) -> None:
    raw, headers = _call("echo", "plain", id=8)
    response = await raw_post(stack.url, raw, headers=headers)
    assert _text(response) == "plain"
    [call] = [c for c in stack.calls("n") if c["body"]["id"] == 8]
    assert call["body_latin1"].encode("latin-1") == raw
    assert not any(c["body"]["id"] == 8 for c in stack.calls("m"))


async def test_a_chunked_call_is_spliced_and_framed_anew(stack: Stack) -> None:
    raw, headers = _call("m_echo", "chunked", id=9)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 10):
            yield raw[i : i + 10]

    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(stack.url, content=chunks(), headers=headers)
    assert _text(response) == "chunked"
    [call] = [c for c in stack.calls("m") if c["body"]["id"] == 9]
    assert call["body"]["params"]["name"] == "echo"


async def test_routing_headers_from_the_agent_route_nothing(stack: Stack) -> None:
    raw, headers = _call("echo", "forged", id=10)
    forged = {**headers, "x-mcp-backend": "m", "x-mcp-splice": f"{len(raw)}:0:{len(raw)}:%7B%7D"}
    response = await raw_post(stack.url, raw, headers=forged)
    assert _text(response) == "forged"
    [call] = [c for c in stack.calls("n") if c["body"]["id"] == 10]
    assert call["body_latin1"].encode("latin-1") == raw
    assert not any(c["body"]["id"] == 10 for c in stack.calls("m"))
    # The same headers on a request the fast route does not take change nothing either.
    listing, list_headers = modern_request("tools/list", {}, id=11)
    response = await raw_post(stack.url, listing, headers={**list_headers, "x-mcp-backend": "m", "x-mcp-splice": "1"})
    names = {t["name"] for t in response_messages(response)[-1]["result"]["tools"]}
    assert {"m_echo", "echo"} <= names


async def test_denied_and_unknown_tools_are_refused_on_the_fast_route_and_never_forwarded(stack: Stack) -> None:
    for name, id in (("m_delete_everything", 12), ("m_nothing", 13), ("nothing", 14)):
        raw, headers = _call(name, "x", id=id)
        response = await raw_post(stack.url, raw, headers=headers)
        [message] = response_messages(response)
        assert message["id"] == id and "error" in message, message
    assert response_messages(response)[0]["error"]["message"].startswith("no MCP server behind virtual server")
    received = {c["body"]["id"] for server in ("m", "n") for c in stack.calls(server)}
    assert not {12, 13, 14} & received


async def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(stack: Stack) -> None:
    """Only the head goes out (see test_data_path): the gateway answers from the headers."""
    _, headers = _call("m_echo", "x", id=15)
    host, port = stack.url.removeprefix("http://").split("/", 1)[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /vt/mcp HTTP/1.1\r\nhost: {host}\r\n{head}content-length: 5242880\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer


async def test_a_chunked_call_over_the_limit_is_413_and_never_forwarded(stack: Stack) -> None:
    raw, headers = _call("m_echo", "y" * (5 << 20), id=16)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 1 << 16):
            yield raw[i : i + (1 << 16)]

    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(stack.url, content=chunks(), headers=headers)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == -32600
    assert not any(c["body"]["id"] == 16 for c in stack.calls("m"))


async def test_the_sdk_client_calls_both_backends_through_the_fast_route(stack: Stack) -> None:
    before = stack.phases()
    async with modern_session(stack.url) as session:
        assert (await session.call_tool("m_echo", {"text": "sdk-m"})).content[0].text == "sdk-m"  # type: ignore[union-attr]
        assert (await session.call_tool("echo", {"text": "sdk-n"})).content[0].text == "sdk-n"  # type: ignore[union-attr]
    after = stack.phases()
    assert after["check"] - before["check"] == 2
    assert [c["body"]["params"]["name"] for c in stack.calls("m")][-1] == "echo"
