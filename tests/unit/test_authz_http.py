"""The HTTP authorization service's answers: what Envoy copies upstream, and carrier statuses."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import h11
import pytest

from extproc.api import Context, Continue, Stage, Verdict
from extproc.authz_http import CARRIED_STATUS, REMOVE_HEADER, UPSTREAM_HEADERS, AuthzHttpServer
from extproc.pipeline import Pipeline
from extproc.registry import PipelineConfig, Registry, StageSpec
from extproc.resources import Catalog

LEGACY = {"content-type": "application/json", "mcp-protocol-version": "2025-06-18"}


def _request(headers: dict[str, str], path: str = "/demo/mcp") -> h11.Request:
    return h11.Request(method="POST", target=path, headers=[("host", "envoy"), *headers.items()])


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
    status, headers, body = await service.answer(_request({**LEGACY, "authorization": "Bearer agent"}), _call("echo"))
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
    status, headers, body = await service.answer(_request(LEGACY), _call("rm_everything"))
    assert status == CARRIED_STATUS[200] != 200  # Envoy would read 200 as "allow"
    reply = json.loads(body)
    assert reply["id"] == 3 and reply["error"]["code"] == -32003
    assert dict(headers)["content-type"] == "application/json"


async def test_a_route_promise_follows_the_headers(service: AuthzHttpServer) -> None:
    listing = json.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}).encode()
    status, _headers, body = await service.answer(_request(LEGACY), listing)
    assert status == 400
    assert (
        "routed this request as one legacy-era tools/call, but it is tools/list" in json.loads(body)["error"]["message"]
    )


class _SetsOddHeader(Stage):
    name: ClassVar[str] = "odd-header"
    calls_need_ext_proc: frozenset[str] = frozenset()

    async def on_request_body(self, ctx: Context) -> Verdict:
        return Continue(set_headers={"odd-header": "1"})


async def test_a_header_envoy_would_drop_refuses_the_call(catalog: Catalog, tmp_path: Path) -> None:
    base: Any = Registry().build_pipeline(PipelineConfig(stages=[StageSpec(name="mcp")]))
    pipeline = Pipeline([*base.stages, _SetsOddHeader(Stage.Config())])
    service = AuthzHttpServer(pipeline, catalog, str(tmp_path / "authz.sock"))
    status, _headers, body = await service.answer(_request(LEGACY), _call("echo"))
    assert status == CARRIED_STATUS[500]
    assert "odd-header" in json.loads(body)["error"]["message"]
