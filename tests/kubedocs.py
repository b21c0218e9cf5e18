"""Kubernetes documents for the controller tests: the resources they render from, what the
namespace renderer makes of them, and what ``deploy/``'s kustomizations list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from tests.kubeschemas import ROOT, validate_any

NS = "agents"
DEPLOY = ROOT / "deploy"


def server(name: str, url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": {"url": url, "allowedTools": ["*"], **spec},
    }


def agent(name: str, servers: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPAgent",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 3},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "mcpServerRefs": [{"name": s} for s in servers],
            "identity": {
                "jwt": {"issuer": "https://issuer.test", "audiences": ["mcp"], "jwksUri": "https://issuer.test/jwks"}
            },
            **spec,
        },
    }


def secret(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "stringData": data}


def rendered_objects(
    *docs: dict[str, Any], settings: ControllerSettings | None = None
) -> dict[tuple[str, str], dict[str, Any]]:
    """The objects the namespace renderer makes of ``docs`` (one namespace), each validated, by (kind, name)."""
    [(_view, rendered)] = render_documents(list(docs), settings or ControllerSettings()).values()
    for obj in rendered.objects:
        validate_any(obj)
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered.objects}


def kustomize_objects(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists, recursively (what `kubectl apply -k` would send)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(spec) <= {"apiVersion", "kind", "resources"}, f"{directory}: only plain resources are used"
    objects: list[dict[str, Any]] = []
    for entry in spec["resources"]:
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml lists {entry}, which does not exist"
        if path.is_dir():
            objects += kustomize_objects(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return objects
