"""The pipeline file (``--pipeline FILE``): which stages run, in order, with their configuration.

Versioned and Kubernetes-free: the same model is what the controller renders into a
sidecar's ``pipeline.yaml``. Stage configurations are validated later, against each
stage's ``Config`` model, when the registry finds the stage
(:meth:`extproc.core.registry.Registry.plan`).

Data flow::

    pipeline.yaml ──strict_yaml.load (a key written twice is refused)──▶ PipelineConfig.model_validate
                  ──▶ PipelineConfig{version, stages: [StageSpec{name, config, failureMode}]}

Whether the stages can enforce the resources is checked with the catalog, by
:func:`extproc.core.posture.posture_problems`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extproc.config import strict_yaml
from extproc.config.models import first_problem
from extproc.errors import ConfigError


class FailureMode(StrEnum):
    """What happens when a stage's hook raises (a fault, not a denial)."""

    CLOSED = "closed"
    """Refuse the exchange: HTTP 503 with a JSON-RPC error. The default."""
    OPEN = "open"
    """Skip the stage for this phase, log the fault and count it."""


class StageSpec(BaseModel):
    """One entry of the pipeline configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    failure_mode: FailureMode = Field(default=FailureMode.CLOSED, alias="failureMode")


class PipelineConfig(BaseModel):
    """The versioned, Kubernetes-free pipeline configuration (``--pipeline FILE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal["v1"] = "v1"
    stages: list[StageSpec]


DEFAULT_PIPELINE: Final = PipelineConfig(
    stages=[
        StageSpec(name=n) for n in ("authn", "mcp", "virtual", "allowlist", "policy", "pins", "credentials", "session")
    ]
)
"""The embedded default: authenticate, parse MCP, serve the virtual servers (answer their
discovery and lists, hand each call to the backend it belongs to), enforce the servers' allow-lists, then policy,
then the tool pins (``toolPinning``: ``Observe`` by default), then swap the agent's credential
for the upstream one and bind/keep legacy sessions.

``authn`` runs first so a request without a valid token costs no body round
trip; with no ``MCPAgent`` declared it lets everyone in as ``anonymous``.
``policy`` does nothing for servers no ``MCPToolPolicy`` targets.
"""


def with_stage_config(pipeline: PipelineConfig, stage: str, **values: Any) -> PipelineConfig:
    """``pipeline`` with ``values`` added to the config of the entries named ``stage``.

    A key the entry's config already sets keeps its value: the pipeline file wins.
    """
    stages = [
        spec.model_copy(update={"config": {**values, **spec.config}}) if spec.name == stage else spec
        for spec in pipeline.stages
    ]
    return pipeline.model_copy(update={"stages": stages})


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read a pipeline configuration file (YAML).

    Raises:
        ConfigError: naming the file and the field (or the line of a key written twice).
    """
    try:
        raw = strict_yaml.load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except strict_yaml.RepeatedKeyError as exc:
        raise ConfigError(exc.located(str(path), documents=False)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_problem(exc)}") from None
