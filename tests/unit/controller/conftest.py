"""Fixtures: a Kube client (the real kubernetes client) for the fake API server (``api``, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from controller.runtime.kube import Kube
from tests.fakekube import FakeApiServer


@pytest.fixture
def kube(api: FakeApiServer) -> Iterator[Kube]:
    configuration = client.Configuration(host=api.url)
    with client.ApiClient(configuration) as api_client:
        yield Kube(api_client, timeout_s=10)
