"""The ``auto`` front door's routes as rendered: each forwarding route checked by exactly one filter.

(Which eras take the fast route, and the check that holds the route to its promise:
tests/unit/frontdoor/test_fast_calls.py.)
"""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config.pipeline_file import PipelineConfig, StageSpec
from extproc.config.resources import Catalog
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.render.bootstrap import bootstrap_dict
from extproc.render.options import BootstrapOptions
from extproc.render.wire import MCP_FILTER

AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"


def _pipeline(*names: str) -> Pipeline:
    return Registry().build_pipeline(PipelineConfig(stages=[StageSpec(name=n) for n in names]))


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
