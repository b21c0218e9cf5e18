"""Reload the resource file while running, keeping the last good catalog on a bad one.

Data flow::

    every `interval` s: (mtime, size) of the resource file changed?
        ──▶ load_resources (schema, references,       ConfigError ──┐
            a key written twice)                                    │
        ──▶ posture_problems(new, running stages)     problems    ──┤
            (the pipeline cannot enforce the new resources)         │
        ──▶ weakening(in force, new)                  problems    ──┤
            (authentication switched off, policies all gone)        │
        ──▶ pipeline.check (e.g. Rego compiles)       problems    ──┤
        ──▶ server.set_catalog(catalog, generation+1)               ▼
             mcp_extproc_config_reloads{result="applied"}   log an ERROR naming each problem,
                                                            keep the last good catalog;
                                                            result="refused"

A reload never lowers the security posture silently: switching authentication off
(every ``MCPAgent`` removed) or removing every ``MCPToolPolicy`` takes a restart.
Envoy's routes are rendered once at start: a reload changes policies, agents,
tool lists and credentials, but adding or removing an ``MCPServer`` needs a
restart, and the log says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Protocol

from extproc.config.resources import Catalog, load_resources
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.posture import posture_problems, weakening
from extproc.errors import ConfigError

log = logging.getLogger("mcp_extproc.reload")


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


def try_reload(path: Path, pipeline: Pipeline, current: Catalog, metrics: Metrics) -> Catalog | None:
    """The new catalog, or ``None`` (logged and counted) when the file is bad or would weaken enforcement.

    ``current`` is the catalog in force; it stays when the reload is refused.
    """
    try:
        catalog = load_resources(path)
    except ConfigError as exc:
        problems = [str(exc)]
    else:
        stages = [(stage.name, stage.failure_mode) for stage in pipeline.stages]
        problems = posture_problems(catalog, stages, pipeline="the running pipeline")
        problems += weakening(current, catalog)
        if not problems:
            problems, _warnings = pipeline.check_split(catalog)
    if problems:
        metrics.reloads.labels("refused").inc()
        log.error("reload of %s refused; keeping the last good resources:\n  %s", path, "\n  ".join(problems))
        return None
    if set(catalog.servers) != set(current.servers):
        log.warning("MCPServers were added or removed in %s: Envoy's routes change only on restart", path)
    metrics.reloads.labels("applied").inc()
    log.info("reloaded %s", path)
    return dataclasses.replace(catalog, generation=current.generation + 1)


class Serving(Protocol):
    """What a reload swaps the catalog of (the running server)."""

    pipeline: Pipeline
    catalog: Catalog

    def set_catalog(self, catalog: Catalog) -> None: ...


async def watch(path: Path, server: Serving, metrics: Metrics, interval: float = 1.0) -> None:
    """Poll ``path`` and apply good changes until cancelled."""
    seen = _stamp(path)
    while True:
        await asyncio.sleep(interval)
        stamp = _stamp(path)
        if stamp is None or stamp == seen:
            continue
        seen = stamp
        new = try_reload(path, server.pipeline, server.catalog, metrics)
        if new is not None:
            server.set_catalog(new)
