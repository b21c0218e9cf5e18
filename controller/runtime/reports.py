"""Ask every extension server of a namespace what it observed. The I/O edge of :mod:`controller.render.observed`.

Data flow::

    Kube.get(Secret mcp-extproc-session-keys) ──parse_key_set──▶ the namespace's key set
        (none yet, or unreadable: no reports this pass, logged)
    Kube.list(Pod) ──running, with a pod IP, and either injected (annotation
        mcp.extproc.io/injected) or a replica of the shared server (label
        app.kubernetes.io/name: mcp-extproc)──▶ targets
    for each (16 at a time): GET http://<pod IP>:<report port>/report, Bearer mint_token(keys), 2 s
        ──parse_report──▶ Report   (no answer, not 200, not a report: left out, logged)

A pod that does not answer costs one timeout and says nothing: its tools keep the
status they had (:func:`controller.render.observed.server_tools`). Whoever may create pods
in a namespace may mount its key Secret too, so a pod is trusted as far as the namespace
is; the token it is sent is good for reading reports for a minute, nothing else.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import httpx

from controller.render import session_keys
from controller.render.extserver import APP_LABEL
from controller.render.meta import EXTPROC_NAME, INJECTED_ANNOTATION, ControllerSettings
from controller.render.observed import Report, parse_report
from controller.runtime.kube import Kube
from extproc.config.session_keys import SessionKeys, parse_key_set
from extproc.core.report import PATH, mint_token
from extproc.errors import ConfigError

log = logging.getLogger("mcp_extproc.controller")

TIMEOUT_S: Final = 2.0
MAX_PARALLEL: Final = 16
MAX_REPORT_BYTES: Final = 4 * 1024 * 1024

Fetch = Callable[[str, str], Any]
"""(url, token) ──▶ the decoded JSON body; raises on anything else."""


def _keys(secret: Mapping[str, Any] | None) -> SessionKeys | None:
    if secret is None:
        return None
    data = secret.get("data") or {}
    text = data.get(session_keys.DATA_KEY)
    try:
        raw = base64.b64decode(text).decode() if text else (secret.get("stringData") or {}).get(session_keys.DATA_KEY)
        return parse_key_set(json.loads(raw), f"Secret {session_keys.NAME}") if raw else None
    except (ValueError, ConfigError) as exc:
        log.warning("Secret %s is not a session key set; no reports are asked for: %s", session_keys.NAME, exc)
        return None


def targets(pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(pod name, pod IP) of every running extension server among ``pods``."""
    found = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ours = (
            INJECTED_ANNOTATION in (meta.get("annotations") or {})
            or (meta.get("labels") or {}).get(APP_LABEL) == EXTPROC_NAME
        )
        ip = status.get("podIP")
        if ours and status.get("phase") == "Running" and isinstance(ip, str) and ip:
            found.append((str(meta.get("name")), ip))
    return sorted(found)


def fetch_json(url: str, token: str) -> Any:
    """GET ``url`` with ``token``; the JSON body of a 200 (at most :data:`MAX_REPORT_BYTES`)."""
    with (
        httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as http,
        http.stream("GET", url, headers={"authorization": f"Bearer {token}"}) as answer,
    ):
        if answer.status_code != 200:
            raise ValueError(f"HTTP {answer.status_code}")
        body = b""
        for chunk in answer.iter_bytes():
            body += chunk
            if len(body) > MAX_REPORT_BYTES:
                raise ValueError(f"over {MAX_REPORT_BYTES} bytes")
        return json.loads(body)


def collect(kube: Kube, namespace: str, settings: ControllerSettings, fetch: Fetch = fetch_json) -> list[Report]:
    """The reports of ``namespace``'s extension servers that answered (module docstring).

    Raises:
        KubeError: the API failed listing pods or reading the key Secret.
    """
    pods = targets(kube.list("Pod", namespace))
    if not pods:
        return []
    keys = _keys(kube.get("Secret", session_keys.NAME, namespace))
    if keys is None:
        return []
    token = mint_token(keys)

    def ask(pod: tuple[str, str]) -> Report | None:
        name, ip = pod
        host = f"[{ip}]" if ":" in ip else ip
        url = f"http://{host}:{settings.report_port}{PATH}"
        try:
            body = fetch(url, token)
        except (httpx.HTTPError, ValueError, OSError) as exc:
            log.info("no report from pod %s/%s (%s): %s", namespace, name, url, exc)
            return None
        return parse_report(body, f"pod {namespace}/{name}")

    # At once, so that pods that do not answer cost one timeout together, not one each.
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(pods))) as pool:
        return [r for r in pool.map(ask, pods) if r is not None]


__all__ = ["collect", "fetch_json", "targets"]
