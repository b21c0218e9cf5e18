"""The ``auto`` front door: which eras take the fast route, the routes rendered, the route's promise."""

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
from extproc.render.bootstrap import bootstrap_dict
from extproc.render.options import BootstrapOptions
from extproc.render.wire import CALL_ERA_KEY, MCP_FILTER

AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"


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


def _routes(catalog: Catalog, fast: frozenset[str]) -> tuple[list[dict[str, Any]], list[str]]:
    options = BootstrapOptions(fast_calls=fast)
    boot = bootstrap_dict(catalog, _pipeline("mcp", "allowlist").needs, options)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"], [f["name"] for f in hcm["http_filters"]]


def _enabled(route: dict[str, Any], name: str) -> bool:
    return not route.get("typed_per_filter_config", {}).get(name, {}).get("disabled", False)


@pytest.mark.parametrize("fast", [frozenset({"modern"}), frozenset({"modern", "legacy"})], ids=sorted)
def test_every_forwarding_route_is_checked_by_exactly_one_filter(catalog: Catalog, fast: frozenset[str]) -> None:
    routes, filters = _routes(catalog, fast)
    assert (MCP_FILTER in filters) == ("legacy" in fast)  # Envoy's parser only where the legacy route needs it
    assert filters.index(AUTHZ) < filters.index(EXT_PROC)
    forwarding = [r for r in routes if "route" in r]
    for route in forwarding:
        checked_by = [f for f in (AUTHZ, EXT_PROC) if _enabled(route, f)]
        assert len(checked_by) == 1, (route["name"], checked_by)  # never neither (fail open), never both
    fast_routes = [r["name"] for r in forwarding if _enabled(r, AUTHZ)]
    assert fast_routes == [f"demo call {era}" for era in ("modern", "legacy") if era in fast]
    # The fast routes come first: the ordinary route would match the same requests.
    assert [r["name"] for r in forwarding][-1] == "demo"


def test_without_fast_eras_the_bootstrap_is_unchanged(catalog: Catalog) -> None:
    routes, filters = _routes(catalog, frozenset())
    assert filters == [EXT_PROC, "envoy.filters.http.router"]
    assert all(AUTHZ not in r.get("typed_per_filter_config", {}) for r in routes)


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
