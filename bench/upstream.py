"""The fast upstream: an Envoy answering every request with a canned JSON-RPC result.

Not a product feature, so the bootstrap is a small dict here rather than in
``extproc.render.bootstrap``. Pure: no I/O.

A ``buffer`` filter reads the whole request body before the ``direct_response``
route answers: answering a request that has not finished arriving makes Envoy
send ``connection: close``, and the front Envoy would then open a new upstream
connection for every request.
"""

from __future__ import annotations

import json
from typing import Any, Final

CANNED_RESULT: Final[dict[str, Any]] = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {"content": [{"type": "text", "text": "hi"}]},
}
"""What the upstream answers to every request."""

_T: Final = "type.googleapis.com/"
_MAX_REQUEST_BYTES: Final = 1024 * 1024


def _socket(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def upstream_bootstrap(admin_socket: str, listen_port: int = 0) -> dict[str, Any]:
    """The canned upstream's Envoy bootstrap (port 0: Envoy picks; read it from the admin API at ``admin_socket``)."""
    hcm = {
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "canned",
        "route_config": {
            "name": "canned",
            "virtual_hosts": [
                {
                    "name": "canned",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": json.dumps(CANNED_RESULT, separators=(",", ":"))},
                            },
                            "response_headers_to_add": [
                                {
                                    "header": {"key": "content-type", "value": "application/json"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }
                            ],
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": _T + "envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": _MAX_REQUEST_BYTES,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "node": {"id": "bench-upstream", "cluster": "bench-upstream"},
        # Like every Envoy here: the admin API (no authentication) on a private unix socket.
        "admin": {"address": {"pipe": {"path": admin_socket, "mode": 0o600}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "canned",
                    "address": _socket(listen_port),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ]
        },
    }
