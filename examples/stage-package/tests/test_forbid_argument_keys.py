"""Tests of the example stage package: the stage itself, and that mcp-extproc finds it by entry point.

Run with ``pytest examples/stage-package/tests`` once the package is installed
(``pip install ./examples/stage-package``); mcp-extproc's own ``make test`` does both.
"""

from __future__ import annotations

import json

from mcp_stage_example.stage import CHECKED_HEADER, ForbidArgumentKeys

from extproc.api import Context, Continue, Deny, Phase
from extproc.config.pipeline_file import PipelineConfig, StageSpec
from extproc.core.registry import Registry
from extproc.mcp.jsonrpc import McpRequest, parse_request


def _ctx(arguments: dict[str, object]) -> Context:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "login", "arguments": arguments}}
    ).encode()
    ctx = Context(request_id="r", http_method="POST", path="/demo/mcp", request_headers={})
    parsed = parse_request(body, {})
    assert isinstance(parsed, McpRequest)
    ctx.mcp, ctx.body = parsed, body
    return ctx


def _stage(*keys: str) -> ForbidArgumentKeys:
    return ForbidArgumentKeys(ForbidArgumentKeys.Config.model_validate({"keys": list(keys)}))


async def test_a_forbidden_key_at_any_depth_is_refused() -> None:
    verdict = await _stage("password").on_request_body(_ctx({"user": {"PassWord": "x"}}))
    assert isinstance(verdict, Deny)
    assert verdict.code == -32003
    assert verdict.message == "arguments of 'login' carry the forbidden key 'PassWord'"


async def test_clean_arguments_pass_with_the_checked_header() -> None:
    verdict = await _stage("password").on_request_body(_ctx({"user": "bob", "tags": [{"a": 1}]}))
    assert verdict == Continue(set_headers={CHECKED_HEADER: "3"})


async def test_mcp_extproc_finds_the_stage_by_entry_point_and_runs_it() -> None:
    config = PipelineConfig(
        stages=[StageSpec(name="mcp"), StageSpec(name="forbid-argument-keys", config={"keys": ["token"]})]
    )
    pipeline = Registry().build_pipeline(config)
    outcome = await pipeline.run(Phase.REQUEST_BODY, _ctx({"token": "t"}))
    assert isinstance(outcome, Deny)
    assert "token" in outcome.message
