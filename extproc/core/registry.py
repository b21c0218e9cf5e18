"""Stage discovery, validation and construction.

Data flow::

    PipelineConfig.stages ──names──▶ entry points (group ``mcp_extproc.stages``),
                                     loading only the named ones
                          ──class──▶ validate_stage_class (contract checks, errors
                                     name the plugin, the hook and the signature)
                          ──config─▶ Stage.Config.model_validate
                                  ──▶ plan: what Envoy must send (no stage built)
                                  ──▶ build_pipeline: Stage(config, failure_mode) → Pipeline

Stages can also be registered directly (``Registry.register``), which is how
tests and embedding programs add stages without installing a distribution.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final

from pydantic import ValidationError

from extproc.api import Stage, StageConfig
from extproc.config.models import first_problem
from extproc.config.pipeline_file import PipelineConfig, StageSpec
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.plan import Plan, StageClass, plan_of
from extproc.errors import ConfigError, PluginError

ENTRY_POINT_GROUP: Final = "mcp_extproc.stages"

_SIGNATURES: Final[Mapping[str, str]] = {
    "on_request_headers": "async def on_request_headers(self, ctx: Context) -> Verdict",
    "on_request_body": "async def on_request_body(self, ctx: Context) -> Verdict",
    "on_response_headers": "async def on_response_headers(self, ctx: Context) -> Verdict",
    "on_response_body": "async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict",
    "startup": "async def startup(self) -> None",
    "shutdown": "async def shutdown(self) -> None",
    "needs_response": "def needs_response(self, ctx: Context) -> bool | None",
    "bind_metrics": "def bind_metrics(self, registry: CollectorRegistry) -> None",
    "on_exchange_end": "async def on_exchange_end(self, ctx: Context) -> None",
    "check": "def check(self, catalog: Catalog) -> list[str]",
}
_PLAIN_HOOKS: Final = frozenset({"needs_response", "bind_metrics", "check"})


def validate_stage_class(cls: object, source: str) -> StageClass:
    """Check that ``cls`` honours the stage contract.

    Raises:
        PluginError: naming the plugin (``source``), the hook and the expected signature.
    """
    if not (inspect.isclass(cls) and issubclass(cls, Stage)):
        raise PluginError(f"plugin {source}: {cls!r} is not a subclass of extproc.api.Stage")
    if not isinstance(cls.name, str) or not cls.name:
        raise PluginError(f"plugin {source}: class {cls.__qualname__} must set a non-empty `name`")
    if not (inspect.isclass(cls.Config) and issubclass(cls.Config, StageConfig)):
        raise PluginError(f"plugin {source} (stage {cls.name!r}): `Config` must subclass extproc.api.StageConfig")
    for hook, signature in _SIGNATURES.items():
        impl = getattr(cls, hook)
        if impl is getattr(Stage, hook):
            continue
        expected_async = hook not in _PLAIN_HOOKS
        if inspect.iscoroutinefunction(impl) != expected_async:
            kind = "an async def" if expected_async else "a plain def"
            raise PluginError(
                f"plugin {source} (stage {cls.name!r}): hook {hook} must be {kind}; expected `{signature}`"
            )
        expected = inspect.signature(getattr(Stage, hook))
        try:
            actual = inspect.signature(impl)
        except (TypeError, ValueError):
            continue
        if len(actual.parameters) != len(expected.parameters):
            raise PluginError(
                f"plugin {source} (stage {cls.name!r}): hook {hook} takes "
                f"{len(actual.parameters)} parameters; expected `{signature}`"
            )
    return cls


class Registry:
    """Stage classes by name: registered directly, or found by entry point on demand."""

    def __init__(self, *, use_entry_points: bool = True) -> None:
        self._classes: dict[str, StageClass] = {}
        self._use_entry_points = use_entry_points

    def register(self, cls: StageClass) -> None:
        """Register a stage class (validated now, not at first use)."""
        checked = validate_stage_class(cls, f"{cls.__module__}.{cls.__qualname__}")
        self._classes[checked.name] = checked

    def available(self) -> dict[str, EntryPoint]:
        """Installed stage entry points, by name (nothing is imported)."""
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def get(self, name: str) -> StageClass:
        """The class of the stage called ``name``, loading its entry point if needed."""
        if name in self._classes:
            return self._classes[name]
        found = self.available().get(name) if self._use_entry_points else None
        if found is None:
            known = sorted(set(self._classes) | (set(self.available()) if self._use_entry_points else set()))
            raise PluginError(f"no stage named {name!r} is installed; installed stages: {known}")
        source = f"{found.value} (entry point {name!r} of {found.dist.name if found.dist else '?'})"
        try:
            loaded = found.load()
        except Exception as exc:
            raise PluginError(f"plugin {source} failed to import: {type(exc).__name__}: {exc}") from exc
        cls = validate_stage_class(loaded, source)
        if cls.name != name:
            raise PluginError(f"plugin {source}: entry point is named {name!r} but the stage says {cls.name!r}")
        self._classes[name] = cls
        return cls

    def configured(self, spec: StageSpec) -> tuple[StageClass, StageConfig]:
        """The class of one configuration entry's stage and its validated configuration.

        Raises:
            ConfigError: naming the stage and the field of its configuration.
        """
        cls = self.get(spec.name)
        try:
            config = cls.Config.model_validate(spec.config)
        except ValidationError as exc:
            raise ConfigError(f"stage {spec.name!r}: config.{first_problem(exc, '(config)')}") from None
        return cls, config

    def plan(self, config: PipelineConfig) -> Plan:
        """What the configured pipeline asks of Envoy, without building a stage (for renderers)."""
        return plan_of([self.configured(spec) for spec in config.stages])

    def build(self, spec: StageSpec) -> Stage[Any]:
        """Instantiate one stage from its configuration entry."""
        cls, config = self.configured(spec)
        return cls(config, spec.failure_mode)

    def build_pipeline(self, config: PipelineConfig, metrics: Metrics | None = None) -> Pipeline:
        """Instantiate every configured stage, in order, into a :class:`Pipeline`."""
        return Pipeline([self.build(spec) for spec in config.stages], metrics)
