"""Sidecar injection: the egress init container's iptables script is valid shell (``sh -n``)."""

from __future__ import annotations

import subprocess

import pytest

from controller.render.inject import egress_script
from controller.render.meta import ControllerSettings

pytestmark = pytest.mark.integration

SETTINGS = ControllerSettings()


def test_egress_script_is_valid_shell() -> None:
    checked = subprocess.run(["sh", "-n", "-c", egress_script(SETTINGS)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
