"""The MCPVirtualServer CRD accepts exactly the documents the model accepts (schema and CEL rules)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from extproc.config.models import MCPVirtualServer
from tests.kubeschemas import OUR_CRDS, cel_violations, crd_schema, load_crd, openapi_schema

CRD_FILE = OUR_CRDS / "mcp.extproc.io_mcpvirtualservers.yaml"


def _virtual(servers: Any, name: str = "tools") -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPVirtualServer",
        "metadata": {"name": name},
        "spec": {"servers": servers},
    }


# "A backend listed twice" is left out: the CRD makes spec.servers a list-map keyed by name
# (x-kubernetes-list-type: map), so the API server itself refuses a duplicate name before any
# schema or CEL rule runs; the schema alone, as checked here, cannot see it.
CASES = [
    _virtual([{"name": "a"}]),
    _virtual([{"name": "a"}, {"name": "b"}]),
    _virtual([{"name": "a", "prefix": "a_"}, {"name": "b", "prefix": "b_"}, {"name": "c"}]),
    _virtual([{"name": "a", "prefix": "gh_a"}, {"name": "b", "prefix": "gh_b"}]),
    _virtual([{"name": "a", "prefix": "x.y-Z_9"}]),
    _virtual([{"name": "a", "prefix": "p" * 64}]),
    # A prefix used twice.
    _virtual([{"name": "a", "prefix": "x_"}, {"name": "b", "prefix": "x_"}]),
    _virtual([{"name": "a", "prefix": "x_"}, {"name": "b"}, {"name": "c", "prefix": "x_"}]),
    # A prefix that starts another, in either order.
    _virtual([{"name": "a", "prefix": "gh_"}, {"name": "b", "prefix": "gh_x_"}]),
    _virtual([{"name": "a", "prefix": "gh_x_"}, {"name": "b", "prefix": "gh_"}]),
    # Characters a tool name may not hold, and lengths.
    _virtual([{"name": "a", "prefix": "my tools"}]),
    _virtual([{"name": "a", "prefix": "gh/"}]),
    _virtual([{"name": "a", "prefix": "gh:"}]),
    _virtual([{"name": "a", "prefix": ""}]),
    _virtual([{"name": "a", "prefix": "p" * 65}]),
    # No servers, too many, and malformed entries.
    _virtual([]),
    _virtual([{"name": f"s{i}"} for i in range(65)]),
    _virtual([{"prefix": "a_"}]),
    _virtual([{"name": "a", "prefx": "a_"}]),
    _virtual({"name": "a"}),
    _virtual([{"name": "a"}], name="Not_A_Label"),
]


def _schema_verdict(doc: dict[str, Any]) -> bool:
    crd = load_crd(CRD_FILE)
    try:
        jsonschema.Draft4Validator(crd_schema(crd, "v1alpha1")).validate(doc)
    except jsonschema.ValidationError:
        return False
    return not cel_violations(openapi_schema(crd, "v1alpha1"), doc)


def _model_verdict(doc: dict[str, Any]) -> bool:
    try:
        MCPVirtualServer.model_validate(doc)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    "doc",
    CASES,
    ids=lambda d: yaml.safe_dump({"name": d["metadata"]["name"], **d["spec"]}, default_flow_style=True)[:70],
)
def test_crd_accepts_exactly_what_the_model_accepts(doc: dict[str, Any]) -> None:
    assert _schema_verdict(doc) is _model_verdict(doc)


def test_the_cases_hold_both_verdicts() -> None:
    # Were every case accepted (or every one refused), agreement would prove nothing.
    verdicts = [_model_verdict(d) for d in CASES]
    assert verdicts.count(True) == 6
    assert verdicts.count(False) == len(CASES) - 6


def test_the_crd_keys_servers_by_name_and_keeps_a_prefix_fixed() -> None:
    # What the agreement cases cannot show: the API server's own checks.
    servers = openapi_schema(load_crd(CRD_FILE), "v1alpha1")["properties"]["spec"]["properties"]["servers"]
    assert servers["x-kubernetes-list-type"] == "map"
    assert servers["x-kubernetes-list-map-keys"] == ["name"]
    [rule] = [r for r in servers["items"]["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert "prefix" in rule["rule"]
    assert "immutable" in rule["message"]
