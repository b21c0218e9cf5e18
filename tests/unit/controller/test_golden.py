"""Golden files of the renderers (tests/data/golden; ``tests.golden`` says how to rewrite them).

(``render k8s``, the command: tests/integration/controller/test_golden.py.)
"""

from __future__ import annotations

import yaml

from controller.render.inject import injection_patch
from controller.render.meta import ControllerSettings
from controller.render.view import build_view
from controller.render.webhook_config import mutating_webhook
from tests.golden import check
from tests.kubeschemas import ROOT, validate_core


def test_injection_patch_golden() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "examples" / "mcp.yaml").read_text()))
    view = build_view("agents", [d for d in docs if d["kind"] != "Namespace"])
    pod = {
        "metadata": {"name": "assistant-0", "labels": {"app": "assistant"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    ops, _ = injection_patch(pod, list(view.catalog.agents.values()), ControllerSettings())
    check("inject-patch.yaml", yaml.safe_dump(ops, sort_keys=False))


def test_webhook_configuration_golden() -> None:
    config = mutating_webhook(ControllerSettings(), b"-----BEGIN CERTIFICATE-----\n")
    validate_core(config)
    check("mutating-webhook.yaml", yaml.safe_dump(config, sort_keys=False))
