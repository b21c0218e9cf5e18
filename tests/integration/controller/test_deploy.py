"""deploy/: kustomize (``kubectl kustomize``) builds the objects the kustomizations list."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.kubedocs import DEPLOY, kustomize_objects

pytestmark = pytest.mark.integration


def test_kustomize_builds_the_same_objects() -> None:
    kubectl = shutil.which("kubectl") or str(Path(sys.executable).with_name("kubectl"))
    for overlay in ("", "examples"):
        built = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, check=False
        )
        assert built.returncode == 0, built.stderr
        ours = sorted((o["kind"], o["metadata"]["name"]) for o in kustomize_objects(DEPLOY / overlay))
        theirs = sorted((o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(built.stdout) if o)
        assert ours == theirs
