"""deploy/: every kustomization's resources exist and validate, and say what they should.

(That kustomize builds the same objects: tests/integration/controller/test_deploy.py.)
"""

from __future__ import annotations

import pytest

from controller.render.meta import ControllerSettings
from controller.render.webhook_config import mutating_webhook
from tests.kubedocs import DEPLOY, kustomize_objects
from tests.kubeschemas import validate_any


@pytest.mark.parametrize("overlay", ["", "examples"])
def test_every_listed_object_exists_and_validates(overlay: str) -> None:
    objects = kustomize_objects(DEPLOY / overlay)
    assert objects
    for obj in objects:
        validate_any(obj)
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "ClusterRole", "Deployment", "MutatingWebhookConfiguration"} <= kinds


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
    # Agents' Secrets are applied and pruned; the session key Secret is read and created, never updated.
    assert {"get", "create"} <= verbs[("", "secrets")]
    # Pods are only read (to find the extension servers it asks for reports).
    assert verbs[("", "pods")] == {"get", "list"}


def test_webhook_manifest_matches_the_renderer() -> None:
    [config] = [o for o in kustomize_objects(DEPLOY) if o["kind"] == "MutatingWebhookConfiguration"]
    assert config == mutating_webhook(ControllerSettings())
