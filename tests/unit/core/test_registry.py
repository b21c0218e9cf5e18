"""Stage discovery and the contract checks a plugin author meets at registration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from extproc.api import Context, Stage, StageConfig, Verdict
from extproc.config.pipeline_file import PipelineConfig, StageSpec, load_pipeline_config
from extproc.core.registry import Registry
from extproc.errors import ConfigError, PluginError


def install_fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """A dist-info on sys.path declaring one `mcp_extproc.stages` entry point."""
    dist = tmp_path / "fake_stages-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-stages\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[mcp_extproc.stages]\n{entry}\n")
    (tmp_path / "fake_bomb.py").write_text("raise RuntimeError('imported a stage nobody asked for')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_bomb", raising=False)


def test_builtin_stages_load_by_entry_point() -> None:
    registry = Registry()
    assert {"mcp", "allowlist"} <= set(registry.available())
    pipeline = registry.build_pipeline(PipelineConfig(stages=[StageSpec(name="mcp"), StageSpec(name="allowlist")]))
    assert pipeline.names == ("mcp", "allowlist")


def test_only_named_stages_are_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_distribution(tmp_path, monkeypatch, "bomb = fake_bomb:Bomb")
    registry = Registry()
    assert "bomb" in registry.available()
    registry.build_pipeline(PipelineConfig(stages=[StageSpec(name="mcp")]))  # bomb is never imported
    with pytest.raises(PluginError, match=r"plugin fake_bomb:Bomb \(entry point 'bomb' of fake-stages\) failed"):
        registry.build_pipeline(PipelineConfig(stages=[StageSpec(name="bomb")]))


def test_unknown_stage_lists_what_is_installed() -> None:
    with pytest.raises(PluginError, match=r"no stage named 'nope' is installed; installed stages: \[.*'allowlist'"):
        Registry().get("nope")


class SyncHook(Stage[StageConfig]):
    name = "sync-hook"

    def on_request_body(self, ctx: Context) -> Verdict:  # type: ignore[override]
        return None


class WrongArity(Stage[StageConfig]):
    name = "wrong-arity"

    async def on_response_body(self, ctx: Context) -> Verdict:  # type: ignore[override]
        return None


class Nameless(Stage[StageConfig]):
    pass


class BadConfig(Stage[StageConfig]):
    name = "bad-config"
    Config = dict  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (
            SyncHook,
            r"stage 'sync-hook'\): hook on_request_body must be an async def; expected `async def on_request_body",
        ),
        (WrongArity, r"hook on_response_body takes 2 parameters; expected `async def on_response_body\(self, ctx"),
        (Nameless, r"class Nameless must set a non-empty `name`"),
        (BadConfig, r"`Config` must subclass extproc.api.StageConfig"),
        (int, r"is not a subclass of extproc.api.Stage"),
    ],
)
def test_registration_names_plugin_and_hook(cls: type[Stage[StageConfig]], message: str) -> None:
    with pytest.raises(PluginError, match=message):
        Registry(use_entry_points=False).register(cls)


class Configured(Stage[StageConfig]):
    name = "configured"

    class Config(StageConfig):
        limit: int = 3


def test_stage_config_errors_name_the_stage_and_field() -> None:
    registry = Registry(use_entry_points=False)
    registry.register(Configured)
    stage = registry.build(StageSpec(name="configured", config={"limit": 5}))
    assert stage.config == Configured.Config(limit=5)
    with pytest.raises(ConfigError, match=r"stage 'configured': config.limt: Extra inputs are not permitted"):
        registry.build(StageSpec(name="configured", config={"limt": 5}))


def test_pipeline_order_is_checked() -> None:
    with pytest.raises(PluginError, match=r"stage 'allowlist' requires stage 'mcp' before it"):
        Registry().build_pipeline(PipelineConfig(stages=[StageSpec(name="allowlist"), StageSpec(name="mcp")]))


def test_pipeline_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("version: v1\nstages:\n  - {name: mcp, failureMode: sometimes}\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml: stages.0.failureMode: Input should be 'closed' or 'open'"):
        load_pipeline_config(path)
    path.write_text("version: v1\nstages: [{name: mcp, failureMode: open}]\n")
    assert load_pipeline_config(path).stages[0].failure_mode.value == "open"
