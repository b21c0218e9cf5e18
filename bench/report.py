"""The report: machine facts, the one results table, and the JSON file. Pure except :func:`machine`."""

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
        shape: The request's protocol revision.
        config: The configuration's label.
        latency: The 1-connection run.
        throughput: The 16-connection run.
        extproc_msgs_per_request: gRPC calls Envoy made to our server per request (ext_proc
            messages plus ext_authz ``Check``s; throughput run).
        upstream_share: Requests that reached the upstream / requests Envoy answered.
    """

    shape: str
    config: str
    latency: WrkResult
    throughput: WrkResult
    extproc_msgs_per_request: float
    upstream_share: float


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


def table(rows: Sequence[Row], baseline: str) -> str:
    """The results as one text table; ratios are against the ``baseline`` row of the same shape."""
    header = (
        "request",
        "configuration",
        "p50 ms",
        "+p50 ms",
        "p99 ms",
        "+p99 ms",
        "req/s @16",
        "% of plain",
        "calls/req",
        "errors",
    )
    base = {r.shape: r for r in rows if r.config == baseline}
    lines: list[tuple[str, ...]] = [header]
    for r in rows:
        b = base[r.shape]
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


def write_json(path: Path, facts: dict[str, Any], settings: dict[str, Any], rows: Sequence[Row], baseline: str) -> None:
    """The machine facts, the settings and every row (raw wrk numbers plus ratios) as JSON."""
    base = {r.shape: r for r in rows if r.config == baseline}
    results = []
    for r in rows:
        b = base[r.shape]
        results.append(
            {
                **asdict(r),
                "added_p50_ms": r.latency.p50_ms - b.latency.p50_ms,
                "added_p99_ms": r.latency.p99_ms - b.latency.p99_ms,
                "throughput_pct_of_plain": 100 * r.throughput.rps / b.throughput.rps if b.throughput.rps else None,
            }
        )
    document = {"machine": facts, "settings": settings, "baseline": baseline, "results": results}
    path.write_text(json.dumps(document, indent=2) + "\n")
