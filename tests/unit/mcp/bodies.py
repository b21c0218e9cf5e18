"""JSON-RPC request bodies for the codec's tests."""

from __future__ import annotations

import json
from typing import Any, Final

MODERN: Final = "2026-07-28"
LEGACY: Final = "2025-11-25"


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def request(method: str, params: dict[str, Any] | None = None, id: Any = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        obj["params"] = params
    return obj
