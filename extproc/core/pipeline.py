"""The pipeline: an immutable, ordered list of stages and the phases they need.

Data flow for one phase of one exchange::

    adapter ──run(phase, ctx[, chunk])──▶ for each stage overriding that hook, in order:
                                             verdict = await hook(ctx[, chunk])
                                             Deny      → stop, return it
                                             Continue  → merge mutations; a new body is
                                                         what the next stage sees
                                             exception → stage failure mode:
                                                         closed → Deny 503, open → skip
            ◀── Outcome(Continue | Deny) ──

Which phases Envoy must send is decided here, once, from the hooks the stages
override (:class:`PhaseNeeds`); the bootstrap renderer turns that into the
ext_proc ``processing_mode`` and the adapter narrows it per exchange with
``mode_override``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc.api import HOOK_NAMES, Context, Continue, Deny, FailureMode, Phase, Stage
from extproc.config.resources import Catalog
from extproc.core.metrics import Metrics
from extproc.errors import PluginError
from extproc.mcp.spec import INTERNAL_ERROR

log = logging.getLogger("mcp_extproc.pipeline")


@dataclass(frozen=True, slots=True)
class PhaseNeeds:
    """Which ext_proc phases at least one stage reads."""

    request_headers: bool
    request_body: bool
    response_headers: bool
    response_body: bool

    @property
    def response(self) -> bool:
        """True when any stage reads the response (headers or body)."""
        return self.response_headers or self.response_body


def overrides(stage: Stage, hook: str) -> bool:
    """True when ``stage`` overrides the base class's ``hook``."""
    return getattr(type(stage), hook) is not getattr(Stage, hook)


class Pipeline:
    """An ordered, immutable set of started stages."""

    def __init__(self, stages: Sequence[Stage], metrics: Metrics | None = None) -> None:
        names = [stage.name for stage in stages]
        for index, stage in enumerate(stages):
            for required in stage.requires:
                if required not in names[:index]:
                    raise PluginError(
                        f"stage {stage.name!r} requires stage {required!r} before it in the pipeline; "
                        f"the pipeline is {names}"
                    )
        if len(set(names)) != len(names):
            raise PluginError(f"a stage is listed twice in the pipeline {names}")
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.metrics = metrics or Metrics()
        for stage in self.stages:
            stage.bind_metrics(self.metrics.registry)
        # Histogram children looked up once: ``labels()`` costs a lock and a dict per call.
        self._timers: dict[tuple[str, Phase], Any] = {}
        self._enders = tuple(s for s in self.stages if overrides(s, "on_exchange_end"))
        self._by_phase: dict[Phase, tuple[Stage, ...]] = {
            phase: tuple(s for s in self.stages if overrides(s, hook)) for phase, hook in HOOK_NAMES.items()
        }
        response_stages = self._by_phase[Phase.RESPONSE_HEADERS] + self._by_phase[Phase.RESPONSE_BODY]
        self._response_stages = tuple(s for s in self.stages if s in response_stages)
        self.needs = PhaseNeeds(
            request_headers=bool(self._by_phase[Phase.REQUEST_HEADERS]) or bool(self._by_phase[Phase.REQUEST_BODY]),
            request_body=bool(self._by_phase[Phase.REQUEST_BODY]),
            # Response bodies are switched on per exchange from the response headers,
            # so a stage that reads bodies needs the headers phase too.
            response_headers=bool(response_stages),
            response_body=bool(self._by_phase[Phase.RESPONSE_BODY]),
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The stage names, in order."""
        return tuple(stage.name for stage in self.stages)

    async def startup(self) -> None:
        """Start every stage in order; a failure stops the ones already started."""
        started: list[Stage] = []
        for stage in self.stages:
            try:
                await stage.startup()
            except Exception as exc:
                for done in reversed(started):
                    await self._shutdown_one(done)
                raise PluginError(f"stage {stage.name!r} failed to start: {type(exc).__name__}: {exc}") from exc
            started.append(stage)

    async def shutdown(self) -> None:
        """Shut every stage down, in reverse order; errors are logged, not raised."""
        for stage in reversed(self.stages):
            await self._shutdown_one(stage)

    @staticmethod
    async def _shutdown_one(stage: Stage) -> None:
        try:
            await stage.shutdown()
        except Exception:
            log.exception("stage %r failed to shut down", stage.name)

    def check(self, catalog: Catalog) -> list[str]:
        """Every stage's problems with ``catalog``, each prefixed with the stage name."""
        problems: list[str] = []
        for stage in self.stages:
            try:
                found = stage.check(catalog)
            except Exception as exc:
                found = [f"check failed: {type(exc).__name__}: {exc}"]
            problems.extend(f"stage {stage.name!r}: {p}" for p in found)
        return problems

    def check_split(self, catalog: Catalog) -> tuple[list[str], list[str]]:
        """:meth:`check`'s problems as (errors, warnings); warnings refuse nothing."""
        errors: list[str] = []
        warnings: list[str] = []
        for problem in self.check(catalog):
            (warnings if ": warning:" in problem else errors).append(problem)
        return errors, warnings

    @property
    def fast_call_eras(self) -> frozenset[str]:
        """The eras whose ``tools/call`` no stage needs ext_proc for (see ``Stage.calls_need_ext_proc``).

        For those, a ``tools/call`` is decided from the request alone, so Envoy
        can ask with one ext_authz ``Check`` instead of ext_proc (the ``auto``
        front door). A stage must also be able to run behind ext_authz, which
        every request-side stage can: the hooks are the same. Without the ``mcp``
        stage nothing parses the call, so nothing could check that Envoy routed
        it right: no era is fast then.
        """
        if "mcp" not in self.names:
            return frozenset()
        eras = {"legacy", "modern"}
        for stage in self._response_stages + self._by_phase[Phase.REQUEST_BODY]:
            eras -= stage.calls_need_ext_proc
        return frozenset(eras)

    def needs_response(self, ctx: Context) -> bool:
        """After the request headers: must Envoy send this exchange's response at all?"""
        if not self._response_stages:
            return False
        return any(stage.needs_response(ctx) is not False for stage in self._response_stages)

    async def end(self, ctx: Context) -> None:
        """The exchange's ext_proc stream ended: tell the stages that asked (errors are logged)."""
        for stage in self._enders:
            try:
                await stage.on_exchange_end(ctx)
            except Exception as exc:
                self.metrics.stage_faults.labels(stage.name, stage.failure_mode.value).inc()
                ctx.log.error("stage %r raised in on_exchange_end: %s: %s", stage.name, type(exc).__name__, exc)

    async def run(self, phase: Phase, ctx: Context, chunk: bytes = b"") -> Continue | Deny:
        """Run ``phase`` over every stage that overrides its hook; merge their verdicts."""
        hook_name = HOOK_NAMES[phase]
        set_headers: dict[str, str] = {}
        remove_headers: list[str] = []
        metadata: dict[str, Any] = {}
        body: bytes | None = None
        for stage in self._by_phase[phase]:
            hook = getattr(stage, hook_name)
            started = time.perf_counter()
            try:
                verdict = await (hook(ctx, chunk) if phase is Phase.RESPONSE_BODY else hook(ctx))
            except Exception as exc:
                fault = self._fault(stage, hook_name, exc, ctx)
                if fault is None:
                    continue
                return fault
            finally:
                self._timer(stage.name, phase).observe(time.perf_counter() - started)
            if verdict is None:
                continue
            if isinstance(verdict, Deny):
                return verdict
            # A later stage's word on a header wins over an earlier one's.
            for name in verdict.remove_headers:
                set_headers.pop(name, None)
            remove_headers = [n for n in remove_headers if n not in verdict.set_headers]
            set_headers.update(verdict.set_headers)
            remove_headers.extend(verdict.remove_headers)
            metadata.update(verdict.metadata)
            if verdict.body is not None:
                body = verdict.body
                if phase is Phase.RESPONSE_BODY:
                    chunk = verdict.body
                else:
                    ctx.body = verdict.body
        return Continue(set_headers=set_headers, remove_headers=tuple(remove_headers), body=body, metadata=metadata)

    def _timer(self, stage: str, phase: Phase) -> Any:
        timer = self._timers.get((stage, phase))
        if timer is None:
            timer = self._timers[stage, phase] = self.metrics.stage_seconds.labels(stage, phase.value)
        return timer

    def _fault(self, stage: Stage, hook: str, exc: Exception, ctx: Context) -> Deny | None:
        mode = stage.failure_mode
        self.metrics.stage_faults.labels(stage.name, mode.value).inc()
        ctx.log.error(
            "stage %r raised in %s (failure mode %s): %s: %s",
            stage.name,
            hook,
            mode.value,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        if mode is FailureMode.OPEN:
            return None
        return Deny(
            status=503,
            code=INTERNAL_ERROR,
            message=f"the {stage.name!r} stage failed; the request was not forwarded",
            reason=f"stage_fault:{stage.name}",
        )
