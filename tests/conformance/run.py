"""Run the MCP conformance suite against each upstream directly and through `mcp-extproc up`.

A gateway must not change what an MCP server means. For each target (an upstream and a
requirement set of the official suite, `@modelcontextprotocol/conformance`, pinned in
`package.json`), this runs the suite's server scenarios once against the upstream's own
URL and once through one `mcp-extproc up` (real Envoy and our server, default pipeline,
the upstream as an `MCPServer` with `allowedTools: ["*"]`), then compares the verdicts
scenario by scenario and prints the table::

    .venv/bin/python -m tests.conformance.run            # what `make conformance` runs
    .venv/bin/python -m tests.conformance.run --target py-modern
    .venv/bin/python -m tests.conformance.run --url http://127.0.0.1:3000/mcp --requirements 2025-11-25

Built-in targets:

- `everything`: `@modelcontextprotocol/server-everything` (TypeScript) at 2025-11-25, and
  at 2026-07-28 too if it answers `server/discover` (it is probed, and the table says
  when it does not);
- `py-legacy`: the Python SDK fixture (`tests.conformance.fixture`, stateful) at 2025-11-25;
- `py-modern`: the same fixture, stateless, at 2026-07-28.

`--url` runs an MCP server of your own instead (see docs/conformance.md). `--via-virtual`
puts each upstream behind an `MCPVirtualServer` of its own (one backend, no prefix) and runs
the suite through that instead of the server's own route: a virtual server must not change
what a server means either.

A scenario passes when none of its checks failed (warnings do not fail, as in the
suite). Every scenario that passes directly must pass through the gateway; one that
does not is retried alone (twice, at the same wire version) and is reported as a
regression if it never passes again, as flaky if it does. Scenarios that fail directly
are reported and not scored. Every scenario the requirement set runs is compared, the
ones it does not score (extensions, pending, added after the release) too.

Exit status: 0 without regressions, 1 with any, 2 when the run itself could not be made
(the suite or Node.js missing, an upstream or the gateway not starting). Every process
this starts is stopped at the end, also on failure, SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import httpx
import yaml

from tests.agents import modern_request, raw_post, response_messages
from tests.integration.conftest import start_gateway
from tests.procs import REPO_ROOT, Proc, start_everything, start_ready_server

SUITE_PACKAGE: Final = REPO_ROOT / "node_modules/@modelcontextprotocol/conformance"
SUITE_CLI: Final = SUITE_PACKAGE / "dist/index.js"
NODE_BIN_DIR: Final = REPO_ROOT / "node_modules/node/bin"
"""The `node` npm package (pinned in package.json): the suite needs Node.js 22 or newer."""

LEGACY: Final = "2025-11-25"
MODERN: Final = "2026-07-28"
ALLOW_ALL: Final = {"allowedTools": ["*"]}

SUITE_TIMEOUT_S: Final = 600.0
"""Bound on one run of a whole requirement set (one takes about 10 s here)."""
SCENARIO_TIMEOUT_S: Final = 120.0
"""Bound on one retried scenario."""
SCENARIO_TIMEOUT_MS: Final = 30_000
"""The suite's own per-scenario bound (its default)."""
RETRIES: Final = 2

Status = Literal["pass", "fail", "skip", "missing"]
_RESULT_DIR: Final = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
_SEVERITY: Final = {"FAILURE": 4, "WARNING": 3, "INFO": 2, "SKIPPED": 1, "SUCCESS": 0}


class HarnessError(RuntimeError):
    """The run could not be made (as opposed to a scenario that failed)."""


@dataclass(frozen=True)
class Target:
    """One upstream and the requirement set to run against it.

    Attributes:
        label: Name in the output (and for ``--target``).
        server: The upstream's ``MCPServer`` name behind the gateway.
        revision: The requirement set (``2025-11-25`` or ``2026-07-28``).
        url: The upstream's own URL, once it runs.
    """

    label: str
    server: str
    revision: str
    url: str = ""


@dataclass(frozen=True)
class Verdict:
    """What one run of one scenario said."""

    status: Status
    failures: tuple[tuple[str, str], ...] = ()
    checks: dict[str, str] = field(default_factory=dict)
    """Check id -> its most severe status (ids repeat within a scenario)."""

    @property
    def cell(self) -> str:
        """The verdict as a table cell."""
        if self.status == "fail":
            return f"FAIL ({len(self.failures)})"
        return self.status


@dataclass
class Row:
    """One scenario of one target: both verdicts and what the comparison made of them."""

    scenario: str
    scored: str | None
    """``None`` when the requirement set scores it, else why it does not (extension, pending, ...)."""
    direct: Verdict
    gateway: Verdict
    retries: list[Verdict] = field(default_factory=list)

    @property
    def outcome(self) -> Literal["same", "regression", "flaky", "not-scored", "gateway-only"]:
        """How the gateway's verdict compares with the direct one."""
        if self.direct.status != "pass":
            return "gateway-only" if self.gateway.status == "pass" else "not-scored"
        if self.gateway.status == "pass":
            return "same"
        return "flaky" if any(r.status == "pass" for r in self.retries) else "regression"

    @property
    def note(self) -> str:
        """What the table says beside the verdicts: the outcome, and checks that differ."""
        outcome = self.outcome
        if outcome == "regression":
            return "REGRESSION: passes directly, fails through the gateway"
        if outcome == "flaky":
            return "FLAKY through the gateway: failed, then passed when run again"
        if outcome == "gateway-only":
            return f"{self._direct_words}, passes through the gateway: reported, not scored"
        worse = self.worse_checks()
        if outcome == "not-scored":
            same = {c for c, _ in self.direct.failures} == {c for c, _ in self.gateway.failures}
            how = "" if same and not worse else "; differently through the gateway: " + ", ".join(worse or ["?"])
            return f"{self._direct_words}: reported, not scored{how}"
        return ("checks differ (not scored): " + ", ".join(worse)) if worse else ""

    @property
    def _direct_words(self) -> str:
        return {"fail": "fails directly", "skip": "no check ran directly", "missing": "no result directly"}.get(
            self.direct.status, "fails directly"
        )

    def worse_checks(self) -> list[str]:
        """Checks whose status is more severe through the gateway than directly ("id: SUCCESS->WARNING")."""
        worse = []
        for check_id in sorted({*self.direct.checks, *self.gateway.checks}):
            before, after = self.direct.checks.get(check_id, "absent"), self.gateway.checks.get(check_id, "absent")
            if before == "absent":
                got_worse = after in ("FAILURE", "WARNING")
            elif after == "absent":
                got_worse = before == "SUCCESS"
            else:
                got_worse = _SEVERITY.get(after, 0) > _SEVERITY.get(before, 0)
            if got_worse:
                worse.append(f"{check_id}: {before}->{after}")
        return worse


@dataclass
class Report:
    """Every compared target, and the targets that could not be run."""

    tables: list[tuple[Target, list[Row], float]] = field(default_factory=list)
    not_run: list[tuple[str, str]] = field(default_factory=list)


def requirement_set(revision: str) -> tuple[list[str], dict[str, str]]:
    """The server scenarios a requirement set scores, and those it runs without scoring (-> why)."""
    path = SUITE_PACKAGE / "requirements" / f"{revision}.yaml"
    document = yaml.safe_load(path.read_text())
    scored = [str(name) for name in document.get("server") or []]
    unscored = {
        str(entry["scenario"]): str(entry.get("reason", "not scored"))
        for entry in document.get("not_scored") or []
        if entry.get("leg") == "server"
    }
    return scored, unscored


def _verdict(checks_file: Path) -> Verdict:
    checks: list[dict[str, Any]] = json.loads(checks_file.read_text())
    worst: dict[str, str] = {}
    failures: list[tuple[str, str]] = []
    for check in checks:
        check_id, status = str(check.get("id")), str(check.get("status"))
        if _SEVERITY.get(status, 0) >= _SEVERITY.get(worst.get(check_id, "SUCCESS"), 0):
            worst[check_id] = status
        if status == "FAILURE":
            failures.append((check_id, str(check.get("errorMessage") or "")))
    if failures:
        return Verdict("fail", tuple(failures), worst)
    if not any(status == "SUCCESS" for status in worst.values()):
        return Verdict("skip", (), worst)
    return Verdict("pass", (), worst)


def read_verdicts(results: Path) -> dict[str, Verdict]:
    """Scenario -> verdict, from the suite's ``-o`` directory (``server-<scenario>-<time>/checks.json``)."""
    verdicts: dict[str, Verdict] = {}
    for directory in sorted(results.iterdir()) if results.is_dir() else []:
        match = _RESULT_DIR.match(directory.name)
        if match is not None and (directory / "checks.json").is_file():
            verdicts[match.group("scenario")] = _verdict(directory / "checks.json")
    return verdicts


def check_installed() -> Path:
    """The `node` that runs the suite (Node.js 22 or newer, from the `node` npm package)."""
    node = NODE_BIN_DIR / "node"
    if not SUITE_CLI.is_file() or not node.is_file():
        raise HarnessError(
            f"the conformance suite or its Node.js is missing under {REPO_ROOT / 'node_modules'}: run `make node`"
        )
    return node


def run_suite(node: Path, url: str, selection: Sequence[str], out: Path, timeout_s: float) -> dict[str, Verdict]:
    """Run the suite's ``server`` command against ``url``; return the verdicts it wrote to ``out``.

    Raises:
        HarnessError: The suite did not finish within ``timeout_s`` or wrote no result at all.
    """
    out.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{NODE_BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    argv = [str(node), str(SUITE_CLI), "server", "--url", url, *selection]
    argv += ["--timeout", str(SCENARIO_TIMEOUT_MS), "-o", str(out)]
    proc = Proc(argv, name="conformance", env=env, log_dir=out)
    try:
        proc.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(
            f"the suite did not finish within {timeout_s:.0f}s against {url}; log: {proc.log_path}"
        ) from exc
    finally:
        proc.stop()
    verdicts = read_verdicts(out)
    if not verdicts:
        raise HarnessError(
            f"the suite wrote no result for {url} (exit {proc.popen.returncode}):\n{proc.output()[-3000:]}"
        )
    return verdicts


def speaks_modern(url: str) -> str | None:
    """``None`` when ``url`` serves 2026-07-28 (``server/discover`` lists it), else what it answered."""
    body, headers = modern_request("server/discover")
    try:
        response = asyncio.run(raw_post(url, body, headers, timeout_s=10))
        messages = [m for m in response_messages(response) if isinstance(m, dict)]
    except (httpx.HTTPError, ValueError) as exc:
        return f"server/discover failed: {exc!r}"
    reply = messages[-1] if messages else {}
    result = reply.get("result")
    if isinstance(result, dict) and MODERN in (result.get("supportedVersions") or []):
        return None
    error = reply.get("error")
    error = error if isinstance(error, dict) else {}
    return (
        f"server/discover answered HTTP {response.status_code}, JSON-RPC {error.get('code')} {error.get('message')!r}"
    )


def compare(
    node: Path, target: Target, gateway_url: str, out: Path, unscored: dict[str, str], scored: Sequence[str]
) -> list[Row]:
    """Run ``target``'s requirement set directly and through the gateway; retry what regressed."""
    selection = ["--requirements", target.revision]
    direct = run_suite(node, target.url, selection, out / "direct", SUITE_TIMEOUT_S)
    through = run_suite(node, gateway_url, selection, out / "gateway", SUITE_TIMEOUT_S)
    missing = Verdict("missing")
    rows = [
        Row(name, unscored.get(name), direct.get(name, missing), through.get(name, missing))
        for name in [*scored, *[s for s in unscored if s not in scored]]
    ]
    rows += [
        Row(s, "not in the requirement set", direct[s], through.get(s, missing))
        for s in direct
        if s not in unscored and s not in scored
    ]
    for row in rows:
        if row.direct.status == "pass" and row.gateway.status != "pass":
            for attempt in range(1, RETRIES + 1):
                again = ["--scenario", row.scenario, "--spec-version", target.revision, "--force"]
                verdicts = run_suite(
                    node, gateway_url, again, out / f"retry-{row.scenario}-{attempt}", SCENARIO_TIMEOUT_S
                )
                row.retries.append(verdicts.get(row.scenario, missing))
                if row.retries[-1].status == "pass":
                    break
    return rows


def render(target: Target, rows: list[Row], gateway_url: str, elapsed_s: float) -> str:
    """The comparison table of one target, with the reasons for every gateway failure."""
    lines = [
        f"== {target.label}: requirement set {target.revision} ({elapsed_s:.0f}s)",
        f"   direct  {target.url}",
        f"   gateway {gateway_url}",
    ]
    width = max(len("scenario"), *(len(r.scenario) + (len(r.scored) + 3 if r.scored else 0) for r in rows))
    lines.append(f"   {'scenario':<{width}}  {'direct':<10} {'gateway':<10} note")
    for row in rows:
        name = f"{row.scenario} [{row.scored}]" if row.scored else row.scenario
        gateway = row.gateway.cell
        if row.retries:
            gateway += " / " + " / ".join(r.cell for r in row.retries)
        lines.append(f"   {name:<{width}}  {row.direct.cell:<10} {gateway:<10} {row.note}".rstrip())
        if row.outcome in ("regression", "flaky"):
            for check_id, message in row.gateway.failures:
                lines.append(f"      - {check_id}: {message[:300]}")
    required = [r for r in rows if r.scored is None]
    direct_pass = sum(r.direct.status == "pass" for r in required)
    gateway_pass = sum(r.gateway.status == "pass" for r in required)
    regressions = sum(r.outcome == "regression" for r in rows)
    lines.append(
        f"   required scenarios passing: {direct_pass}/{len(required)} directly, {gateway_pass}/{len(required)} "
        f"through the gateway; compared {len(rows)} scenarios, {regressions} regression(s)"
    )
    return "\n".join(lines)


def mcp_server(name: str, url: str) -> dict[str, object]:
    """The ``MCPServer`` resource putting ``url`` behind the gateway at ``/<name>/mcp``, every tool allowed."""
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": url, **ALLOW_ALL},
    }


def virtual_server(name: str, backend: str) -> dict[str, object]:
    """An ``MCPVirtualServer`` with ``backend`` as its one, unprefixed, server."""
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPVirtualServer",
        "metadata": {"name": name},
        "spec": {"servers": [{"name": backend}]},
    }


@contextmanager
def _stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()
        signal.signal(signal.SIGTERM, previous)


def _builtin_upstreams(selected: set[str], log_dir: Path, procs: list[Proc]) -> list[Target]:
    targets: list[Target] = []
    if "everything" in selected:
        proc, port = start_everything(log_dir=log_dir)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}/mcp"
        targets.append(Target("server-everything", "everything", LEGACY, url))
        targets.append(Target("server-everything", "everything", MODERN, url))
    for label, mode, revision in (("py-legacy", "legacy", LEGACY), ("py-modern", "modern", MODERN)):
        if label in selected:
            proc, port = start_ready_server("tests.conformance.fixture", "--mode", mode, name=label, log_dir=log_dir)
            procs.append(proc)
            targets.append(Target(f"python-sdk {mode} ({label})", label, revision, f"http://127.0.0.1:{port}/mcp"))
    return targets


def run(args: argparse.Namespace, work: Path) -> Report:
    """Start the upstreams and one gateway in front of them all, compare every target."""
    node = check_installed()
    report = Report()
    with _stopping([]) as procs:
        started = time.monotonic()
        if args.url:
            targets = [
                Target(f"{args.url}", "upstream", revision, args.url) for revision in args.requirements or [LEGACY]
            ]
        else:
            targets = _builtin_upstreams(set(args.target or ["everything", "py-legacy", "py-modern"]), work, procs)
        docs = {t.server: mcp_server(t.server, t.url) for t in targets}
        if args.via_virtual:
            for server in list(docs):
                docs[f"{server}-v"] = virtual_server(f"{server}-v", server)
        resources = work / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(list(docs.values())))
        up, base, _metrics = start_gateway(resources, work, *(args.up_arg or []))
        procs.append(up)
        what = "`mcp-extproc up`" if args.url else "the upstreams and `mcp-extproc up`"
        print(f"started {what} in {time.monotonic() - started:.1f}s", flush=True)
        for index, target in enumerate(targets):
            gateway_url = f"{base}/{target.server}{'-v' if args.via_virtual else ''}/mcp"
            if target.revision == MODERN and (why := speaks_modern(target.url)) is not None:
                report.not_run.append(
                    (f"{target.label}: requirement set {MODERN}", f"it does not serve {MODERN}: {why}")
                )
                continue
            scored, unscored = requirement_set(target.revision)
            begun = time.monotonic()
            rows = compare(
                node, target, gateway_url, work / f"{index}-{target.server}-{target.revision}", unscored, scored
            )
            elapsed = time.monotonic() - begun
            report.tables.append((target, rows, elapsed))
            print(render(target, rows, gateway_url, elapsed) + "\n", flush=True)
    return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--target",
        action="append",
        choices=["everything", "py-legacy", "py-modern"],
        help="a built-in target (repeatable; default: all)",
    )
    parser.add_argument("--url", help="an MCP server of your own (already running) instead of the built-in targets")
    parser.add_argument(
        "--requirements",
        action="append",
        choices=[LEGACY, MODERN],
        help="with --url: the requirement set(s) to run (default 2025-11-25)",
    )
    parser.add_argument(
        "--up-arg",
        action="append",
        metavar="ARG",
        help="an extra argument for `mcp-extproc up` (repeatable), e.g. --up-arg=--front-door=ext_proc",
    )
    parser.add_argument(
        "--via-virtual", action="store_true", help="through an MCPVirtualServer over each upstream, not its own route"
    )
    parser.add_argument("--keep", action="store_true", help="keep the suite's results and the process logs")
    parser.add_argument("--json", type=Path, help="also write the verdicts to this file")
    return parser.parse_args(argv)


def _as_json(report: Report) -> dict[str, Any]:
    return {
        "targets": [
            {
                "label": target.label,
                "revision": target.revision,
                "seconds": round(elapsed, 1),
                "scenarios": [
                    {
                        "scenario": r.scenario,
                        "scored": r.scored is None,
                        "direct": r.direct.status,
                        "gateway": r.gateway.status,
                        "retries": [v.status for v in r.retries],
                        "outcome": r.outcome,
                        "note": r.note,
                    }
                    for r in rows
                ],
            }
            for target, rows, elapsed in report.tables
        ],
        "not_run": [{"target": what, "why": why} for what, why in report.not_run],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    args = _parse_args(argv)
    if args.requirements and not args.url:
        print("--requirements goes with --url (the built-in targets fix their own)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="mcp-extproc-conformance-"))
    started = time.monotonic()
    try:
        report = run(args, work)
    except HarnessError as exc:
        print(f"conformance: {exc}\n(results and logs kept in {work})", file=sys.stderr)
        return 2
    except BaseException:
        print(f"conformance: the run failed or was stopped; results and logs kept in {work}", file=sys.stderr)
        raise
    for what, why in report.not_run:
        print(f"== {what}: not run, {why}\n")
    rows = [(target, row) for target, rows, _ in report.tables for row in rows]
    regressions = [f"{t.label} {t.revision}: {r.scenario}" for t, r in rows if r.outcome == "regression"]
    flaky = [f"{t.label} {t.revision}: {r.scenario}" for t, r in rows if r.outcome == "flaky"]
    if args.json:
        args.json.write_text(json.dumps(_as_json(report), indent=2) + "\n")
    for title, names in (("FLAKY through the gateway (passed when run again)", flaky), ("REGRESSIONS", regressions)):
        if names:
            print(f"{title}:\n" + "\n".join(f"  {name}" for name in names))
    elapsed = time.monotonic() - started
    if regressions:
        print(f"conformance: {len(regressions)} regression(s) through the gateway in {elapsed:.0f}s; results in {work}")
        return 1
    if args.keep:
        print(f"results and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    compared = len(rows)
    print(f"conformance: no regression through the gateway: {compared} scenario verdicts compared in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
