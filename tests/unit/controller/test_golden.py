"""Golden files of every renderer; `UPDATE_GOLDEN=1 pytest tests/unit/controller/test_golden.py` rewrites them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.render.inject import injection_patch
from controller.render.meta import ControllerSettings
from controller.render.view import build_view
from controller.render.webhook_config import mutating_webhook
from tests.unit.controller.schemas import ROOT, validate_any, validate_core

GOLDEN = Path(__file__).parent / "golden"


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs; if the change is intended, rerun with UPDATE_GOLDEN=1"


@pytest.mark.parametrize(
    ("source", "golden"),
    [(ROOT / "deploy" / "examples" / "mcp.yaml", "examples.yaml"), (GOLDEN / "istio-input.yaml", "istio.yaml")],
    ids=["examples", "istio"],
)
def test_render_k8s_command(source: Path, golden: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "render", "k8s", "-f", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for obj in yaml.safe_load_all(result.stdout):
        validate_any(obj)
    check(golden, result.stdout)


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


def test_render_k8s_reports_problems_and_errors(tmp_path: Path) -> None:
    source = tmp_path / "r.yaml"
    source.write_text(
        (GOLDEN / "istio-input.yaml")
        .read_text()
        .replace("mcpServerRefs: [{name: tools}]", "mcpServerRefs: [{name: gone}]")
    )
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "render", "k8s", "-f", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "warning: MCPAgent mesh/planner: spec.mcpServerRefs[0]: no MCPServer named 'gone'" in result.stderr
    source.write_text((GOLDEN / "istio-input.yaml").read_text().replace("http://tools", "tcp://tools"))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "render", "k8s", "-f", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "MCPServer mesh/tools: spec.url" in result.stderr and "Traceback" not in result.stderr
