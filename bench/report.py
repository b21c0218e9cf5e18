"""The report: machine facts, the results tables, and the JSON file. Pure except :func:`machine`.

Every row names its baseline, the configuration of the same request its ``+ms`` and
``%`` columns compare with: plain Envoy for the ``tools/call`` configurations, the
backend's own route for the virtual server rows (one table each).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.wrk import WrkResult


@dataclass(frozen=True)
class Row:
    """One configuration measured with one request shape.

    Attributes:
        shape: The request (its protocol revision, and method for the virtual server rows).
        config: The configuration's label.
        baseline: The configuration of the same request this row is compared with.
        latency: The 1-connection run.
        throughput: The 16-connection run.
        extproc_msgs_per_request: gRPC calls Envoy made to our server per request (ext_proc
            messages plus ext_authz ``Check``s; throughput run).
        upstream_share: Requests that reached the upstream / requests Envoy answered.
        upstream_expected: What ``upstream_share`` should be (2 for a list merged from two backends).
    """

    shape: str
    config: str
    baseline: str
    latency: WrkResult
    throughput: WrkResult
    extproc_msgs_per_request: float
    upstream_share: float
    upstream_expected: float = 1.0


def machine(envoy: str) -> dict[str, Any]:
    """nproc, CPU model, kernel, Python and Envoy versions, and the date."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        version = subprocess.run([envoy, "--version"], capture_output=True, text=True, timeout=30, check=False)
        found = re.search(r"/(\d+\.\d+\.\d+)/", version.stdout)
        envoy_version = found.group(1) if found else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        envoy_version = "unknown"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_version,
    }


def _added(value: float, base: float) -> str:
    return f"{value - base:+.3f}"


def _baselines(rows: Sequence[Row]) -> list[Row]:
    """Each row's baseline row (the same request, the configuration it names)."""
    by_name = {(r.shape, r.config): r for r in rows}
    return [by_name[(r.shape, r.baseline)] for r in rows]


def table(rows: Sequence[Row], base_name: str = "plain") -> str:
    """The results as one text table; ratios are against each row's baseline (``base_name`` in the header)."""
    header = (
        "request",
        "configuration",
        "p50 ms",
        "+p50 ms",
        "p99 ms",
        "+p99 ms",
        "req/s @16",
        f"% of {base_name}",
        "calls/req",
        "errors",
    )
    lines: list[tuple[str, ...]] = [header]
    for r, b in zip(rows, _baselines(rows), strict=True):
        plain = r is b
        lines.append(
            (
                r.shape,
                r.config,
                f"{r.latency.p50_ms:.3f}",
                "-" if plain else _added(r.latency.p50_ms, b.latency.p50_ms),
                f"{r.latency.p99_ms:.3f}",
                "-" if plain else _added(r.latency.p99_ms, b.latency.p99_ms),
                f"{r.throughput.rps:,.0f}",
                f"{100 * r.throughput.rps / b.throughput.rps:.0f}%" if b.throughput.rps else "-",
                f"{r.extproc_msgs_per_request:.2f}",
                str(r.latency.errors + r.throughput.errors),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned.
    out = []
    for line in lines:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def write_json(path: Path, facts: dict[str, Any], settings: dict[str, Any], rows: Sequence[Row]) -> None:
    """The machine facts, the settings and every row (raw wrk numbers plus ratios to its baseline) as JSON."""
    results = []
    for r, b in zip(rows, _baselines(rows), strict=True):
        results.append(
            {
                **asdict(r),
                "added_p50_ms": r.latency.p50_ms - b.latency.p50_ms,
                "added_p99_ms": r.latency.p99_ms - b.latency.p99_ms,
                "throughput_pct_of_baseline": 100 * r.throughput.rps / b.throughput.rps if b.throughput.rps else None,
            }
        )
    document = {"machine": facts, "settings": settings, "results": results}
    path.write_text(json.dumps(document, indent=2) + "\n")
