"""The ``mcp-extproc`` command line: flags → one frozen :class:`Settings` → a command.

Commands: ``up``, ``serve``, ``render envoy``, ``check``, ``stages``, ``session-keys``, ``pins``, ``consent``;
``render k8s`` and ``controller`` come from the controller package through entry points (the core never imports
it). A user error (:class:`~extproc.errors.ExtProcError`) prints one line to stderr and exits 2;
nothing prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Final, cast

from extproc.config.settings import Settings
from extproc.errors import ConfigError, ExtProcError

_DEFAULT: Final = {f.name: f.default for f in dataclasses.fields(Settings)}
"""Every flag's default: the :class:`Settings` field's, written only there."""
_FIELD_OF_DEST: Final = {
    "file": "resources",
    "stream_idle_timeout": "stream_idle_timeout_s",
    "reload_interval": "reload_interval_s",
}
"""The :class:`Settings` field of each flag whose ``dest`` is not the field's name."""


def _shown(field: str) -> str:
    """A default as a help text prints it (``1`` rather than ``1.0``)."""
    value = _DEFAULT[field]
    return f"{value:g}" if isinstance(value, float) else str(value)


_FRONT_DOOR = (
    "how Envoy calls the server: auto (default: ext_proc, but one ext_authz Check for a tools/call no stage "
    "reads the response of), ext_proc (every request through ext_proc) or ext_authz (request-side yes/no)"
)
_DOORS = ["auto", "ext_proc", "ext_authz"]
_AUTHZ_HTTP = (
    "unix socket of the HTTP authorization service that the fast tools/call routes (front door auto) call; "
    "without it they use the gRPC Check, which costs more (up always uses one)"
)
_STREAMS = (
    "unix socket of the stream service that serves a virtual server's GET stream (every backend's "
    "notifications); without it a virtual server answers GET with 405 (up always uses one)"
)
_LOG_LEVEL = f"Python log level (default {_shown('log_level')})"
_METRICS = "host:port for /metrics; '' disables"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PUBLIC_URL = (
    "the origin agents reach Envoy at, e.g. https://mcp.example.com: authn's WWW-Authenticate and "
    "protected-resource metadata name it, never the request's Host"
)
_SESSION_KEYS = (
    "the JSON Web Key Set the gateway signs its Mcp-Session-Id values with (created, mode 0600, when "
    "missing); every process given the same file can serve every session"
)
_RELOAD = (
    "seconds between checks of the resource file for changes; "
    f"0 disables reloads (default {_shown('reload_interval_s')})"
)

_REPLICAS = "give it once per replica of the extension server: Envoy balances across them and leaves a dead one"
_OTEL = (
    "OpenTelemetry traces, to the OTLP collector at ENDPOINT (e.g. http://127.0.0.1:4318; without one, the "
    "OTEL_EXPORTER_OTLP_* variables'), Envoy's spans too; needs the otel extra (docs/observability.md)"
)


def _listed(field: str) -> list[str]:
    """A repeatable flag's default: the tuple field's, as the list ``append`` adds to (a copy)."""
    return list(cast("tuple[str, ...]", _DEFAULT[field]))


def _per_replica(parser: argparse.ArgumentParser, flag: str, metavar: str, field: str, help: str) -> None:
    """A flag ``render envoy`` takes once per replica of the extension server, into the tuple ``field``."""
    parser.add_argument(flag, metavar=metavar, dest=field, action="append", default=_listed(field), help=help)


class _Once(argparse.Action):
    """A flag that may be given once: ``serve`` listens on exactly one address of each kind."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        seen: set[str] = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            parser.error(
                f"{option} given twice: serve listens on one address (run one serve per address; "
                f"render envoy takes {option} once per replica)"
            )
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-extproc", description="Envoy ext_proc extension server for MCP.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-f", "--file", required=True, type=Path, help="resource documents (multi-document YAML)")
        sub.add_argument(
            "--pipeline",
            type=Path,
            default=_DEFAULT["pipeline"],
            help="pipeline configuration (default: authn, mcp, allowlist, policy, pins, credentials, session)",
        )
        sub.add_argument("--log-level", default=_DEFAULT["log_level"], help=_LOG_LEVEL)

    def serving(sub: argparse.ArgumentParser, public_url: str, session_keys: str) -> None:
        """The flags of the commands that serve traffic (``up``, ``serve``)."""
        sub.add_argument("--reload-interval", type=float, default=_DEFAULT["reload_interval_s"], help=_RELOAD)
        sub.add_argument(
            "--public-url", metavar="URL", default=_DEFAULT["public_url"], help=f"{_PUBLIC_URL} ({public_url})"
        )
        sub.add_argument(
            "--session-key-file",
            metavar="FILE",
            type=Path,
            default=_DEFAULT["session_key_file"],
            help=f"{_SESSION_KEYS} ({session_keys})",
        )
        sub.add_argument("--otel", metavar="ENDPOINT", nargs="?", const="", default=_DEFAULT["otel"], help=_OTEL)

    up = commands.add_parser("up", help="run Envoy and the extension server: the whole data path")
    common(up)
    up.add_argument("--listen", default=_DEFAULT["listen"], help=f"where agents connect (default {_shown('listen')})")
    up.add_argument(
        "--unix", default=_DEFAULT["unix"], help="the gRPC server's unix socket (default: a private temporary path)"
    )
    up.add_argument("--metrics", default=_DEFAULT["metrics"], help=_METRICS)
    up.add_argument(
        "--stream-idle-timeout",
        type=int,
        default=_DEFAULT["stream_idle_timeout_s"],
        help="seconds a stream may stay silent",
    )
    up.add_argument(
        "--envoy-log-level",
        default=_DEFAULT["envoy_log_level"],
        help=f"Envoy's --log-level (default {_shown('envoy_log_level')})",
    )
    up.add_argument("--front-door", choices=_DOORS, default=_DEFAULT["front_door"], help=_FRONT_DOOR)
    serving(up, "default http://<listen>", "default $XDG_STATE_HOME/mcp-extproc/session-keys.json")

    serve = commands.add_parser("serve", help="run the extension server alone (for an Envoy run elsewhere)")
    common(serve)
    serve.add_argument(
        "--grpc", action=_Once, default=_DEFAULT["grpc"], help="TCP host:port to listen on; '' disables TCP"
    )
    serve.add_argument("--unix", default=_DEFAULT["unix"], help="also listen on this unix socket")
    serve.add_argument("--authz-http", metavar="PATH", action=_Once, default=_DEFAULT["authz_http"], help=_AUTHZ_HTTP)
    serve.add_argument("--streams", metavar="PATH", action=_Once, default=_DEFAULT["streams"], help=_STREAMS)
    serve.add_argument("--metrics", default=_DEFAULT["metrics"], help=_METRICS)
    serve.add_argument(
        "--report",
        metavar="HOST:PORT",
        action=_Once,
        default=_DEFAULT["report"],
        help="serve /report (what the stages observed: tool pins, virtual backends) to bearers of a token "
        "signed with --session-key-file's keys (the controller's); default off",
    )
    serving(serve, "required with an MCPAgent", "default: a key in memory, lost on restart")

    render = commands.add_parser("render", help="print generated configuration")
    render.add_argument(
        "what",
        choices=["envoy", "k8s"],
        help="envoy: the bootstrap `up` would run; k8s: every object the controller would apply",
    )
    common(render)
    render.add_argument("--listen", default=_DEFAULT["listen"])
    _per_replica(
        render,
        "--grpc",
        "HOST:PORT",
        "extproc_addresses",
        f"where Envoy reaches the extension server (default {_shown('grpc')}); {_REPLICAS}",
    )
    render.add_argument(
        "--unix", default=_DEFAULT["unix"], help="reach the extension server over this unix socket instead"
    )
    _per_replica(render, "--authz-http", "PATH", "authz_http_sockets", f"{_AUTHZ_HTTP}; {_REPLICAS}")
    _per_replica(
        render,
        "--streams",
        "PATH",
        "streams_sockets",
        f"{_STREAMS}; give it once per replica of the extension server: each GET stream goes to the "
        "replica that offered it",
    )
    render.add_argument(
        "--admin-socket",
        metavar="PATH",
        default=_DEFAULT["admin_socket"],
        help="Envoy's admin interface on this unix socket (mode 0600); without it the bootstrap has none",
    )
    render.add_argument("--stream-idle-timeout", type=int, default=_DEFAULT["stream_idle_timeout_s"])
    render.add_argument("--front-door", choices=_DOORS, default=_DEFAULT["front_door"], help=_FRONT_DOOR)
    render.add_argument("--otel", metavar="ENDPOINT", nargs="?", const="", default=_DEFAULT["otel"], help=_OTEL)

    check = commands.add_parser("check", help="validate resource documents and the pipeline configuration")
    common(check)

    keys = commands.add_parser("session-keys", help="make or rotate the key set that signs Mcp-Session-Id values")
    keys.add_argument(
        "action",
        choices=["new", "rotate"],
        help="new: print a fresh key set (JSON) to stdout; rotate: put a fresh key first in FILE, keep 3 in all",
    )
    keys.add_argument(
        "key_file", metavar="FILE", type=Path, nargs="?", help="the key set to rotate (created if missing)"
    )

    _pins_parser(commands)
    _consent_parser(commands)
    stages = commands.add_parser("stages", help="list installed stages (entry points) with their config schema")
    stages.add_argument("--json", action="store_true", help="print JSON instead of text")
    controller = commands.add_parser("controller", help="run the Kubernetes controller (reconcile loop + webhook)")
    controller.add_argument("--kubeconfig", help="a kubeconfig file (default: in-cluster, then ~/.kube/config)")
    controller.add_argument("--namespace", default="mcp-extproc-system", help="the controller's own namespace")
    controller.add_argument("--image", help="the mcp-extproc image injected into agent pods")
    controller.add_argument("--probe", default="0.0.0.0:8080", help="host:port for /healthz and /metrics")
    controller.add_argument("--webhook", default="0.0.0.0:9443", help="host:port of the injection webhook; '' off")
    controller.add_argument("--resync", type=float, default=300.0, help="seconds between full resyncs")
    controller.add_argument(
        "--report-interval",
        type=float,
        default=30.0,
        help="seconds between asking each extension server what it observed (status.tools[], status.backends[])",
    )
    controller.add_argument("--no-leader-election", action="store_true", help="run without a Lease")
    controller.add_argument("--log-level", default=_DEFAULT["log_level"], help=_LOG_LEVEL)
    return parser


def _stages(args: argparse.Namespace) -> int:
    """``mcp-extproc stages``: exit 1 when an installed stage fails to load."""
    import json

    from extproc.commands.stages import format_stages, installed_stages

    found = installed_stages()
    sys.stdout.write(json.dumps(found, indent=2) + "\n" if args.json else format_stages(found))
    return 1 if any("error" in item for item in found) else 0


def _session_keys(args: argparse.Namespace) -> int:
    """``mcp-extproc session-keys new|rotate [FILE]``."""
    import json

    from extproc.config.session_keys import new_key_set, rotate_key_set

    try:
        if args.action == "new":
            sys.stdout.write(json.dumps(new_key_set(), indent=2) + "\n")
            return 0
        if args.key_file is None:
            raise ConfigError("session-keys rotate: name the key file (FILE)")
        kid = rotate_key_set(args.key_file)
    except ExtProcError as exc:
        print(f"mcp-extproc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mcp-extproc: error: {args.key_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{args.key_file}: new signing key {kid}; older keys still verify")
    return 0


def _pins_parser(commands: Any) -> None:
    """``pins show SERVER`` / ``pins approve SERVER [TOOL...]``, on the pins file (default: up's)."""
    pins = commands.add_parser("pins", help="show or approve the pinned tool definitions of an MCP server")
    pins.add_argument("action", choices=["show", "approve"], help="show: pinned and current definitions, a diff")
    pins.add_argument("server", metavar="SERVER", help="the MCPServer's name")
    pins.add_argument("tools", metavar="TOOL", nargs="*", help="approve: these tools (default: every changed one)")
    pins.add_argument(
        "-f", "--file", type=Path, help="the pins file (default $XDG_STATE_HOME/mcp-extproc/pins.json, up's)"
    )


def _pins(args: argparse.Namespace) -> int:
    """``mcp-extproc pins show|approve``; a user error is one line and exit 2."""
    from extproc.commands.pins import approve_text, show_text
    from extproc.config.pins_file import default_pins_file

    path = args.file or default_pins_file()

    def run() -> str:
        if args.action == "approve":
            return approve_text(path, args.server, args.tools)
        if args.tools:
            raise ConfigError("pins show takes no TOOL: it shows every tool of SERVER")
        return show_text(path, args.server)

    return _on_file(path, run)


def _on_file(path: Path, run: Callable[[], str]) -> int:
    """Print what ``run`` (a command on the file ``path``) returns; a user error is one line and exit 2."""
    try:
        sys.stdout.write(run())
    except ExtProcError as exc:
        print(f"mcp-extproc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mcp-extproc: error: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _consent_parser(commands: Any) -> None:
    """``consent grant|revoke|list``, on MCPConsent documents of a local resource file."""
    consent = commands.add_parser(
        "consent", help="record, revoke or list MCPConsent documents in a resource file (up reloads it)"
    )
    consent.add_argument("action", choices=["grant", "revoke", "list"])
    consent.add_argument("-f", "--file", type=Path, required=True, help="the resource file up or serve reads")
    consent.add_argument("--server", help="the MCPServer or MCPVirtualServer consented to")
    consent.add_argument("--user", help="the user who consents (the token's user claim)")
    consent.add_argument("--agent", help="the MCPAgent the user consents for")
    consent.add_argument("--name", help="the MCPConsent's name (default: made of user, agent and server)")
    consent.add_argument("--trust", choices=["low", "medium", "high"], help="grant: the trust consented to")
    consent.add_argument("--expires", help="grant: when it lapses: RFC 3339 with a zone, or a duration (8h, 7d)")


def _consent(args: argparse.Namespace) -> int:
    """``mcp-extproc consent grant|revoke|list``; a user error is one line and exit 2."""
    from datetime import UTC, datetime

    from extproc.commands import consent
    from extproc.config.models import Trust

    wanted = consent.Wanted(args.server, args.user, args.agent, args.name)

    def run() -> str:
        if args.action == "list":
            return consent.listing(args.file)
        if args.action == "revoke":
            return consent.revoke(args.file, wanted)
        if args.trust is None:
            raise ConfigError("consent grant needs --trust low|medium|high")
        expires = consent.expiry(args.expires, datetime.now(UTC))
        return consent.grant(args.file, wanted, Trust(args.trust), expires)

    return _on_file(args.file, run)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings of the flags the parsed command has; a field it has no flag for keeps its default."""
    given: dict[str, Any] = {
        _FIELD_OF_DEST.get(dest, dest): tuple(value) if isinstance(value, list) else value  # repeated flags
        for dest, value in vars(args).items()
    }
    values = {f.name: given[f.name] for f in dataclasses.fields(Settings) if f.name in given}
    values["log_level"] = values["log_level"].upper()
    if "metrics" in values:
        values["metrics"] = values["metrics"] or None  # '' disables
    return Settings(**values)


def quiet_http_clients(level: str) -> None:
    """httpx logs every request at INFO, its whole URL included: the keeper's GETs and ping
    answers (hundreds a second with many kept sessions), JWKS and token fetches. A URL may
    carry a key in its query, so below DEBUG those lines are not written."""
    if logging.getLevelName(level) != logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mcp-extproc`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "stages":
        return _stages(args)
    if args.command == "pins":
        return _pins(args)
    if args.command == "consent":
        return _consent(args)
    if args.command == "session-keys":
        return _session_keys(args)
    if args.command == "controller" or getattr(args, "what", None) == "k8s":
        return _controller_command(args)
    try:
        settings = _settings(args)
        logging.basicConfig(
            level=settings.log_level,
            format=_LOG_FORMAT,
            # render's stdout is a document: its logs go to stderr.
            stream=sys.stdout if args.command in ("up", "serve") else sys.stderr,
        )
        quiet_http_clients(settings.log_level)
        from extproc.commands import inspect, run

        if args.command == "check":
            print(inspect.check(settings))
            return 0
        if args.command == "render":
            sys.stdout.write(inspect.render_envoy(settings))
            return 0
        if args.command == "serve":
            return asyncio.run(run.serve(settings))
        return asyncio.run(run.up(settings))
    except ExtProcError as exc:
        print(f"mcp-extproc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _extension_command(name: str) -> Any:
    """A command another package provides (entry point group ``mcp_extproc.commands``)."""
    found = entry_points(group="mcp_extproc.commands", name=name)
    if not found:
        raise ConfigError(f"command {name!r} is not installed (the controller package provides it)")
    return next(iter(found)).load()


def _controller_command(args: argparse.Namespace) -> int:
    """``render k8s`` and ``controller``, provided by the controller package through entry points.

    The core never imports the controller: it finds these commands the way it finds stages.
    """
    logging.basicConfig(level=args.log_level.upper(), format=_LOG_FORMAT, stream=sys.stdout)
    try:
        if args.command == "controller":
            result: int = _extension_command("controller")(args)
            return result
        text, warnings = _extension_command("render-k8s")(args.file)
        for warning in warnings:
            print(f"mcp-extproc: warning: {warning}", file=sys.stderr)
        sys.stdout.write(text)
        return 0
    except ExtProcError as exc:
        print(f"mcp-extproc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
