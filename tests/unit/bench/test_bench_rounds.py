"""The benchmark's rounds: one cell measured several times is reported as its median, errors summed."""

from __future__ import annotations

from bench.wrk import WrkResult, median_of


def _run(p50: float, rps: float, non_2xx: int = 0) -> WrkResult:
    return WrkResult(requests=1000, seconds=5.0, rps=rps, p50_ms=p50, p99_ms=p50 * 3, socket_errors=0, non_2xx=non_2xx)


def test_one_hiccup_does_not_move_the_reported_cell() -> None:
    merged = median_of([_run(0.80, 3000), _run(2.40, 900), _run(0.82, 3100)])  # the VM stalled in round 2
    assert (merged.p50_ms, merged.p99_ms, merged.rps) == (0.82, 2.46, 3000)


def test_an_error_in_any_round_shows_in_the_cell() -> None:
    merged = median_of([_run(0.8, 3000), _run(0.8, 3000, non_2xx=4), _run(0.8, 3000)])
    assert merged.errors == 4 and merged.requests == 3000
