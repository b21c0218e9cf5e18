"""Sidecar injection: the JSON patch that adds Envoy and the extension server to an agent pod. Pure.

Data flow::

    pod (from an AdmissionReview) + the namespace's MCPAgents
        ──opted out (mcp.extproc.io/inject: "false") or already injected──▶ no patch
        ──first agent (by name) whose selector matches the pod's labels──▶
            volumes:         mcp-extproc-socket (emptyDir: the extension server's unix sockets
                             and Envoy's admin socket, mounted by the sidecars only),
                             mcp-extproc-config (projected: ConfigMap + optional Secret mcp-agent-<agent>),
                             mcp-extproc-session-keys (Secret mcp-extproc-session-keys: the
                             namespace's session key set, mounted by mcp-extproc only)
            initContainers:  [mcp-egress-init (iptables, only with egress.sidecarOnly)],
                             mcp-extproc, mcp-envoy (native sidecars: restartPolicy Always,
                             started before the app containers)
                             (mcp-extproc: serve --public-url http://127.0.0.1:<sidecar_port>,
                             the address the agent uses, which authn's challenges name;
                             --session-key-file <socket_dir>/session-keys/jwks.json)
            env (every app container): MCP_EXTPROC_URL, MCP_SERVER_<NAME>_URL
            annotation:      mcp.extproc.io/injected: <agent>
        ──▶ RFC 6902 JSON patch

Both sidecars run as one UID (``ControllerSettings.envoy_uid``): with
``egress.sidecarOnly`` it is the only UID whose packets may leave the pod.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from controller.render import session_keys
from controller.render.meta import INJECT_ANNOTATION, INJECTED_ANNOTATION, ControllerSettings, agent_object_name
from controller.render.sidecar import CONFIG_DIR, serve_args
from extproc.config.models import LabelSelector, MCPAgent

ENVOY_CONTAINER: Final = "mcp-envoy"
EXTPROC_CONTAINER: Final = "mcp-extproc"
EGRESS_INIT_CONTAINER: Final = "mcp-egress-init"
SOCKET_VOLUME: Final = "mcp-extproc-socket"
CONFIG_VOLUME: Final = "mcp-extproc-config"


def selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector matches everything)."""
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for expr in selector.match_expressions:
        present = expr.key in labels
        value = labels.get(expr.key)
        if expr.operator == "In" and value not in expr.values:
            return False
        if expr.operator == "NotIn" and present and value in expr.values:
            return False
        if expr.operator == "Exists" and not present:
            return False
        if expr.operator == "DoesNotExist" and present:
            return False
    return True


def matching_agent(pod: Mapping[str, Any], agents: Sequence[MCPAgent]) -> MCPAgent | None:
    """The first Sidecar-mode agent (by name) whose selector matches ``pod``."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for agent in sorted(agents, key=lambda a: a.name):
        selector = agent.spec.selector
        if agent.spec.attachment == "Sidecar" and selector is not None and selector_matches(selector, labels):
            return agent
    return None


def server_env_name(server: str) -> str:
    """``MCP_SERVER_<NAME>_URL`` for a server name (``-`` and ``.`` become ``_``)."""
    return "MCP_SERVER_" + re.sub(r"[^A-Za-z0-9]", "_", server).upper() + "_URL"


def egress_script(settings: ControllerSettings) -> str:
    """iptables rules letting only the sidecars' UID leave the pod (plus loopback, DNS, replies)."""
    rules = [
        "-A OUTPUT -o lo -j ACCEPT",
        f"-A OUTPUT -m owner --uid-owner {settings.envoy_uid} -j ACCEPT",
        "-A OUTPUT -p udp --dport 53 -j ACCEPT",
        "-A OUTPUT -p tcp --dport 53 -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A OUTPUT -j REJECT",
    ]
    lines = ["set -eu"]
    lines += [f"iptables -w {r}" for r in rules]
    lines += [f"ip6tables -w {r}" for r in rules]
    return "\n".join(lines) + "\n"


def _sidecar_security(settings: ControllerSettings) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.envoy_uid,
        "runAsGroup": settings.envoy_uid,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _probe_exec(code: str) -> dict[str, Any]:
    # Both sidecars listen on 127.0.0.1 or a unix socket only (Envoy's admin: a unix
    # socket), so kubelet's httpGet and tcpSocket (which dial the pod IP) cannot reach
    # them; the image's Python can.
    return {"exec": {"command": ["python", "-c", code]}, "periodSeconds": 2, "failureThreshold": 30}


def _admin_ready_code(admin_socket: str) -> str:
    """Envoy's ``/ready`` over its admin unix socket (mode 0600: the probe runs as Envoy's UID)."""
    return (
        "import http.client, socket; c = http.client.HTTPConnection('localhost', timeout=1); "
        f"c.sock = socket.socket(socket.AF_UNIX); c.sock.settimeout(1); c.sock.connect({admin_socket!r}); "
        "c.request('GET', '/ready'); raise SystemExit(c.getresponse().status != 200)"
    )


def sidecar_containers(agent: MCPAgent, settings: ControllerSettings) -> list[dict[str, Any]]:
    """The init containers to add, in start order."""
    mounts = [
        {"name": SOCKET_VOLUME, "mountPath": settings.socket_dir},
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    # Idle, each sidecar holds about 64 MB resident (bench/README.md, "Idle memory").
    resources = {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}}
    extproc = {
        "name": EXTPROC_CONTAINER,
        "image": settings.image,
        "restartPolicy": "Always",
        "args": serve_args(
            "--grpc",
            "",
            "--unix",
            settings.socket_path,
            "--authz-http",
            settings.authz_socket_path,
            "--streams",
            settings.streams_socket_path,
            "--metrics",
            "127.0.0.1:9464",
            "--report",
            f"0.0.0.0:{settings.report_port}",
            "--public-url",
            sidecar_url(settings),
            *session_keys.args(settings),
        ),
        "ports": [{"name": "mcp-report", "containerPort": settings.report_port, "protocol": "TCP"}],
        "startupProbe": _probe_exec(
            f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({settings.socket_path!r})"
        ),
        "resources": resources,
        "securityContext": _sidecar_security(settings),
        "volumeMounts": [*mounts, session_keys.mount(settings)],
    }
    envoy = {
        "name": ENVOY_CONTAINER,
        "image": settings.image,
        "restartPolicy": "Always",
        "command": ["envoy"],
        # One worker thread: one agent's traffic needs no more, and each worker costs memory
        # (Envoy starts one per CPU of the node by default, whatever the pod's CPU limit).
        "args": ["-c", f"{CONFIG_DIR}/envoy.yaml", "--log-level", "warning", "--concurrency", "1"],
        "startupProbe": _probe_exec(_admin_ready_code(settings.admin_socket_path)),
        "resources": resources,
        "securityContext": _sidecar_security(settings),
        "volumeMounts": mounts,
    }
    containers: list[dict[str, Any]] = [extproc, envoy]
    if agent.spec.egress.sidecar_only:
        init: dict[str, Any] = {
            "name": EGRESS_INIT_CONTAINER,
            "image": settings.image,
            "command": ["sh", "-c", egress_script(settings)],
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": False,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            },
        }
        containers.insert(0, init)
    return containers


def sidecar_url(settings: ControllerSettings) -> str:
    """Where the agent reaches its sidecar Envoy: also the public URL ``authn`` names there."""
    return f"http://127.0.0.1:{settings.sidecar_port}"


def agent_env(agent: MCPAgent, settings: ControllerSettings) -> list[dict[str, str]]:
    """Environment variables pointing the agent's MCP clients at the sidecar."""
    base = sidecar_url(settings)
    env = [{"name": "MCP_EXTPROC_URL", "value": base}]
    env += [{"name": server_env_name(r.name), "value": f"{base}/{r.name}/mcp"} for r in agent.spec.mcp_server_refs]
    return env


def injection_patch(
    pod: Mapping[str, Any], agents: Sequence[MCPAgent], settings: ControllerSettings
) -> tuple[list[dict[str, Any]], str | None]:
    """The JSON patch for ``pod`` and the agent it was injected for; ``([], None)`` when left alone."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = pod.get("spec") or {}
    if str(annotations.get(INJECT_ANNOTATION, "")).lower() == "false" or INJECTED_ANNOTATION in annotations:
        return [], None
    names = {c.get("name") for c in [*spec.get("containers", []), *spec.get("initContainers", [])]}
    if ENVOY_CONTAINER in names:
        return [], None
    agent = matching_agent(pod, agents)
    if agent is None:
        return [], None
    ops: list[dict[str, Any]] = []
    if not annotations:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append({"op": "add", "path": "/metadata/annotations/" + _escape(INJECTED_ANNOTATION), "value": agent.name})
    name = agent_object_name(agent.name)
    volumes = [
        {"name": SOCKET_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": CONFIG_VOLUME,
            "projected": {
                "sources": [
                    {"configMap": {"name": name}},
                    {"secret": {"name": name, "optional": True}},
                ]
            },
        },
        session_keys.volume(),
    ]
    if "volumes" not in spec:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    else:
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    sidecars = sidecar_containers(agent, settings)
    if "initContainers" not in spec:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": sidecars})
    else:
        ops += [{"op": "add", "path": f"/spec/initContainers/{i}", "value": c} for i, c in enumerate(sidecars)]
    env = agent_env(agent, settings)
    for i, container in enumerate(spec.get("containers", [])):
        if "env" not in container:
            ops.append({"op": "add", "path": f"/spec/containers/{i}/env", "value": env})
        else:
            ops += [{"op": "add", "path": f"/spec/containers/{i}/env/-", "value": e} for e in env]
    return ops, agent.name


def _escape(key: str) -> str:
    """RFC 6901 escaping of one JSON pointer token."""
    return key.replace("~", "~0").replace("/", "~1")
