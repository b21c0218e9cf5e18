"""Is an address free? Asked before ``up`` and ``serve`` start anything.

Data flow (``check_up`` / ``check_serve``)::

    flags naming one address twice (--listen and --metrics, ...) ──▶ ConfigError
    --listen / --grpc / --metrics host:port ──bind a probe socket (SO_REUSEADDR, never
        SO_REUSEPORT), close it──▶ free, or ConfigError "--listen 127.0.0.1:10000 is
        already in use ..." (one line, exit 2)
    --unix / --authz-http PATH ──connect──▶ nobody answers (free; a stale file is
        replaced later), or ConfigError: another server listens there

Why a probe without ``SO_REUSEPORT``: Envoy binds its listeners with it by default on
Linux, and so would a second Envoy, which then shares the port and takes half the
connections. A socket without the option cannot bind a port someone listens on, whatever
options that one used. ``SO_REUSEADDR`` keeps connections in TIME_WAIT (a gateway just
stopped) from counting as "in use". Port 0 (any free port) is never probed.

The probe cannot stop a process that binds the address a moment later; the real bind
then fails on its own (``up`` renders its listener without ``SO_REUSEPORT`` for that).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from extproc.config.settings import Settings, split_hostport
from extproc.errors import ConfigError


def check_tcp_free(value: str, flag: str) -> None:
    """Raise :class:`ConfigError` naming ``flag`` when ``host:port`` cannot be bound now."""
    host, port = split_hostport(value, flag)
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{flag} {value}: cannot resolve {host!r}: {exc.strerror}") from None
    for family, kind, proto, _name, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{flag} {value} is already in use (another mcp-extproc, or another program, "
                        f"listens there): stop it or pick another address"
                    ) from None
                raise ConfigError(f"{flag} {value}: cannot listen there: {exc.strerror or exc}") from None


def check_unix_free(path: str, flag: str) -> None:
    """Raise :class:`ConfigError` naming ``flag`` when a server already answers on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return  # no file, a stale file, or not a socket: nobody listens
    raise ConfigError(
        f"{flag} {path} is already in use (another mcp-extproc serves there): stop it or pick another path"
    )


def check_distinct(addresses: Iterable[tuple[str, str | None]]) -> None:
    """Raise :class:`ConfigError` when two flags name the same address (``(flag, address)`` pairs)."""
    seen: dict[str, str] = {}
    for flag, address in addresses:
        if not address:
            continue
        if address in seen and not address.endswith(":0"):
            raise ConfigError(f"{flag} {address}: {seen[address]} already uses that address")
        seen.setdefault(address, flag)


def check_up(settings: Settings) -> None:
    """``up``'s ``--listen`` and ``--metrics`` (and ``--unix``) are free and distinct."""
    check_distinct([("--listen", settings.listen), ("--metrics", settings.metrics)])
    check_tcp_free(settings.listen, "--listen")
    if settings.metrics:
        check_tcp_free(settings.metrics, "--metrics")
    if settings.unix:
        check_unix_free(settings.unix, "--unix")


def check_serve(settings: Settings) -> None:
    """``serve``'s ``--grpc``, ``--metrics``, ``--report``, ``--unix`` and ``--authz-http`` are free and distinct."""
    check_distinct([("--grpc", settings.grpc), ("--metrics", settings.metrics), ("--report", settings.report)])
    check_distinct([("--unix", settings.unix), ("--authz-http", settings.authz_http)])
    for flag, address in (("--grpc", settings.grpc), ("--metrics", settings.metrics), ("--report", settings.report)):
        if address:
            check_tcp_free(address, flag)
    for flag, path in (("--unix", settings.unix), ("--authz-http", settings.authz_http)):
        if path:
            check_unix_free(path, flag)


__all__ = ["check_distinct", "check_serve", "check_tcp_free", "check_unix_free", "check_up"]
