"""One benchmark run: set up the stack, check it, measure every cell, collect the rows.

Configurations, all in front of the same canned upstream::

    plain                 wrk ─▶ Envoy ──────────────────────────────▶ upstream Envoy
    ext_proc, no stages   wrk ─▶ Envoy ─ext_proc─▶ mcp-extproc (stages: []) ─▶ upstream
    4 stages, ext_proc    mcp, allowlist, policy, credentials; every request through ext_proc
    4 stages, auto        the same stages, front door ``auto``: a tools/call is one ext_authz Check
    6 stages, ext_proc    the default pipeline (+ authn, session), everything through ext_proc
    6 stages, auto        the default pipeline, front door ``auto``
    external              the default pipeline (auto) plus the ``external`` stage calling one
                          external stage service (``bench.stage``) over TCP, or over a unix socket

The resources give the stages real work: an MCPToolPolicy with a rule and an
embedded Rego module, and a static upstream bearer from a Secret. ``ext_proc, no
stages`` gets the same ext_proc filter as the pipelines (rendered from the default
pipeline's needs), so it shows what the framework and gRPC cost before any stage
runs.

What is measured is a list of groups of cases (:class:`Case`), one group per request: the
``tools/call`` configurations above for each shape (:func:`call_cases`), and the
virtual server rows (:mod:`bench.virtual`). Cells run interleaved: for each group and
load, every case of the group in turn, the order rotated between cells so drift does
not always favour the same configuration; with ``rounds`` > 1 the whole sequence repeats
and each cell reports the median of its rounds (on a shared 2-core VM one 10 s run of
the same cell moved by ±0.3 ms at p50 between runs; the median of interleaved rounds
moves less).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from bench.checks import sanity_check
from bench.report import Row
from bench.shapes import ALLOWED_TOOL, Shape, wrk_script
from bench.stack import Envoy, Stack
from bench.wrk import WrkResult, median_of, run_wrk
from extproc.api import Principal
from extproc.config.pipeline_file import DEFAULT_PIPELINE, load_pipeline_config
from extproc.config.resources import Catalog, parse_documents
from extproc.config.session_keys import load_key_set
from extproc.core.registry import Registry
from extproc.render.options import PhaseNeeds
from plugins.lib.session_ids import SessionIds

LATENCY_LOAD: Final = (1, 1)
"""wrk threads and connections for the latency cells."""
THROUGHPUT_LOAD: Final = (2, 16)
"""wrk threads and connections for the throughput cells."""
SERVER: Final = "bench"
PLAIN: Final = "plain Envoy"
NO_STAGES: Final = "ext_proc, no stages"
EXTERNAL_TCP: Final = "+ external stage, TCP"
EXTERNAL_UNIX: Final = "+ external stage, unix"
FOUR_STAGES: Final = ("mcp", "allowlist", "policy", "credentials")
"""The issue's pipeline: everything but authn (no agents declared) and session."""
API_VERSION: Final = "mcp.extproc.io/v1alpha1"
UPSTREAM_TOKEN: Final = "bench-upstream-token"  # noqa: S105 - a made-up token the canned upstream ignores
_POLICY_REGO: Final = """package mcp
import rego.v1
default allow := true
allow := false if { input.tool == "echo"; input.arguments.text == "forbidden" }
"""

_UPSTREAM_RQ: Final = "http.canned.downstream_rq_completed"
_FRONT_RQ: Final = "http.mcp.downstream_rq_completed"
_EXTPROC_MSGS: Final = "http.mcp.ext_proc.stream_msgs_sent"
_AUTHZ_CALLS: Final = ("http.mcp.ext_authz.ok", "http.mcp.ext_authz.denied", "http.mcp.ext_authz.error")


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


@dataclass(frozen=True)
class Case:
    """One row of the report: a request sent to one configuration.

    Attributes:
        request: The report's request column; the cases of one group share it.
        config: The configuration's label.
        envoy: The front Envoy it goes through.
        url: Where it is sent.
        shape: What is sent.
        baseline: The ``config`` of the case of the same group this one is compared with.
        upstream_per_request: Requests the upstream must see per request answered.
    """

    request: str
    config: str
    envoy: Envoy
    url: str
    shape: Shape
    baseline: str
    upstream_per_request: int = 1


def extproc_argv() -> list[str]:
    """``mcp-extproc`` beside this Python (the venv's console script), else ``python -m extproc``."""
    script = Path(sys.executable).with_name("mcp-extproc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "extproc"]


def pipeline_file(path: Path, stages: Sequence[str], external: str | None = None) -> Path:
    """Write a pipeline file of ``stages`` (plus the ``external`` stage calling ``external``) to ``path``."""
    entries: list[dict[str, Any]] = [{"name": name} for name in stages]
    if external is not None:
        # The benchmark stage reads no response and rewrites nothing: it vouches for the fast route.
        entries.append({"name": "external", "config": {"services": [{"address": external}], "fastCalls": True}})
    path.write_text(yaml.safe_dump({"version": "v1", "stages": entries}))
    return path


def documents(urls: Mapping[str, str], allowed_tools: Sequence[str] = (ALLOWED_TOOL,)) -> list[dict[str, Any]]:
    """An MCPServer per name in ``urls`` (at its URL, with a static upstream bearer), their Secret, and a
    policy with a rule and Rego targeting them all."""
    servers = [
        {
            "apiVersion": API_VERSION,
            "kind": "MCPServer",
            "metadata": {"name": name},
            "spec": {
                "url": url,
                "allowedTools": list(allowed_tools),
                "upstreamAuth": {"bearer": {"secretRef": {"name": "bench-upstream", "key": "token"}}},
            },
        }
        for name, url in urls.items()
    ]
    return [
        *servers,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bench-upstream"},
            "stringData": {"token": UPSTREAM_TOKEN},
        },
        {
            "apiVersion": API_VERSION,
            "kind": "MCPToolPolicy",
            "metadata": {"name": "bench-policy"},
            "spec": {
                "targetRefs": [{"kind": "MCPServer", "name": name} for name in urls],
                "rules": [{"tools": ["delete_*"], "action": "Deny"}, {"tools": [ALLOWED_TOOL], "requiredTrust": "low"}],
                "rego": {"query": "data.mcp.allow", "module": _POLICY_REGO},
            },
        },
    ]


def mint_session_id(key_file: Path, server: str = SERVER) -> str:
    """A session id of ``server`` for the anonymous caller, signed with the key set every
    ``serve`` of the bench is given (created here, before any starts)."""
    keys = load_key_set(key_file, create=True)
    return SessionIds(keys).mint("bench-upstream-session", server, Principal(subject="anonymous").key, None)


def write_resources(path: Path, docs: list[dict[str, Any]]) -> Catalog:
    """Write ``docs`` to ``path`` (what ``serve -f`` reads); returns their catalog (the front Envoy's routes)."""
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return parse_documents(docs, "bench")


def build_targets(stack: Stack, upstream: Envoy, *, external: bool = True) -> list[Target]:
    """Start the gRPC servers (and external stages) and the front Envoys of the ``tools/call`` configurations."""
    resources = stack.workdir / "resources.yaml"
    catalog = write_resources(resources, documents({SERVER: f"{upstream.base_url}/mcp"}))
    work = stack.workdir
    default_names = [spec.name for spec in DEFAULT_PIPELINE.stages]
    pipelines = {
        "none": pipeline_file(work / "no-stages.yaml", []),
        "four": pipeline_file(work / "four.yaml", FOUR_STAGES),
        "six": pipeline_file(work / "six.yaml", default_names),
    }
    built = {key: Registry().build_pipeline(load_pipeline_config(path)) for key, path in pipelines.items()}
    needs = built["six"].needs
    # The baseline runs no stage: bench.bare, since serve refuses a pipeline that enforces nothing.
    socks = {
        key: stack.start_extproc(f"extproc-{key}", resources, None if key == "none" else path)
        for key, path in pipelines.items()
    }
    off = PhaseNeeds(False, False, False, False)
    targets = [
        Target(PLAIN, stack.start_front("plain", catalog, off, socks["none"]), False),
        Target(NO_STAGES, stack.start_front("none", catalog, needs, socks["none"]), False),
    ]
    for key, label in (("four", "4 stages"), ("six", "6 stages")):
        pipeline = built[key]
        front = stack.start_front(f"{key}-ext-proc", catalog, pipeline.needs, socks[key])
        targets.append(Target(f"{label}, ext_proc", front, True))
        front = stack.start_front(f"{key}-auto", catalog, pipeline.needs, socks[key], pipeline.fast_call_eras)
        targets.append(Target(f"{label}, auto", front, True))
    if external:
        for label, name, address in (
            (EXTERNAL_TCP, "external-tcp", "127.0.0.1:0"),
            (EXTERNAL_UNIX, "external-unix", f"unix:{work}/bench-stage.sock"),
        ):
            listening = stack.start_stage(f"{name}-stage", address)
            path = pipeline_file(work / f"{name}.yaml", default_names, listening)
            pipeline = Registry().build_pipeline(load_pipeline_config(path))
            sock = stack.start_extproc(f"extproc-{name}", resources, path)
            front = stack.start_front(name, catalog, pipeline.needs, sock, pipeline.fast_call_eras)
            targets.append(Target(label, front, True, external=True))
    return targets


def check_targets(targets: Sequence[Target], shapes: Sequence[Shape]) -> None:
    """The sanity check of every ``tools/call`` configuration with every shape (:mod:`bench.checks`)."""
    for target in targets:
        sanity_check(
            target.label, target.url, shapes, enforces_allowlist=target.enforces_allowlist, external=target.external
        )


def call_cases(targets: Sequence[Target], shapes: Sequence[Shape]) -> list[list[Case]]:
    """One group per shape: that ``tools/call`` on every configuration, compared with plain Envoy."""
    return [[Case(shape.name, t.label, t.envoy, t.url, shape, PLAIN) for t in targets] for shape in shapes]


@dataclass
class _Cell:
    latency: list[WrkResult] = field(default_factory=list)
    throughput: list[WrkResult] = field(default_factory=list)
    calls: int = 0
    answered: int = 0
    reached: int = 0


def _measure(
    case: Case, upstream: Envoy, script: Path, load: tuple[int, int], duration_s: float, warmup_s: float
) -> tuple[WrkResult, int, int, int]:
    """Warm up, then measure; also returns the calls Envoy made to our server (ext_proc
    messages plus ext_authz Checks, each one round trip), the requests Envoy answered and
    those that reached the upstream."""
    threads, connections = load
    run_wrk(case.url, script, threads=threads, connections=connections, duration_s=warmup_s)
    before, up_before = case.envoy.counters("http.mcp."), upstream.counters("http.canned.")
    result = run_wrk(case.url, script, threads=threads, connections=connections, duration_s=duration_s)
    after, up_after = case.envoy.counters("http.mcp."), upstream.counters("http.canned.")
    answered = after.get(_FRONT_RQ, 0) - before.get(_FRONT_RQ, 0)
    calls = sum(after.get(name, 0) - before.get(name, 0) for name in (_EXTPROC_MSGS, *_AUTHZ_CALLS))
    reached = up_after.get(_UPSTREAM_RQ, 0) - up_before.get(_UPSTREAM_RQ, 0)
    return result, calls, answered, reached


def _scripts(groups: Sequence[Sequence[Case]], workdir: Path) -> dict[tuple[str, str], Path]:
    """The wrk script of every case, by (request, config)."""
    scripts = {}
    for g, group in enumerate(groups):
        for c, case in enumerate(group):
            path = workdir / f"wrk-{g}-{c}.lua"
            path.write_text(wrk_script(case.shape))
            scripts[(case.request, case.config)] = path
    return scripts


def _row(case: Case, cell: _Cell) -> Row:
    return Row(
        case.request,
        case.config,
        case.baseline,
        median_of(cell.latency),
        median_of(cell.throughput),
        cell.calls / cell.answered if cell.answered else 0.0,
        cell.reached / cell.answered if cell.answered else 0.0,
        case.upstream_per_request,
    )


def measure(
    upstream: Envoy,
    groups: Sequence[Sequence[Case]],
    workdir: Path,
    *,
    duration_s: float,
    warmup_s: float,
    progress: Callable[[str], None],
    rounds: int = 1,
) -> list[Row]:
    """Measure every (group, load, case) cell ``rounds`` times; one row per case, in group order."""
    cells: dict[tuple[str, str], _Cell] = {(c.request, c.config): _Cell() for group in groups for c in group}
    scripts = _scripts(groups, workdir)
    rotation = 0
    for round_no in range(1, rounds + 1):
        for group in groups:
            for kind, load in (("latency", LATENCY_LOAD), ("throughput", THROUGHPUT_LOAD)):
                # Shifted by the round too: when a round has a multiple of the group's size of
                # cells (groups of two), each cell would otherwise start with the same case.
                turn = (rotation + round_no) % len(group)
                rotation += 1
                for case in [*group[turn:], *group[:turn]]:
                    started = time.monotonic()
                    key = (case.request, case.config)
                    result, calls, answered, reached = _measure(
                        case, upstream, scripts[key], load, duration_s, warmup_s
                    )
                    cell = cells[key]
                    if kind == "latency":
                        cell.latency.append(result)
                    else:
                        cell.throughput.append(result)
                        cell.calls, cell.answered, cell.reached = (
                            cell.calls + calls,
                            cell.answered + answered,
                            cell.reached + reached,
                        )
                    progress(
                        f"round {round_no}/{rounds} {case.request} {kind:<10} {case.config:<24} "
                        f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  {result.rps:,.0f} req/s  "
                        f"errors {result.errors}  ({time.monotonic() - started:.0f} s)"
                    )
    return [_row(case, cells[(case.request, case.config)]) for group in groups for case in group]
