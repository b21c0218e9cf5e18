"""``python -m bench``: plain Envoy vs. Envoy + mcp-extproc, and a virtual server vs. its backend, in one run.

Exit status: 0 done; 1 the stack could not be set up or failed its sanity check;
2 ``wrk`` is missing or the flags are wrong; 130 interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from bench import virtual
from bench.report import Row, machine, table, write_json
from bench.run import (
    LATENCY_LOAD,
    PLAIN,
    THROUGHPUT_LOAD,
    Case,
    build_targets,
    call_cases,
    check_targets,
    extproc_argv,
    measure,
    mint_session_id,
)
from bench.shapes import SHAPES, session_call
from bench.stack import BenchError, Envoy, Stack
from bench.wrk import INSTALL_HINT, WrkError, wrk_binary
from extproc.commands.envoy import envoy_binary

QUICK_DURATION_S: Final = 2.0
WARMUP_S: Final = 2.0
QUICK_WARMUP_S: Final = 1.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every cell this many times, interleaved, and report the median (default 3)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"one round of {QUICK_DURATION_S:.0f} s per measurement (smoke run)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE")
    parser.add_argument(
        "--no-external", action="store_true", help="skip the configurations with an external stage (TCP, unix)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-virtual", action="store_true", help="skip the virtual server rows")
    which.add_argument(
        "--only-virtual", action="store_true", help="run the virtual server rows only (no tools/call configurations)"
    )
    return parser


def _rounds(rounds: int, duration: float) -> str:
    return f"one run of {duration:g} s" if rounds == 1 else f"the median of {rounds} interleaved runs of {duration:g} s"


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _call_groups(stack: Stack, upstream: Envoy, *, external: bool) -> list[list[Case]]:
    """The tools/call configurations, checked, one group per shape."""
    shapes = (*SHAPES, session_call(mint_session_id(stack.session_keys)))
    targets = build_targets(stack, upstream, external=external)
    check_targets(targets, shapes)
    _progress(
        "sanity check passed: every configuration answers 200 with the canned result; "
        "the default pipeline refuses a tool outside allowedTools with -32003"
    )
    return call_cases(targets, shapes)


def _virtual_groups(stack: Stack, upstream: Envoy) -> list[list[Case]]:
    """The virtual server rows, checked."""
    groups = virtual.build_virtual(stack, upstream)
    _progress(
        "virtual sanity check passed: a_echo reaches backend a as echo, the merged list holds a_ and b_ tools, "
        "a tool outside allowedTools is refused with -32003 on both routes"
    )
    return groups


def _print_tables(rows: list[Row]) -> None:
    calls = [row for row in rows if row.baseline == PLAIN]
    virtual_rows = [row for row in rows if row.baseline != PLAIN]
    if calls:
        print(f"\n+ms: latency added to {PLAIN}; % of plain: throughput relative to {PLAIN}\n")
        print(table(calls, "plain"))
    if virtual_rows:
        print(f"\n{virtual.NOTE}\n")
        print(table(virtual_rows, "own route"))
    for row in rows:
        if abs(row.upstream_share - row.upstream_expected) > 0.01 * row.upstream_expected:
            print(
                f"warning: {row.shape} {row.config}: {row.upstream_share:.3f} requests reached the upstream "
                f"per request Envoy answered, expected {row.upstream_expected:g}"
            )


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes SystemExit, so `finally` blocks stop every child.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; see the module docstring for exit statuses."""
    args = _parser().parse_args(argv)
    duration = QUICK_DURATION_S if args.quick else args.duration
    warmup = QUICK_WARMUP_S if args.quick else WARMUP_S
    rounds = 1 if args.quick else args.rounds
    if duration < 1:
        print("bench: --duration must be at least 1 second (wrk's shortest run)", file=sys.stderr)
        return 2
    if rounds < 1:
        print("bench: --rounds must be at least 1", file=sys.stderr)
        return 2
    if wrk_binary() is None:
        print(f"bench: {INSTALL_HINT}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    facts = machine(envoy_binary())
    workdir = Path(tempfile.mkdtemp(prefix="mcp-extproc-bench-"))
    started = time.monotonic()
    keep_workdir = False
    try:
        with Stack(workdir, extproc_argv()) as stack:
            _progress(f"starting the stack in {workdir}")
            upstream = stack.start_upstream()
            groups = [] if args.only_virtual else _call_groups(stack, upstream, external=not args.no_external)
            groups += [] if args.no_virtual else _virtual_groups(stack, upstream)
            rows = measure(
                upstream, groups, workdir, duration_s=duration, warmup_s=warmup, progress=_progress, rounds=rounds
            )
    except (BenchError, WrkError) as exc:
        keep_workdir = True
        print(f"bench: error: {exc}\nbench: configs and logs kept in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process stopped", file=sys.stderr)
        return 130
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(
        f"mcp-extproc benchmark, {facts['date']}\n"
        f"machine: nproc {facts['nproc']}, {facts['cpu_model']}, Linux {facts['kernel']}, "
        f"Python {facts['python']}, Envoy {facts['envoy']}\n"
        f"each cell: {_rounds(rounds, duration)}, each after a {warmup:g} s warm-up; "
        f"latency: wrk -t {LATENCY_LOAD[0]} -c {LATENCY_LOAD[1]}; "
        f"throughput: wrk -t {THROUGHPUT_LOAD[0]} -c {THROUGHPUT_LOAD[1]}; "
        "upstream: canned Envoy direct_response (Lua backends for the virtual server rows)\n"
        "errors: socket errors + non-2xx over both runs; "
        "calls/req: ext_proc messages plus ext_authz Checks (gRPC or HTTP) Envoy sent our server per request "
        "(each one a round trip)"
    )
    _print_tables(rows)
    print(f"\ntotal time: {elapsed:.0f} s")
    if args.json is not None:
        settings = {
            "duration_s": duration,
            "rounds": rounds,
            "warmup_s": warmup,
            "latency_load": LATENCY_LOAD,
            "throughput_load": THROUGHPUT_LOAD,
        }
        write_json(args.json, facts, settings, rows)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
