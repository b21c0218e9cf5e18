"""The CRDs: generated from the models, in sync with deploy/crds/, structural, and as strict as the models."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from controller.render import crds
from extproc.config.models import MCPAgent, MCPServer
from tests.kubeschemas import (
    OUR_CRDS,
    ROOT,
    cel_violations,
    crd_schema,
    load_crd,
    openapi_schema,
    validate_any,
    validate_core,
)


def test_checked_in_crds_match_the_models() -> None:
    rendered = crds.render_crd_files()
    assert sorted(rendered) == sorted(p.name for p in OUR_CRDS.glob("mcp.extproc.io_*.yaml"))
    for name, text in rendered.items():
        assert (OUR_CRDS / name).read_text() == text, f"deploy/crds/{name} is stale: run `make crds`"


def test_check_mode_reports_drift(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert crds.main([str(tmp_path)]) == 0
    assert crds.main(["--check", str(tmp_path)]) == 0
    stale = tmp_path / "mcp.extproc.io_mcpservers.yaml"
    stale.write_text(stale.read_text().replace("maxLength: 2048", "maxLength: 10"))
    assert crds.main(["--check", str(tmp_path)]) == 1
    assert "mcp.extproc.io_mcpservers.yaml" in capsys.readouterr().err


def _walk(node: Any, path: str = "") -> list[str]:
    """Structural-schema violations (apiextensions rules that a generator could break)."""
    bad: list[str] = []
    if not isinstance(node, dict):
        return bad
    for key in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"):
        if key in node:
            bad.append(f"{path}: has {key}")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        bad.append(f"{path}: no type")
    if "additionalProperties" in node and ("properties" in node or not isinstance(node["additionalProperties"], dict)):
        bad.append(f"{path}: additionalProperties must be a schema and exclusive with properties")
    if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(node["exclusiveMinimum"], bool):
        bad.append(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3")
    for name, child in node.get("properties", {}).items():
        bad += _walk(child, f"{path}.{name}")
    if "items" in node:
        bad += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        bad += _walk(node["additionalProperties"], f"{path}{{}}")
    return bad


@pytest.mark.parametrize("kind", crds.CRD_KINDS, ids=lambda k: k.kind)
def test_crd_is_structural_with_status_and_columns(kind: crds.CrdKind) -> None:
    crd = crds.crd(kind)
    validate_core(crd)
    version = crd["spec"]["versions"][0]
    assert _walk(version["schema"]["openAPIV3Schema"]) == []
    assert version["subresources"] == {"status": {}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["observedGeneration"]["type"] == "integer"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert "Age" in columns


def _server(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name}, "spec": spec}


OAUTH = {
    "clientCredentials": {
        "tokenUrl": "https://as.test/token",
        "clientId": "c",
        "clientSecretRef": {"name": "s", "key": "k"},
    }
}
CASES = [
    _server({"url": "http://a.test/mcp"}),
    _server({"url": "https://user:pw@a.test:8443/mcp"}),
    _server({"url": "ftp://a.test/mcp"}),
    _server({"url": "http:///mcp"}),
    _server({"url": "a.test/mcp"}),
    _server({"url": "https://a.test/mcp", "productionMode": True, "upstreamAuth": OAUTH}),
    _server({"url": "http://a.test/mcp", "productionMode": True, "upstreamAuth": OAUTH}),
    _server({"url": "https://a.test/mcp", "productionMode": True}),
    _server({"url": "https://a.test/mcp", "productionMode": True, "upstreamAuth": {"bearer": {"env": "T"}}}),
    _server({"url": "https://a.test/mcp", "upstreamAuth": {"bearer": {"env": "T", "file": "/t"}}}),
    _server({"url": "https://a.test/mcp", "upstreamAuth": {}}),
    _server({"url": "https://a.test/mcp", "upstreamAuth": {**OAUTH, "bearer": {"env": "T"}}}),
    _server({"url": "https://a.test/mcp", "allowedTools": ["  "]}),
    _server({"url": "https://a.test/mcp", "keepalive": "Sometimes"}),
    _server({"url": "https://a.test/mcp", "unknownField": 1}),
    _server({"url": "https://a.test/mcp"}, name="Not_A_Label"),
    _server({"url": "https://a.test/mcp", "gateway": {"parentRefs": []}}),
]


def _schema_verdict(doc: dict[str, Any], model_kind: str) -> bool:
    crd = load_crd(OUR_CRDS / f"mcp.extproc.io_{model_kind}.yaml")
    try:
        jsonschema.Draft4Validator(crd_schema(crd, "v1alpha1")).validate(doc)
    except jsonschema.ValidationError:
        return False
    return not cel_violations(openapi_schema(crd, "v1alpha1"), doc)


@pytest.mark.parametrize("doc", CASES, ids=lambda d: yaml.safe_dump(d["spec"], default_flow_style=True).strip()[:60])
def test_crd_accepts_exactly_what_the_model_accepts(doc: dict[str, Any]) -> None:
    try:
        MCPServer.model_validate(doc)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert _schema_verdict(doc, "mcpservers") is model_ok


def test_agent_crd_enforces_algorithms_and_refs() -> None:
    agent = yaml.safe_load((ROOT / "deploy" / "examples" / "mcp.yaml").read_text().split("---")[-1])
    MCPAgent.model_validate(agent)
    assert _schema_verdict(agent, "mcpagents")
    agent["spec"]["identity"]["jwt"]["algorithms"] = ["HS256"]
    assert not _schema_verdict(agent, "mcpagents")
    agent["spec"]["identity"]["jwt"]["algorithms"] = ["RS256"]
    agent["spec"]["mcpServerRefs"] = []
    assert not _schema_verdict(agent, "mcpagents")


def test_example_documents_fit_the_crds() -> None:
    for path in (ROOT / "deploy" / "examples" / "mcp.yaml", ROOT / "examples" / "resources.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            validate_any(doc)
