"""The pipeline: an immutable, ordered list of stages and the phases they need.

Data flow for one phase of one exchange::

    adapter ──run(phase, ctx[, chunk])──▶ for each stage overriding that hook, in order:
                                             verdict = await hook(ctx[, chunk])
                                             Deny/Answer → stop, return it
                                             Continue    → merge mutations (a later stage's
                                                           word on a header wins); a new
                                                           body is what the next stage sees
                                             exception   → stage failure mode:
                                                           closed → Deny 503, open → skip
            ◀── Continue (merged) | Deny | Answer ──

A stage that sends exchanges of its own through the stages after it (the ``virtual`` stage
asks each backend of a virtual server for its lists) gets a :class:`~extproc.api.Downstream` at
construction, through its ``bind_downstream`` method, if it has one.

With tracing on, each hook runs under a span of its own (``ctx.book.trace.hook``,
:mod:`extproc.core.traces`); off, ``ctx.book.trace`` is ``None`` and the hook is awaited as is.

Which phases Envoy must send is decided once, from the hooks the stages override
(:attr:`Pipeline.plan`, the same :mod:`extproc.core.plan` the renderers use); the
bootstrap renderer turns that into the ext_proc ``processing_mode`` and the
ext_proc front door narrows it per exchange with ``mode_override``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from extproc.api import HOOK_NAMES, Answer, Context, Continue, Deny, FailureMode, Phase, Stage, Stop
from extproc.config.resources import Catalog
from extproc.core.exchange import Mutations
from extproc.core.metrics import Metrics
from extproc.core.plan import overrides, plan_of, reads_responses
from extproc.errors import PluginError
from extproc.mcp.spec import INTERNAL_ERROR

log = logging.getLogger("mcp_extproc.pipeline")


class Pipeline:
    """An ordered, immutable set of started stages."""

    def __init__(self, stages: Sequence[Stage[Any]], metrics: Metrics | None = None) -> None:
        self.plan = plan_of([(type(stage), stage.config) for stage in stages])
        self.stages: tuple[Stage[Any], ...] = tuple(stages)
        self.metrics = metrics or Metrics()
        for stage in self.stages:
            stage.bind_metrics(self.metrics.registry)
        # Histogram children looked up once: ``labels()`` costs a lock and a dict per call.
        self._timers: dict[tuple[str, Phase], Any] = {}
        self._enders = tuple(s for s in self.stages if overrides(type(s), "on_exchange_end"))
        self._by_phase: dict[Phase, tuple[Stage[Any], ...]] = {
            phase: tuple(s for s in self.stages if overrides(type(s), hook)) for phase, hook in HOOK_NAMES.items()
        }
        self._response_stages = tuple(s for s in self.stages if reads_responses(type(s)))
        self.needs = self.plan.needs
        self._position = {stage.name: index for index, stage in enumerate(self.stages)}
        for index, stage in enumerate(self.stages):
            bind = getattr(stage, "bind_downstream", None)
            if callable(bind):
                bind(_Downstream(self, index))

    @property
    def names(self) -> tuple[str, ...]:
        """The stage names, in order."""
        return self.plan.names

    async def startup(self) -> None:
        """Start every stage in order; a failure stops the ones already started."""
        started: list[Stage[Any]] = []
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
    async def _shutdown_one(stage: Stage[Any]) -> None:
        try:
            await stage.shutdown()
        except Exception:
            log.exception("stage %r failed to shut down", stage.name)

    def check(self, catalog: Catalog) -> list[str]:
        """Every stage's problems with ``catalog``, each prefixed with the stage name."""
        problems: list[str] = []
        if catalog.virtual_servers and "virtual" not in self.names:
            names = ", ".join(sorted(catalog.virtual_servers))
            problems.append(
                f"pipeline: MCPVirtualServer {names} needs the 'virtual' stage (after 'mcp'); the pipeline is "
                f"{list(self.names)}"
            )
        for stage in self.stages:
            try:
                found = stage.check(catalog)
            except Exception as exc:
                found = [f"check failed: {type(exc).__name__}: {exc}"]
            problems.extend(f"stage {stage.name!r}: {p}" for p in found)
        return problems

    def report(self) -> dict[str, Any]:
        """Every stage's :meth:`~extproc.api.Stage.report` that says something, by stage name.

        A stage whose report fails is logged and left out: one stage cannot blank the rest.
        """
        found: dict[str, Any] = {}
        for stage in self.stages:
            try:
                said = stage.report()
            except Exception:
                log.exception("stage %r: report failed", stage.name)
                continue
            if said is not None:
                found[stage.name] = said
        return found

    def check_split(self, catalog: Catalog) -> tuple[list[str], list[str]]:
        """:meth:`check`'s problems as (errors, warnings); warnings refuse nothing."""
        errors: list[str] = []
        warnings: list[str] = []
        for problem in self.check(catalog):
            (warnings if ": warning:" in problem else errors).append(problem)
        return errors, warnings

    @property
    def fast_call_eras(self) -> frozenset[str]:
        """The eras whose ``tools/call`` goes to one ext_authz ``Check`` (:func:`extproc.core.plan.fast_call_eras`)."""
        return self.plan.fast_call_eras

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

    async def run(self, phase: Phase, ctx: Context, chunk: bytes = b"", *, after: int = -1) -> Continue | Stop:
        """Run ``phase`` over every stage that overrides its hook (past position ``after``); merge their verdicts."""
        hook_name = HOOK_NAMES[phase]
        merged = Mutations()
        trace = ctx.book.trace  # None unless tracing is on (extproc.core.traces)
        for stage in self._by_phase[phase]:
            if after >= 0 and self._position[stage.name] <= after:
                continue
            hook = getattr(stage, hook_name)
            started = time.perf_counter()
            try:
                call = hook(ctx, chunk) if phase is Phase.RESPONSE_BODY else hook(ctx)
                verdict = await (call if trace is None else trace.hook(stage.name, phase, call))
            except Exception as exc:
                fault = self._fault(stage, hook_name, exc, ctx)
                if fault is None:
                    continue
                return fault
            finally:
                self._timer(stage.name, phase).observe(time.perf_counter() - started)
            if verdict is None:
                continue
            if isinstance(verdict, Deny | Answer):
                return verdict
            merged.add(verdict)
            if verdict.body is not None:
                # What the next stage sees.
                if phase is Phase.RESPONSE_BODY:
                    chunk = verdict.body
                else:
                    ctx.body = verdict.body
        return merged.result()

    def _timer(self, stage: str, phase: Phase) -> Any:
        timer = self._timers.get((stage, phase))
        if timer is None:
            timer = self._timers[stage, phase] = self.metrics.stage_seconds.labels(stage, phase.value)
        return timer

    def _fault(self, stage: Stage[Any], hook: str, exc: Exception, ctx: Context) -> Deny | None:
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


class _Downstream:
    """The stages after one stage (:class:`extproc.api.Downstream`)."""

    __slots__ = ("_after", "_pipeline")

    def __init__(self, pipeline: Pipeline, after: int) -> None:
        self._pipeline = pipeline
        self._after = after

    async def run(self, phase: Phase, ctx: Context, chunk: bytes = b"") -> Continue | Stop:
        """Run ``phase`` of ``ctx`` over the stages after the bound one."""
        return await self._pipeline.run(phase, ctx, chunk, after=self._after)
