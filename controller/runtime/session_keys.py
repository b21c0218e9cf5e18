"""Create a namespace's session key Secret once; never touch an existing one.

Data flow::

    Reconciler (rendered.session_keys: an extension server of the namespace mounts it)
        ──Kube.get(Secret mcp-extproc-session-keys)──▶ exists: left exactly as it is
                                                          (made by hand, rotated, or ours)
        └─ 404 ──new_key_set() → JSON──▶ Kube.create (POST, not apply: a Secret created
                 meanwhile by someone else answers 409 and is kept, not overwritten)

The key material is made here, at the I/O edge, so the renderers stay pure and
``render k8s`` deterministic (:mod:`controller.render.session_keys` only refers to the
Secret). The controller needs ``get`` and ``create`` on Secrets for it
(``deploy/controller/rbac.yaml``), never ``update`` of this one.
"""

from __future__ import annotations

import json
import logging

from controller.render import session_keys
from controller.runtime.kube import Kube, KubeError
from extproc.config.session_keys import new_key_set

log = logging.getLogger("mcp_extproc.controller")


def ensure_session_keys(kube: Kube, namespace: str) -> bool:
    """Create the session key Secret in ``namespace`` unless it exists; True when created.

    Raises:
        KubeError: the API failed (other than "it exists already").
    """
    if kube.get("Secret", session_keys.NAME, namespace) is not None:
        return False
    document = json.dumps(new_key_set(), indent=2) + "\n"
    try:
        kube.create(session_keys.secret(namespace, document))
    except KubeError as exc:
        if exc.status == 409:  # created meanwhile (another replica, a person): theirs is kept
            return False
        raise
    log.info("created Secret %s/%s: a new session key set", namespace, session_keys.NAME)
    return True


__all__ = ["ensure_session_keys"]
