"""One benchmark run: set up the stack, check it, measure every cell, collect the rows.

Configurations, all in front of the same canned upstream::

    plain      wrk ─▶ Envoy ─────────────────────────────▶ upstream Envoy
    none       wrk ─▶ Envoy ─ext_proc─▶ mcp-extproc (stages: [])  ─▶ upstream
    default    wrk ─▶ Envoy ─ext_proc─▶ mcp-extproc (mcp, allowlist) ─▶ upstream
    external   the same plus the ``external`` stage calling one external stage service
               (``bench.stage``, one Process per tools/call) over TCP, or over a unix socket

``none`` and ``default`` get the same ext_proc filter (rendered from the default
pipeline's needs), so ``none`` shows what the framework and gRPC cost before any
stage runs. Cells run interleaved: for each request shape and load, every
configuration in turn, the order rotated between cells so drift does not
always favour the same configuration.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from bench.checks import sanity_check
from bench.report import Row
from bench.shapes import ALLOWED_TOOL, SHAPES, Shape, wrk_script
from bench.stack import Envoy, Stack
from bench.wrk import WrkResult, run_wrk
from extproc.pipeline import PhaseNeeds
from extproc.registry import DEFAULT_PIPELINE, Registry, load_pipeline_config
from extproc.resources import parse_documents

LATENCY_LOAD: Final = (1, 1)
"""wrk threads and connections for the latency cells."""
THROUGHPUT_LOAD: Final = (2, 16)
"""wrk threads and connections for the throughput cells."""
SERVER: Final = "bench"
PLAIN: Final = "plain Envoy"
NO_STAGES: Final = "ext_proc, no stages"
DEFAULT: Final = "default pipeline"
EXTERNAL_TCP: Final = "+ external stage, TCP"
EXTERNAL_UNIX: Final = "+ external stage, unix"

_UPSTREAM_RQ: Final = "http.canned.downstream_rq_completed"
_FRONT_RQ: Final = "http.mcp.downstream_rq_completed"
_EXTPROC_MSGS: Final = "http.mcp.ext_proc.stream_msgs_sent"


@dataclass(frozen=True)
class Target:
    """A configuration under test: its label and its front Envoy."""

    label: str
    envoy: Envoy
    enforces_allowlist: bool
    external: bool = False

    @property
    def url(self) -> str:
        """Where the benchmark sends its MCP requests."""
        return f"{self.envoy.base_url}/{SERVER}/mcp"


def extproc_argv() -> list[str]:
    """``mcp-extproc`` beside this Python (the venv's console script), else ``python -m extproc``."""
    script = Path(sys.executable).with_name("mcp-extproc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "extproc"]


def _external_pipeline(path: Path, address: str) -> Path:
    stages: list[dict[str, Any]] = [{"name": spec.name} for spec in DEFAULT_PIPELINE.stages]
    stages.append({"name": "external", "config": {"services": [{"address": address}]}})
    path.write_text(yaml.safe_dump({"version": "v1", "stages": stages}))
    return path


def build_targets(stack: Stack, *, external: bool = True) -> tuple[Envoy, list[Target]]:
    """Start the upstream, the gRPC servers (and external stages) and the front Envoys."""
    upstream = stack.start_upstream()
    doc = {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": SERVER},
        "spec": {"url": f"{upstream.base_url}/mcp", "allowedTools": [ALLOWED_TOOL]},
    }
    catalog = parse_documents([doc], "bench")
    resources = stack.workdir / "resources.yaml"
    resources.write_text(yaml.safe_dump(doc, sort_keys=False))
    empty = stack.workdir / "no-stages.yaml"
    empty.write_text("version: v1\nstages: []\n")
    needs = Registry().build_pipeline(DEFAULT_PIPELINE).needs

    none_sock = stack.start_extproc("extproc-none", resources, empty)
    default_sock = stack.start_extproc("extproc-default", resources, None)
    targets = [
        Target(PLAIN, stack.start_front("plain", catalog, PhaseNeeds(False, False, False, False), none_sock), False),
        Target(NO_STAGES, stack.start_front("none", catalog, needs, none_sock), False),
        Target(DEFAULT, stack.start_front("default", catalog, needs, default_sock), True),
    ]
    if external:
        for label, name, address in (
            (EXTERNAL_TCP, "external-tcp", "127.0.0.1:0"),
            (EXTERNAL_UNIX, "external-unix", f"unix:{stack.workdir}/bench-stage.sock"),
        ):
            pipeline = _external_pipeline(stack.workdir / f"{name}.yaml", stack.start_stage(f"{name}-stage", address))
            ext_needs = Registry().build_pipeline(load_pipeline_config(pipeline)).needs
            sock = stack.start_extproc(f"extproc-{name}", resources, pipeline)
            targets.append(Target(label, stack.start_front(name, catalog, ext_needs, sock), True, external=True))
    return upstream, targets


@dataclass
class _Cell:
    latency: WrkResult | None = None
    throughput: WrkResult | None = None
    msgs_per_request: float = 0.0
    upstream_share: float = 0.0


def _measure(
    target: Target, upstream: Envoy, script: Path, load: tuple[int, int], duration_s: float, warmup_s: float
) -> tuple[WrkResult, float, float]:
    """Warm up, then measure; also returns ext_proc messages per request and the upstream share."""
    threads, connections = load
    run_wrk(target.url, script, threads=threads, connections=connections, duration_s=warmup_s)
    before, up_before = target.envoy.counters("http.mcp."), upstream.counters("http.canned.")
    result = run_wrk(target.url, script, threads=threads, connections=connections, duration_s=duration_s)
    after, up_after = target.envoy.counters("http.mcp."), upstream.counters("http.canned.")
    answered = after.get(_FRONT_RQ, 0) - before.get(_FRONT_RQ, 0)
    msgs = after.get(_EXTPROC_MSGS, 0) - before.get(_EXTPROC_MSGS, 0)
    reached = up_after.get(_UPSTREAM_RQ, 0) - up_before.get(_UPSTREAM_RQ, 0)
    return result, msgs / answered if answered else 0.0, reached / answered if answered else 0.0


def measure(
    upstream: Envoy,
    targets: Sequence[Target],
    workdir: Path,
    *,
    duration_s: float,
    warmup_s: float,
    progress: Callable[[str], None],
    shapes: Sequence[Shape] = SHAPES,
) -> list[Row]:
    """Sanity-check every target, then measure every (shape, load, target) cell."""
    for target in targets:
        sanity_check(
            target.label, target.url, shapes, enforces_allowlist=target.enforces_allowlist, external=target.external
        )
    progress(
        "sanity check passed: every configuration answers 200 with the canned result; "
        "the default pipeline refuses a tool outside allowedTools with -32003"
    )
    cells: dict[tuple[str, str], _Cell] = {(s.name, t.label): _Cell() for s in shapes for t in targets}
    rotation = 0
    for shape in shapes:
        script = workdir / f"wrk-{shape.name}.lua"
        script.write_text(wrk_script(shape))
        for kind, load in (("latency", LATENCY_LOAD), ("throughput", THROUGHPUT_LOAD)):
            order = [*targets[rotation:], *targets[:rotation]]
            rotation = (rotation + 1) % len(targets)
            for target in order:
                started = time.monotonic()
                result, msgs, share = _measure(target, upstream, script, load, duration_s, warmup_s)
                cell = cells[(shape.name, target.label)]
                if kind == "latency":
                    cell.latency = result
                else:
                    cell.throughput, cell.msgs_per_request, cell.upstream_share = result, msgs, share
                progress(
                    f"{shape.name} {kind:<10} {target.label:<20} p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms"
                    f"  {result.rps:,.0f} req/s  errors {result.errors}  ({time.monotonic() - started:.0f} s)"
                )
    rows = []
    for shape in shapes:
        for target in targets:
            cell = cells[(shape.name, target.label)]
            assert cell.latency is not None and cell.throughput is not None
            rows.append(
                Row(shape.name, target.label, cell.latency, cell.throughput, cell.msgs_per_request, cell.upstream_share)
            )
    return rows
