"""Fixtures both test trees use: the fake Kubernetes API server (``tests.fakekube``) on loopback,
the local token issuer (``tests.idp``, one per test module) and a started default pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from tests.fakekube import FakeApiServer, fake_api_server
from tests.idp import Idp, running_idp


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with fake_api_server() as server:
        yield server


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    with running_idp() as running:
        yield running


@pytest.fixture
async def pipeline() -> AsyncIterator[Pipeline]:
    built = Registry().build_pipeline(DEFAULT_PIPELINE)
    await built.startup()
    yield built
    await built.shutdown()
