"""The extension server's endpoints, and what steers Envoy off a dead replica. Pure: no I/O.

Split from :mod:`extproc.render.filters`, whose clusters and filters use it::

    BootstrapOptions.extproc_endpoints     ("host:port" | "unix:PATH", one per replica)
    BootstrapOptions.authz_http_endpoints  (unix socket paths, one per replica)
        ──lb_endpoints()──▶ the cluster's load_assignment: every address an endpoint
        ──with several──▶ replica_health(): an active health check every second
                          (gRPC health, or a plain connect for the HTTP service), outlier
                          detection ejecting a replica at its first connection failure,
                          HTTP/2 keepalive on the gRPC connections
                         retry_policy(): a call whose connection failed or was reset is
                          tried once more on another replica (filters fail closed
                          only when every replica fails)

With one address nothing of this is rendered: there is no other replica to steer to, and
the bootstrap ``up`` and the sidecars run stays as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from extproc.config.settings import split_hostport
from extproc.errors import ConfigError

_T: Final = "type.googleapis.com/"
UNIX_PREFIX: Final = "unix:"
HEALTH_INTERVAL: Final = "1s"
"""How often Envoy asks each replica whether it serves (and, at most, how long a dead one is used)."""
EJECTION_TIME: Final = "5s"
"""How long a replica whose connection failed stays out (growing with repeated ejections)
unless a health check passes first."""


def endpoint_address(address: str) -> dict[str, Any]:
    """An Envoy address for ``host:port`` or ``unix:PATH``."""
    if address.startswith(UNIX_PREFIX):
        path = address.removeprefix(UNIX_PREFIX)
        if not path:
            raise ConfigError("the extension server's unix socket path is empty")
        return {"pipe": {"path": path}}
    host, port = split_hostport(address, "the extension server's address")
    return {"socket_address": {"address": host, "port_value": port}}


def lb_endpoints(cluster: str, addresses: Sequence[str]) -> dict[str, Any]:
    """A ``load_assignment`` with every address as an endpoint (Envoy balances round robin)."""
    if not addresses:
        raise ConfigError("the bootstrap needs the extension server's TCP address or unix socket")
    if len(set(addresses)) != len(addresses):
        raise ConfigError(f"the extension server's addresses name one twice: {', '.join(addresses)}")
    endpoints = [{"endpoint": {"address": endpoint_address(a)}} for a in addresses]
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": endpoints}]}


def replica_health(*, grpc: bool) -> dict[str, Any]:
    """Cluster fields for several replicas: active health checks and outlier detection.

    ``grpc``: the gRPC server (the standard gRPC health service: a replica shutting down
    answers NOT_SERVING and is left before it stops); otherwise the HTTP authorization
    service, checked by connecting.
    """
    check: dict[str, Any] = {
        "timeout": "1s",
        "interval": HEALTH_INTERVAL,
        "no_traffic_interval": HEALTH_INTERVAL,
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
    }
    if grpc:
        check["grpc_health_check"] = {}
    else:
        check["tcp_health_check"] = {}
    fields: dict[str, Any] = {
        "health_checks": [check],
        "outlier_detection": {
            # Connection failures, resets and timeouts count on their own, and the first
            # one ejects: a killed replica refuses connections at once.
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "interval": HEALTH_INTERVAL,
            "base_ejection_time": EJECTION_TIME,
            "max_ejection_percent": 50,
        },
    }
    return fields


def http2_keepalive() -> dict[str, Any]:
    """HTTP/2 pings on the gRPC connections: a replica gone silent (its host lost) is noticed."""
    return {"connection_keepalive": {"interval": "10s", "timeout": "5s"}}


def retry_policy(*, grpc: bool) -> dict[str, Any]:
    """One more try, on another replica, for a call that never reached a live one.

    Only failures before an answer: the connection failed or was refused, the stream was
    reset or refused (and, over gRPC, UNAVAILABLE: a replica that is stopping).
    """
    retry_on = "connect-failure,refused-stream,reset" + (",unavailable" if grpc else "")
    return {
        "retry_on": retry_on,
        "num_retries": 1,
        "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": _T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }


__all__ = ["endpoint_address", "http2_keepalive", "lb_endpoints", "replica_health", "retry_policy"]
