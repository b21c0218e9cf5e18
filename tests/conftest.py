"""Fixtures both test trees use: the fake Kubernetes API server (``tests.fakekube``) on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakekube import FakeApiServer, fake_api_server


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with fake_api_server() as server:
        yield server
