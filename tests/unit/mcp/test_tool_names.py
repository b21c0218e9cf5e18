"""Tool and method names that cannot travel in an ``x-mcp-*`` header are refused with a JSON-RPC error.

A NUL, CR or LF cannot be in a header value, and a lone surrogate has no UTF-8 encoding:
such a name used to reach the header mutation (Envoy then refused it: a bare 5xx) or the
protobuf encoder (an exception and a traceback). Now the request ladder refuses it,
-32602 (a tool name) or -32600 (a method), HTTP 400, with the request's id, on every
front door: ext_proc, the HTTP authorization service of the fast route, the harness.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Final

import pytest

from extproc.config.pipeline_file import PipelineConfig, StageSpec
from extproc.config.resources import Catalog, parse_documents
from extproc.core.registry import Registry
from extproc.frontdoor.ext_proc import Processor
from extproc.frontdoor.http_check import AuthzHttpServer
from extproc.mcp.jsonrpc import Rejection, parse_request
from extproc.mcp.spec import INVALID_PARAMS, INVALID_REQUEST
from extproc.testing import StageHarness
from tests.messages import SERVER_DOC, body_msg, headers_msg, post_headers

# A server that allows every tool: nothing but the name check stands in the way.
OPEN: Final = {**SERVER_DOC, "spec": {"url": "http://127.0.0.1:9/mcp", "allowedTools": ["*"]}}
BAD_NAMES: Final = ["a\u0000b", "\ud800", "echo\n", "x\r\ny: 1", "\u007f", "tab\there", "\u0085"]


def call(name: str, id_: Any = 5) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name}}).encode()


def check(body: bytes, code: int = INVALID_PARAMS, id_: Any = 5) -> None:
    error = json.loads(body)
    assert error["id"] == id_ and error["error"]["code"] == code, error


@pytest.fixture
def open_catalog() -> Catalog:
    return parse_documents([OPEN], "test")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_ladder_refuses_names_no_header_can_hold(name: str) -> None:
    rejection = parse_request(call(name), {})
    assert isinstance(rejection, Rejection)
    assert (rejection.status, rejection.code, rejection.id) == (400, INVALID_PARAMS, 5)
    assert "not a tool name" in rejection.message


@pytest.mark.parametrize("name", ["echo", "héllo/wörld", "名前", "a b", "x.y-z_1"])
def test_printable_names_of_any_script_are_accepted(name: str) -> None:
    assert not isinstance(parse_request(call(name), {}), Rejection)


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_ext_proc_answers_a_json_rpc_error_and_logs_no_traceback(
    name: str, open_catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proc = Processor(
        Registry().build_pipeline(PipelineConfig(stages=[StageSpec(name="mcp"), StageSpec(name="allowlist")])),
        open_catalog,
    )
    await proc.handle(headers_msg(post_headers()))
    answer = await proc.handle(body_msg(call(name)))
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 400
    check(answer.immediate_response.body)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_the_fast_routes_authorization_service_answers_a_json_rpc_error(
    name: str, open_catalog: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = Registry().build_pipeline(PipelineConfig(stages=[StageSpec(name="mcp"), StageSpec(name="allowlist")]))
    service = AuthzHttpServer(pipeline, open_catalog, str(tmp_path / "authz.sock"))
    headers = (("host", "envoy"), ("content-type", "application/json"), ("mcp-protocol-version", "2025-06-18"))
    status, _, body = await service.answer("POST", "/demo/mcp", headers, call(name))
    assert status == 400
    check(body)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_the_harness_fast_call_and_a_batch_element_say_the_same() -> None:
    harness = StageHarness(Registry().build(StageSpec(name="allowlist")), stages_before=["mcp"], resources=[OPEN])
    fast = await harness.fast_call(call("a\u0000b"))
    assert fast.reply is not None and fast.reply.status == 400
    check(fast.reply.body)
    batch = b"[" + call("echo", 1) + b"," + call("\ud800", 2) + b"]"
    refused = await harness.post(batch)
    assert refused.reply is not None and refused.reply.status == 400
    check(refused.reply.body, id_=2)


@pytest.mark.parametrize("method", ["tools/call\u0000", "ping\n", "\udfff"])
def test_a_method_no_header_can_hold_is_an_invalid_request(method: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": method}).encode()
    rejection = parse_request(body, {})
    assert isinstance(rejection, Rejection)
    assert (rejection.status, rejection.code, rejection.id) == (400, INVALID_REQUEST, 9)
    notification = parse_request(json.dumps({"jsonrpc": "2.0", "method": method}).encode(), {})
    assert isinstance(notification, Rejection) and notification.id is None
