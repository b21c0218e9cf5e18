"""An ``MCPAgent`` with just ``selector`` and ``mcpServerRefs``: the controller renders it, and its sidecar
is told that the pod is that agent (authn's ``workloadAgent``); an agent with a JWT keeps needing one.

(The sidecar run from these files, through real Envoy: tests/integration/test_workload_identity.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from controller.commands import render_k8s
from extproc.commands.inspect import checked
from extproc.config.models import MCPAgent
from extproc.config.pipeline_file import load_pipeline_config
from extproc.config.settings import Settings
from tests.kubedocs import NS, agent, rendered_objects, server
from tests.kubeschemas import OUR_CRDS, cel_violations, crd_schema, load_crd, openapi_schema


def bare(name: str, servers: list[str], **spec: Any) -> dict[str, Any]:
    doc = agent(name, servers, **spec)
    del doc["spec"]["identity"]
    return doc


def authn_config(objects: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    pipeline = yaml.safe_load(objects[("ConfigMap", f"mcp-agent-{name}")]["data"]["pipeline.yaml"])
    [authn] = [s for s in pipeline["stages"] if s["name"] == "authn"]
    config: dict[str, Any] = authn["config"]
    return config


def test_the_sidecar_of_an_agent_without_identity_serves_it_as_the_workload(tmp_path: Path) -> None:
    objects = rendered_objects(server("tools", "http://tools.mcp.svc:8080/mcp"), bare("assistant", ["tools"]))
    assert authn_config(objects, "assistant") == {"workloadAgent": "assistant"}
    # What the sidecar's `serve` loads (serve's view: told by its pipeline file, not by the file's shape).
    data = objects[("ConfigMap", "mcp-agent-assistant")]["data"]
    for key in ("resources.yaml", "pipeline.yaml"):
        (tmp_path / key).write_text(data[key])
    settings = Settings(resources=tmp_path / "resources.yaml", pipeline=tmp_path / "pipeline.yaml")
    catalog, pipeline, _ = checked(settings, None)
    assert catalog.agents["assistant"].spec.identity is None
    assert load_pipeline_config(tmp_path / "pipeline.yaml").stages[0].config == {"workloadAgent": "assistant"}
    assert pipeline.names[0] == "authn"


def test_an_agent_with_a_jwt_is_never_the_workload() -> None:
    objects = rendered_objects(server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
    assert authn_config(objects, "assistant") == {}


def test_render_k8s_accepts_selector_and_server_refs_alone(tmp_path: Path) -> None:
    docs = [
        server("tools", "http://tools.mcp.svc:8080/mcp"),
        bare("assistant", ["tools"]),
        bare("istio-agent", ["tools"], attachment="Istio"),
    ]
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    text, warnings = render_k8s(path)
    assert warnings == []
    kinds = {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(text)}
    assert {("ConfigMap", "mcp-agent-assistant"), ("EnvoyFilter", "mcp-agent-istio-agent")} <= kinds


def test_the_agent_crd_accepts_exactly_what_the_model_accepts() -> None:
    crd = load_crd(OUR_CRDS / "mcp.extproc.io_mcpagents.yaml")
    cases = [
        (bare("a", ["tools"]), True),
        (agent("a", ["tools"], identity={"serviceAccount": "robot"}), True),
        (agent("a", ["tools"], identity={"serviceAccount": "robot", "trustDomain": "example.org"}), True),
        (agent("a", ["tools"], identity={}), False),
        (agent("a", ["tools"], identity={"trustDomain": "example.org"}), False),
        (agent("a", ["tools"], identity={"serviceAccount": "Not/A/Name"}), False),
    ]
    for doc, valid in cases:
        try:
            MCPAgent.model_validate({**doc, "metadata": {"name": "a", "namespace": NS}})
            model_ok = True
        except ValueError:
            model_ok = False
        try:
            jsonschema.Draft4Validator(crd_schema(crd, "v1alpha1")).validate(doc)
            schema_ok = not cel_violations(openapi_schema(crd, "v1alpha1"), doc)
        except jsonschema.ValidationError:
            schema_ok = False
        assert (model_ok, schema_ok) == (valid, valid), doc["spec"].get("identity")
