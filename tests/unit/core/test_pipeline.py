"""The pipeline: verdict merging, the first denial winning, and failure modes."""

from __future__ import annotations

import pytest

from extproc.api import Context, Continue, Deny, FailureMode, Phase, Stage, StageConfig, Verdict
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline


class Boom(Stage[StageConfig]):
    name = "boom"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        raise RuntimeError("policy backend exploded")


class Tag(Stage[StageConfig]):
    name = "tag"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        return Continue(set_headers={"x-a": "1", "x-b": "tag"}, metadata={"tagged": True})


class Untag(Stage[StageConfig]):
    name = "untag"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        return Continue(set_headers={"x-b": "untag"}, remove_headers=("x-a",))


class Refuse(Stage[StageConfig]):
    name = "refuse"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        return Deny(status=403, code=-32003, message="no", reason="test")


class NeverCalled(Stage[StageConfig]):
    name = "never"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        raise AssertionError("a stage after a denial must not run")


def ctx() -> Context:
    return Context(request_id="r", http_method="POST", path="/x/mcp", request_headers={})


def make(*stages: type[Stage[StageConfig]], mode: FailureMode = FailureMode.CLOSED) -> Pipeline:
    return Pipeline([cls(StageConfig(), mode) for cls in stages], Metrics())


async def test_later_stages_win_on_headers_and_metadata_merges() -> None:
    outcome = await make(Tag, Untag).run(Phase.REQUEST_HEADERS, ctx())
    assert isinstance(outcome, Continue)
    assert dict(outcome.set_headers) == {"x-b": "untag"}
    assert outcome.remove_headers == ("x-a",)
    assert outcome.metadata == {"tagged": True}


async def test_first_denial_wins_and_stops_the_phase() -> None:
    outcome = await make(Tag, Refuse, NeverCalled).run(Phase.REQUEST_HEADERS, ctx())
    assert isinstance(outcome, Deny)
    assert outcome.status == 403


async def test_fault_in_a_closed_stage_denies_with_503() -> None:
    pipeline = make(Boom, NeverCalled)
    outcome = await pipeline.run(Phase.REQUEST_HEADERS, ctx())
    assert isinstance(outcome, Deny)
    assert (outcome.status, outcome.code) == (503, -32603)
    assert "boom" in outcome.message
    assert "exploded" not in outcome.message  # internals stay in the log
    assert pipeline.metrics.stage_faults.labels("boom", "closed")._value.get() == 1


async def test_fault_in_an_open_stage_is_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    pipeline = Pipeline([Boom(StageConfig(), FailureMode.OPEN), Tag(StageConfig())], Metrics())
    outcome = await pipeline.run(Phase.REQUEST_HEADERS, ctx())
    assert isinstance(outcome, Continue)
    assert outcome.set_headers["x-a"] == "1"
    assert pipeline.metrics.stage_faults.labels("boom", "open")._value.get() == 1
    assert "stage 'boom' raised in on_request_headers" in caplog.text


def test_phase_needs_follow_the_overridden_hooks() -> None:
    needs = make(Tag).needs
    assert (needs.request_headers, needs.request_body, needs.response_headers, needs.response_body) == (
        True,
        False,
        False,
        False,
    )
    assert make().needs.response is False
