"""A reload never lowers the security posture silently (``extproc.core.reload.try_reload``, in process).

Refused, with an ERROR line naming what would weaken, counted as ``result="refused"``, the
catalog in force kept: every MCPAgent removed (authentication off), every MCPToolPolicy removed
(nothing left for policy), and resources the running pipeline cannot enforce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig, StageSpec
from extproc.config.resources import Catalog, load_resources
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.core.reload import try_reload
from tests.messages import SERVER_DOC
from tests.unit.core.test_posture import AGENT, POLICY, UPSTREAM


class Reloads:
    """One resource file, the pipeline running it and the reload metrics."""

    def __init__(self, tmp_path: Path, stages: Sequence[str] | None = None) -> None:
        self.path = tmp_path / "resources.yaml"
        config = DEFAULT_PIPELINE if stages is None else PipelineConfig(stages=[StageSpec(name=n) for n in stages])
        self.pipeline: Pipeline = Registry().build_pipeline(config)
        self.metrics = Metrics()

    def load(self, *docs: Mapping[str, Any]) -> Catalog:
        self.write(*docs)
        return load_resources(self.path)

    def write(self, *docs: Mapping[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump_all([SERVER_DOC, *docs]))

    def reload(self, current: Catalog, *docs: Mapping[str, Any]) -> Catalog | None:
        self.write(*docs)
        return try_reload(self.path, self.pipeline, current, self.metrics)

    def count(self, result: str) -> float:
        value: float = self.metrics.reloads.labels(result)._value.get()
        return value


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_removing_the_last_agent_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reloads = Reloads(tmp_path)
    current = reloads.load(AGENT)
    assert reloads.reload(current, POLICY) is None
    assert (reloads.count("refused"), reloads.count("applied")) == (1, 0)
    [error] = errors(caplog)
    assert error.startswith(f"reload of {reloads.path} refused; keeping the last good resources:")
    assert (
        f"the new resources ({reloads.path}) declare no MCPAgent, but MCPAgent 'agent' is in force: "
        "authentication would be switched off and every caller served as anonymous"
    ) in error
    assert "restart with the new file to do this on purpose" in error
    assert not any(r.getMessage().startswith("reloaded") for r in caplog.records)


def test_removing_every_policy_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reloads = Reloads(tmp_path)
    current = reloads.load(AGENT, POLICY)
    assert reloads.reload(current, AGENT) is None
    assert reloads.count("refused") == 1
    [error] = errors(caplog)
    assert "declare no MCPToolPolicy, but MCPToolPolicy 'demo-policy' is in force: the policy stage" in error


def test_an_agent_the_running_pipeline_cannot_authenticate_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reloads = Reloads(tmp_path, ["mcp", "allowlist", "policy", "credentials"])
    current = reloads.load()
    assert reloads.reload(current, AGENT) is None
    assert reloads.count("refused") == 1
    [error] = errors(caplog)
    assert (
        f"the running pipeline has no 'authn' stage, but MCPAgent 'agent' ({reloads.path}) declares an identity: "
        "requests would be served unauthenticated"
    ) in error


@pytest.mark.parametrize(
    ("stages", "doc", "missing"),
    [
        (["authn", "mcp", "allowlist", "credentials"], POLICY, "'policy'"),
        (["authn", "mcp", "allowlist", "policy"], UPSTREAM, "'credentials'"),
    ],
)
def test_resources_the_running_pipeline_cannot_enforce_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stages: list[str], doc: dict[str, Any], missing: str
) -> None:
    reloads = Reloads(tmp_path, stages)
    current = reloads.load()
    assert reloads.reload(current, doc) is None
    [error] = errors(caplog)
    assert f"the running pipeline has no {missing} stage" in error


def test_ordinary_changes_are_applied(tmp_path: Path) -> None:
    reloads = Reloads(tmp_path)
    other = {**AGENT, "metadata": {"name": "other"}}
    current = reloads.load(AGENT, other, POLICY)
    one_agent = reloads.reload(current, other, POLICY)  # one of two agents removed
    assert one_agent is not None and sorted(one_agent.agents) == ["other"]
    added = reloads.reload(one_agent, other, POLICY, UPSTREAM)
    assert added is not None and added.generation == current.generation + 2
    assert (reloads.count("applied"), reloads.count("refused")) == (2, 0)


def test_without_agents_before_none_after_is_an_ordinary_reload(tmp_path: Path) -> None:
    reloads = Reloads(tmp_path)
    current = reloads.load()
    assert reloads.reload(current, POLICY) is not None
