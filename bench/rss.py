"""Idle memory: the resident set of the extension server, and of Envoy, once started and idle.

Run::

    python -m bench.rss                                        # every row, 3 rounds
    python -m bench.rss --server-python .venv-runtime/bin/python   # as users install it
    python -m bench.rss --only serve --rounds 1                # the serve rows alone

Data flow::

    this script ─▶ start one process (rows below), wait for its ready line
                   (Envoy alone: its listener accepting), sleep --idle seconds
                ─▶ /proc/<pid>/status: VmRSS (what `ps` and the issue call RSS), RssAnon
                   (the process's own memory), RssFile (pages of mapped files: shared
                   libraries' code, clean, shared with every process mapping them), Threads
                ─▶ stop it; every row --rounds times, interleaved; the table shows medians

Rows:

- ``serve, tcp``: ``serve -f examples/resources.yaml --grpc 127.0.0.1:0 --metrics ''``.
- ``serve, sidecar flags``: as the injected sidecar runs it (controller/render/inject.py):
  ``--grpc ''`` plus ``--unix``, ``--authz-http``, ``--streams`` sockets, ``--metrics``,
  ``--public-url`` and ``--session-key-file``.
- ``serve, sidecar flags, MALLOC_ARENA_MAX=2``: the same with glibc's malloc arenas capped
  (gRPC's threads would otherwise each get one).
- ``up (its Python)`` / ``up's Envoy``: ``mcp-extproc up`` on the same resources, the Python
  process and its Envoy child.
- ``Envoy, example bootstrap``: the pinned Envoy alone on envoy/example-bootstrap.yaml (its
  listener moved to a free port), with ``--concurrency 1`` and with the default (one worker
  per CPU).

Each child runs with Python's byte-code cache on, in a fresh directory of this run
(``PYTHONPYCACHEPREFIX``; a first start per Python fills it, unmeasured): with
``PYTHONDONTWRITEBYTECODE`` set and no ``__pycache__``, every start would compile our
modules and measure the compiler's leftovers (3 to 4 MB) too. The dev venv makes httpx import
its command line's dependencies (click, rich, pygments), so ``--server-python`` a venv with
the runtime dependencies only (``make bench`` makes one: .venv-runtime) gives the figure
users see.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from extproc.commands.envoy import envoy_binary
from tests.integration.conftest import start_gateway
from tests.procs import REPO_ROOT, Proc, free_port, wait_for_tcp

RESOURCES: Final = REPO_ROOT / "examples/resources.yaml"
EXAMPLE_BOOTSTRAP: Final = REPO_ROOT / "envoy/example-bootstrap.yaml"
FIELDS: Final = ("VmRSS", "RssAnon", "RssFile", "Threads")
GROUPS: Final = ("serve", "up", "envoy")


def status(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile (MB) and Threads of ``pid``, from /proc/<pid>/status."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            number = int(value.split()[0])
            found[key] = number if key == "Threads" else number / 1024
    return found


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children."""
    listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in listed]


Started = tuple[Proc, Callable[[], list[int]]]
"""A started process, and how to find the pid to read once it is idle."""
Starter = Callable[[Path, Path], Started]
"""Start a row: the run's shared directory (byte-code cache, state), this start's own (logs, sockets)."""


@dataclass(frozen=True)
class Row:
    """One configuration."""

    name: str
    group: str
    start: Starter


def _env(work: Path, python: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # One byte-code cache per Python: the dev venv's and the runtime venv's modules differ.
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache" / Path(python).parent.parent.name)
    env["XDG_STATE_HOME"] = str(work / "state")
    env.update(extra or {})
    return env


def _serve(python: str, *flags: str, extra_env: Mapping[str, str] | None = None) -> Starter:
    def start(work: Path, own: Path) -> Started:
        argv = [python, "-m", "extproc", "serve", "-f", str(RESOURCES), *(f.replace("{own}", str(own)) for f in flags)]
        proc = Proc(argv, name="serve", log_dir=own, env=_env(work, python, extra_env))
        try:
            proc.wait_for_line(r"gRPC server listening", 60)
            if flags[flags.index("--metrics") + 1]:
                proc.wait_for_line(r"metrics at ", 10)
        except BaseException:
            proc.stop()
            raise
        return proc, lambda: [proc.pid]

    return start


def _up(python: str, envoy: bool) -> Starter:
    def start(work: Path, own: Path) -> Started:
        proc, _base, _metrics = start_gateway(RESOURCES, own, python=python, env=_env(work, python))
        return proc, (lambda: children(proc.pid)) if envoy else (lambda: [proc.pid])

    return start


def _envoy(concurrency: int | None) -> Starter:
    def start(work: Path, own: Path) -> Started:
        port = free_port()
        bootstrap = yaml.safe_load(EXAMPLE_BOOTSTRAP.read_text())
        bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
        path = own / "envoy.yaml"
        path.write_text(yaml.safe_dump(bootstrap))
        workers = ["--concurrency", str(concurrency)] if concurrency else []
        argv = [envoy_binary(), "-c", str(path), "--use-dynamic-base-id", "--log-level", "warning", *workers]
        proc = Proc(argv, name="envoy", log_dir=own)
        try:
            wait_for_tcp("127.0.0.1", port, 30)
        except BaseException:
            proc.stop()
            raise
        return proc, lambda: [proc.pid]

    return start


def rows(python: str) -> list[Row]:
    """Every row, in table order."""
    sidecar = (
        *("--grpc", "", "--unix", "{own}/extproc.sock", "--authz-http", "{own}/authz.sock"),
        *("--streams", "{own}/streams.sock", "--metrics", "127.0.0.1:0"),
        *("--public-url", "http://127.0.0.1:15000", "--session-key-file", "{own}/session-keys.json"),
    )
    arenas = {"MALLOC_ARENA_MAX": "2"}
    return [
        Row("serve, tcp", "serve", _serve(python, "--grpc", "127.0.0.1:0", "--metrics", "")),
        Row("serve, sidecar flags", "serve", _serve(python, *sidecar)),
        Row("serve, sidecar flags, MALLOC_ARENA_MAX=2", "serve", _serve(python, *sidecar, extra_env=arenas)),
        Row("up (its Python)", "up", _up(python, envoy=False)),
        Row("up's Envoy", "up", _up(python, envoy=True)),
        Row("Envoy alone, example bootstrap, --concurrency 1", "envoy", _envoy(1)),
        Row(f"Envoy alone, example bootstrap, default ({os.cpu_count()} workers)", "envoy", _envoy(None)),
    ]


def measure(row: Row, work: Path, idle_s: float) -> dict[str, float]:
    """Start ``row``, wait ``idle_s``, read its process's status, stop it."""
    proc, pids = row.start(work, Path(tempfile.mkdtemp(prefix="run-", dir=work)))
    try:
        time.sleep(idle_s)
        found = pids()
        if len(found) != 1:
            raise RuntimeError(f"{row.name}: expected one process to read, found {found}")
        return status(found[0])
    finally:
        proc.stop()


def run(python: str, rounds: int, idle_s: float, only: Sequence[str]) -> list[dict[str, Any]]:
    """Every chosen row ``rounds`` times, interleaved; each row's medians and samples."""
    work = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    chosen = [row for row in rows(python) if row.group in only]
    # Fill the byte-code cache, unmeasured: serve's modules, and up's (the renderer's too).
    for row in rows(python):
        if row.name in ("serve, tcp", "up (its Python)") and row.group in only:
            measure(row, work, 0.0)
    samples: dict[str, list[dict[str, float]]] = {row.name: [] for row in chosen}
    for n in range(rounds):
        for row in chosen[n % len(chosen) :] + chosen[: n % len(chosen)]:
            samples[row.name].append(measure(row, work, idle_s))
    shutil.rmtree(work)
    return [
        {"configuration": name, **{f: statistics.median(s[f] for s in got) for f in FIELDS}, "samples": got}
        for name, got in samples.items()
    ]


def table(results: Sequence[dict[str, Any]]) -> str:
    """The medians as a Markdown table."""
    lines = [
        "| configuration | VmRSS MB | RssAnon MB | RssFile MB | threads |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        row = (r["configuration"], r["VmRSS"], r["RssAnon"], r["RssFile"], r["Threads"])
        lines.append("| {} | {:.1f} | {:.1f} | {:.1f} | {:.0f} |".format(*row))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="starts of every row; the table shows medians")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle after ready before reading")
    parser.add_argument(
        "--server-python",
        default=sys.executable,
        help="the Python that runs the server (a venv with the runtime dependencies only gives users' figure)",
    )
    parser.add_argument("--only", action="append", choices=GROUPS, help="only these rows (repeatable)")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args()
    results = run(args.server_python, args.rounds, args.idle, args.only or list(GROUPS))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
