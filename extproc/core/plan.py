"""What a pipeline asks of Envoy, from stage classes and validated configurations alone. Pure.

The renderers (``up``, ``render envoy``, the controller's sidecars) need three facts
about a pipeline, and must get them without building a stage (a built stage may
open clients)::

    [(stage class, validated Config), ...] in pipeline order
        ──▶ requires: every stage's required stages come before it (PluginError)
        ──▶ needs:    which ext_proc phases some stage reads (its overridden hooks)
        ──▶ fast_call_eras: the eras whose tools/call no stage needs ext_proc for
        ──▶ max_request_bytes: the largest request body any stage accepts
        = Plan

:class:`extproc.core.pipeline.Pipeline` derives its own from the same functions, so
the running server and the rendered Envoy always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from extproc.api import HOOK_NAMES, Phase, Stage, StageConfig
from extproc.errors import PluginError
from extproc.mcp.jsonrpc import DEFAULT_MAX_REQUEST_BYTES
from extproc.render.options import PhaseNeeds

StageClass: TypeAlias = type[Stage[Any]]
_RESPONSE_HOOKS = (HOOK_NAMES[Phase.RESPONSE_HEADERS], HOOK_NAMES[Phase.RESPONSE_BODY])


def overrides(cls: StageClass, hook: str) -> bool:
    """True when the stage class overrides the base class's ``hook``."""
    return getattr(cls, hook) is not getattr(Stage, hook)


def phases_of(cls: StageClass) -> list[Phase]:
    """The phases whose hooks ``cls`` overrides (for listings and docs)."""
    return [phase for phase, hook in HOOK_NAMES.items() if overrides(cls, hook)]


def reads_responses(cls: StageClass) -> bool:
    """True when the stage class overrides a response hook."""
    return any(overrides(cls, hook) for hook in _RESPONSE_HOOKS)


def check_order(classes: Sequence[StageClass]) -> None:
    """Every stage's ``requires`` come before it, and no stage is listed twice.

    Raises:
        PluginError: naming the stage, what it requires and the pipeline.
    """
    names = [cls.name for cls in classes]
    for index, cls in enumerate(classes):
        for required in cls.requires:
            if required not in names[:index]:
                raise PluginError(
                    f"stage {cls.name!r} requires stage {required!r} before it in the pipeline; the pipeline is {names}"
                )
    if len(set(names)) != len(names):
        raise PluginError(f"a stage is listed twice in the pipeline {names}")


def phase_needs(classes: Sequence[StageClass]) -> PhaseNeeds:
    """Which ext_proc phases at least one stage reads."""

    def some(phase: Phase) -> bool:
        return any(overrides(cls, HOOK_NAMES[phase]) for cls in classes)

    return PhaseNeeds(
        request_headers=some(Phase.REQUEST_HEADERS) or some(Phase.REQUEST_BODY),
        request_body=some(Phase.REQUEST_BODY),
        # Response bodies are switched on per exchange from the response headers,
        # so a stage that reads bodies needs the headers phase too.
        response_headers=any(reads_responses(cls) for cls in classes),
        response_body=some(Phase.RESPONSE_BODY),
    )


def fast_call_eras(stages: Sequence[tuple[StageClass, StageConfig]]) -> frozenset[str]:
    """The eras whose ``tools/call`` no stage needs ext_proc for (see ``Stage.calls_need_ext_proc``).

    For those, a ``tools/call`` is decided from the request alone, so Envoy can ask
    with one ext_authz ``Check`` instead of ext_proc (the ``auto`` front door). Only
    stages that read the request body or the response are asked. Without the ``mcp``
    stage nothing parses the call, so nothing could check that Envoy routed it right:
    no era is fast then.
    """
    if "mcp" not in {cls.name for cls, _ in stages}:
        return frozenset()
    eras = {"legacy", "modern"}
    for cls, config in stages:
        if reads_responses(cls) or overrides(cls, HOOK_NAMES[Phase.REQUEST_BODY]):
            eras -= cls.eras_needing_ext_proc(config)
    return frozenset(eras)


def max_request_bytes(stages: Sequence[tuple[StageClass, StageConfig]]) -> int:
    """The request size limit Envoy must buffer up to: the largest any stage configures."""
    limits = [cls.max_request_bytes(config) for cls, config in stages]
    return max([DEFAULT_MAX_REQUEST_BYTES, *[limit for limit in limits if limit is not None]])


@dataclass(frozen=True, slots=True)
class Plan:
    """What a pipeline asks of Envoy (see the module docstring)."""

    names: tuple[str, ...]
    needs: PhaseNeeds
    fast_call_eras: frozenset[str]
    max_request_bytes: int


def plan_of(stages: Sequence[tuple[StageClass, StageConfig]]) -> Plan:
    """The :class:`Plan` of stage classes with their validated configurations, in order.

    Raises:
        PluginError: a stage's required stage does not come before it, or a stage is listed twice.
    """
    classes = [cls for cls, _ in stages]
    check_order(classes)
    return Plan(
        names=tuple(cls.name for cls in classes),
        needs=phase_needs(classes),
        fast_call_eras=fast_call_eras(stages),
        max_request_bytes=max_request_bytes(stages),
    )
