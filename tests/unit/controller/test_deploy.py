"""deploy/: every kustomization's resources exist and validate; kustomize builds them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.render.meta import ControllerSettings
from controller.render.webhook_config import mutating_webhook
from tests.unit.controller.schemas import ROOT, validate_any

DEPLOY = ROOT / "deploy"


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


@pytest.mark.parametrize("overlay", ["", "examples"])
def test_every_listed_object_exists_and_validates(overlay: str) -> None:
    objects = kustomize_objects(DEPLOY / overlay)
    assert objects
    for obj in objects:
        validate_any(obj)
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "ClusterRole", "Deployment", "MutatingWebhookConfiguration"} <= kinds


def test_kustomize_builds_the_same_objects() -> None:
    kubectl = shutil.which("kubectl") or str(Path(__import__("sys").executable).with_name("kubectl"))
    for overlay in ("", "examples"):
        built = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, check=False
        )
        assert built.returncode == 0, built.stderr
        ours = sorted((o["kind"], o["metadata"]["name"]) for o in kustomize_objects(DEPLOY / overlay))
        theirs = sorted((o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(built.stdout) if o)
        assert ours == theirs


def test_controller_deployment_is_hardened() -> None:
    [deployment] = [o for o in kustomize_objects(DEPLOY) if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_rbac_is_least_privilege() -> None:
    [role] = [o for o in kustomize_objects(DEPLOY) if o["kind"] == "ClusterRole"]
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs[("mcp.extproc.io", "mcpagents")] == {"get", "list", "watch"}  # never writes specs
    assert all("*" not in v for v in verbs.values())
    assert all(r != "*" for _, r in verbs)
    webhook_rule = next(r for r in role["rules"] if "mutatingwebhookconfigurations" in r["resources"])
    assert webhook_rule["resourceNames"] == ["mcp-extproc-injector"]


def test_webhook_manifest_matches_the_renderer() -> None:
    [config] = [o for o in kustomize_objects(DEPLOY) if o["kind"] == "MutatingWebhookConfiguration"]
    assert config == mutating_webhook(ControllerSettings())
