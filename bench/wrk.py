"""Run ``wrk`` and read its report.

``wrk --latency`` prints the latency distribution (50/75/90/99 %), the request
count, socket errors and non-2xx responses; :func:`parse_wrk` turns that text
into a :class:`WrkResult`.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

INSTALL_HINT: Final = "wrk is not installed; install it with: apt-get update && apt-get install -y wrk"

_UNITS_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQUESTS: Final = re.compile(r"^\s*(\d+) requests in (\d+(?:\.\d+)?)(us|ms|s|m|h)", re.MULTILINE)
_RPS: Final = re.compile(r"^Requests/sec:\s+(\d+(?:\.\d+)?)", re.MULTILINE)
_SOCKET_ERRORS: Final = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_NON_2XX: Final = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.MULTILINE)
# wrk itself exits by -d; this only guards against a wedged child.
_EXTRA_WAIT_S: Final = 30.0


class WrkError(RuntimeError):
    """wrk failed, or printed something this module cannot read."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run.

    Attributes:
        requests: Completed requests.
        seconds: Measured duration.
        rps: Requests per second, as wrk computed it.
        p50_ms / p99_ms: Latency percentiles in milliseconds.
        socket_errors: connect + read + write + timeout errors.
        non_2xx: Responses with a status outside 2xx/3xx.
    """

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    non_2xx: int

    @property
    def errors(self) -> int:
        """Every request that did not end in a 2xx/3xx response."""
        return self.socket_errors + self.non_2xx


def median_of(results: Sequence[WrkResult]) -> WrkResult:
    """Several rounds of one cell as one result: the median rate and percentiles, the summed
    counts (so an error in any round shows)."""
    return WrkResult(
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        non_2xx=sum(r.non_2xx for r in results),
    )


def wrk_binary() -> str | None:
    """The ``wrk`` on PATH, or None."""
    return shutil.which("wrk")


def parse_wrk(text: str) -> WrkResult:
    """Read ``wrk --latency`` output.

    Raises:
        WrkError: a line this needs is missing.
    """
    percentiles = {float(p): round(float(v) * _UNITS_MS[u], 4) for p, v, u in _PERCENTILE.findall(text)}
    requests = _REQUESTS.search(text)
    rps = _RPS.search(text)
    if requests is None or rps is None or 50.0 not in percentiles or 99.0 not in percentiles:
        raise WrkError(f"cannot read wrk's report (was --latency given?):\n{text}")
    socket_errors = _SOCKET_ERRORS.search(text)
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests=int(requests.group(1)),
        seconds=round(float(requests.group(2)) * _UNITS_MS[requests.group(3)] / 1000.0, 4),
        rps=float(rps.group(1)),
        p50_ms=percentiles[50.0],
        p99_ms=percentiles[99.0],
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def run_wrk(url: str, script: Path, *, threads: int, connections: int, duration_s: float) -> WrkResult:
    """Run wrk against ``url`` for ``duration_s`` seconds and parse its report.

    Raises:
        WrkError: wrk is missing, failed, overran its time, or printed an unreadable report.
    """
    binary = wrk_binary()
    if binary is None:
        raise WrkError(INSTALL_HINT)
    # wrk's -d takes whole seconds (or minutes/hours); a second is its shortest run.
    argv = [
        binary,
        "--latency",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration_s))}s",
        "-s",
        str(script),
        url,
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + _EXTRA_WAIT_S, check=False)
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk did not finish within {duration_s + _EXTRA_WAIT_S:.0f}s") from None
    if done.returncode != 0:
        raise WrkError(f"wrk exited with status {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)
