"""The session key Secret: what every extension server the controller renders mounts. Pure.

Every ``mcp-extproc serve`` of a namespace (the injected sidecars and every replica of the
shared extension server) signs and verifies legacy ``Mcp-Session-Id`` values with the same
key set, so a session opened through one of them continues through any other, and after
a restart. The key set lives in one Secret per namespace::

    Secret mcp-extproc-session-keys (key jwks.json: a JSON Web Key Set,
        created once by the controller runtime (controller.runtime.session_keys),
        or by hand: mcp-extproc session-keys new > jwks.json;
                    kubectl create secret generic mcp-extproc-session-keys --from-file=jwks.json)
      ──volume()──▶ a secret volume with that one key
      ──mount()───▶ read-only at <socket_dir>/session-keys/ (/var/run/mcp-extproc/session-keys/)
      ──args()────▶ serve --session-key-file <socket_dir>/session-keys/jwks.json

The renderers only refer to the Secret; they never make key material (``render k8s``
stays deterministic). :func:`secret` builds the object around a key set the caller made.
The Secret carries no owner reference and not the ``managed-by`` label: it outlives the
resources (deleting the last MCPAgent must not end every session's key) and is never pruned.
"""

from __future__ import annotations

from typing import Any, Final

from controller.render.meta import MANAGER, ControllerSettings

NAME: Final = "mcp-extproc-session-keys"
DATA_KEY: Final = "jwks.json"
VOLUME: Final = "mcp-extproc-session-keys"
CREATED_BY: Final = "app.kubernetes.io/created-by"
"""Label on the Secret the controller created (not ``managed-by``: nothing prunes it)."""


def key_dir(settings: ControllerSettings) -> str:
    """Where the Secret is mounted: ``session-keys/`` beside the sockets."""
    return f"{settings.socket_dir}/session-keys"


def key_file(settings: ControllerSettings) -> str:
    """The key set's path inside the extension server's container."""
    return f"{key_dir(settings)}/{DATA_KEY}"


def volume() -> dict[str, Any]:
    """The pod volume: the Secret's one key (a Secret without it keeps the pod from starting)."""
    return {"name": VOLUME, "secret": {"secretName": NAME, "items": [{"key": DATA_KEY, "path": DATA_KEY}]}}


def mount(settings: ControllerSettings) -> dict[str, Any]:
    """The extension server container's read-only mount of :func:`volume`."""
    return {"name": VOLUME, "mountPath": key_dir(settings), "readOnly": True}


def args(settings: ControllerSettings) -> list[str]:
    """``serve``'s flag naming the mounted key set."""
    return ["--session-key-file", key_file(settings)]


def secret(namespace: str, jwks_json: str) -> dict[str, Any]:
    """The Secret holding ``jwks_json`` (a key set serialized as JSON) in ``namespace``."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": NAME,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": NAME, CREATED_BY: MANAGER},
        },
        "type": "Opaque",
        "stringData": {DATA_KEY: jwks_json},
    }


__all__ = ["DATA_KEY", "NAME", "args", "key_file", "mount", "secret", "volume"]
