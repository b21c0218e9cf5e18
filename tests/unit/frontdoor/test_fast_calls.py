"""The ``auto`` front door: which eras take the fast route, and the route's promise, as the check holds it.

(The routes rendered: tests/unit/render/test_fast_calls.py.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attr_pb
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb

from extproc.api import Context, Stage, StageConfig, Verdict
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig, StageSpec
from extproc.config.resources import Catalog
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.frontdoor.grpc_check import AuthorizationService
from extproc.render.wire import CALL_ERA_KEY


def _pipeline(*names: str) -> Pipeline:
    return Registry().build_pipeline(PipelineConfig(stages=[StageSpec(name=n) for n in names]))


class _ReadsEveryResponse(Stage[StageConfig]):
    """A third-party stage that reads responses and declares nothing: it keeps calls on ext_proc."""

    name: ClassVar[str] = "reads-responses"

    async def on_response_headers(self, ctx: Context) -> Verdict:
        return None


def test_fast_eras_follow_the_stages_that_read_call_responses() -> None:
    assert Registry().build_pipeline(DEFAULT_PIPELINE).fast_call_eras == {"legacy", "modern"}
    assert _pipeline("mcp", "allowlist", "policy", "credentials").fast_call_eras == {"legacy", "modern"}
    assert Pipeline([]).fast_call_eras == frozenset()  # nothing would parse the call
    undeclared = Pipeline([*_pipeline("mcp", "allowlist").stages, _ReadsEveryResponse(Stage.Config())])
    assert undeclared.fast_call_eras == frozenset()


@pytest.fixture
async def service(catalog: Catalog) -> AsyncIterator[AuthorizationService]:
    pipeline = _pipeline("mcp", "allowlist", "credentials")
    await pipeline.startup()
    yield AuthorizationService(pipeline, catalog)
    await pipeline.shutdown()


def _check(body: Any, era: str, version: str = "2025-06-18") -> authz_pb.CheckRequest:
    http = attr_pb.AttributeContext.HttpRequest(
        method="POST",
        path="/demo/mcp",
        headers={"content-type": "application/json", "mcp-protocol-version": version},
        raw_body=json.dumps(body).encode(),
    )
    return authz_pb.CheckRequest(
        attributes=attr_pb.AttributeContext(
            request=attr_pb.AttributeContext.Request(http=http),
            context_extensions={"x-mcp-server": "demo", CALL_ERA_KEY: era},
        )
    )


async def test_a_request_that_is_not_the_promised_call_is_refused(service: AuthorizationService) -> None:
    listing = {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}
    answer = await service.Check(_check(listing, "legacy"), None)
    assert answer.denied_response.status.code == 400
    reply = json.loads(answer.denied_response.body)
    assert reply["id"] == 4
    assert (
        "routed this request as one legacy-era tools/call, but it is tools/list (legacy era)"
        in reply["error"]["message"]
    )

    call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "a"}}}
    assert (await service.Check(_check(call, "legacy"), None)).HasField("ok_response")
    wrong_era = await service.Check(_check(call, "modern"), None)
    assert wrong_era.denied_response.status.code == 400
