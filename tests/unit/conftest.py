"""In-process fixtures for every unit test: a catalog, a registry, the default pipeline configuration.

The Envoy-shaped messages they go with are in ``tests.messages``.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from extproc import tracing
from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog, parse_documents
from extproc.core.registry import Registry

# Re-exported: tests/unit/test_testing_harness.py takes these from here.
from tests.messages import SERVER_DOC as SERVER_DOC
from tests.messages import body_msg as body_msg
from tests.messages import headers_msg as headers_msg
from tests.messages import mutated as mutated
from tests.messages import post_headers as post_headers

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

# regopy reads ``platform.uname()[0]`` when it is imported, and filling in that tuple makes
# ``platform`` run ``uname -p`` for the processor field. Give the field a value here (what
# ``uname -p``'s "unknown" becomes), so that no test in this tree starts a process.
vars(platform.uname()).setdefault("processor", "")


@pytest.fixture
def catalog() -> Catalog:
    return parse_documents([SERVER_DOC], "test")


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
def default_config() -> Any:
    return DEFAULT_PIPELINE


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory: the spans a test's exchanges made (``get_finished_spans()``)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.start(tracing.Target("http/protobuf", "http://127.0.0.1:9/v1/traces"), exporter)
    try:
        yield exporter
    finally:
        tracing.stop()
