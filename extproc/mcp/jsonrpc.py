"""JSON-RPC 2.0 codec for MCP requests: decode, classify, validate, re-encode.

Pure: no I/O. :func:`parse_request` runs a *ladder* over one HTTP request
body and its headers and returns either an :class:`McpRequest` or the
:class:`Rejection` of the first rung that failed:

1. size: the body fits ``max_bytes`` (else 413);
2. syntax: UTF-8 JSON, no ``NaN``/``Infinity``, no repeated object keys
   (:mod:`extproc.mcp.strict_json`, shared with the response readers that must be certain);
3. shape: one object, or a non-empty array (a batch);
4. batches: only in revisions 2024-11-05 and 2025-03-26, never modern;
5. envelope: every element is a JSON-RPC 2.0 request, notification or response;
6. ``tools/call`` names its tool (``params.name``), arguments are an object; no
   method or tool name holds a control character or a lone surrogate
   (:func:`unsafe_text`): the ``x-mcp-*`` headers derived from them could not carry it
   (-32600 for a method, -32602 for a tool name, HTTP 400, with the request's id);
7. per-request version: a request sent with a 2026-07-28 ``MCP-Protocol-Version``
   carries its protocol version in ``params._meta``; one without it is malformed
   and refused with ``-32602`` Invalid params (HTTP 400), as the specification
   says of a request missing a required per-request field ("Per-request protocol
   fields", basic/index), not with a header mismatch: there is no body value for
   the header to disagree with. (The other required field, the client
   capabilities, is the upstream's to check: the gateway decides nothing on it.)
8. headers: on the 2026-07-28 revision ``MCP-Protocol-Version``, ``Mcp-Method``
   and ``Mcp-Name`` must mirror the body; in any era a routing header that is
   present must agree with the body.

Duplicate routing header lines are checked separately, on the raw header list,
by :func:`find_duplicated_routing_header`. The header-side names (:class:`Era`,
:class:`HeaderHints`, :func:`header_hints`, :func:`find_duplicated_routing_header`)
live in :mod:`extproc.mcp.headers` and are re-exported here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from extproc.mcp.codes import http_status_for
from extproc.mcp.headers import (
    MCP_PROTOCOL_VERSION,
    Era,
    HeaderHints,
    find_duplicated_routing_header,
    header_hints,
    quote,
    routing_header_mismatch,
)
from extproc.mcp.spec import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MODERN_PROTOCOL_VERSIONS,
    PARSE_ERROR,
    PROTOCOL_VERSION_META_KEY,
)
from extproc.mcp.strict_json import DuplicateKeyError, strict_loads

__all__ = [
    "BATCH_PROTOCOL_VERSIONS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "Era",
    "HeaderHints",
    "McpRequest",
    "Message",
    "Rejection",
    "encode_error",
    "error_object",
    "find_duplicated_routing_header",
    "header_hints",
    "parse_message",
    "parse_request",
    "unsafe_text",
]

DEFAULT_MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024
"""Largest request body :func:`parse_request` accepts by default (4 MiB)."""

BATCH_PROTOCOL_VERSIONS: Final[frozenset[str]] = frozenset({"2024-11-05", "2025-03-26"})
"""Revisions that allow JSON-RPC batches; a request without a version header counts as 2025-03-26."""


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded JSON-RPC element: a request, a notification or a response.

    Attributes:
        kind: ``"response"`` covers error responses too.
        id: The request id; ``None`` for notifications (and error responses to
            an unknown id).
        method: The method of a request or notification; ``None`` for responses.
        params: The ``params`` object, when present.
        raw: The decoded object exactly as received; :meth:`McpRequest.encode` writes it.
    """

    kind: Literal["request", "notification", "response"]
    id: str | int | None
    method: str | None
    params: Mapping[str, Any] | None
    raw: Mapping[str, Any]

    @property
    def tool_name(self) -> str | None:
        """The tool a ``tools/call`` names (``params.name``), else ``None``."""
        if self.method != "tools/call" or self.params is None:
            return None
        name = self.params.get("name")
        return name if isinstance(name, str) else None

    @property
    def arguments(self) -> Mapping[str, Any] | None:
        """The ``params.arguments`` object of a ``tools/call``, else ``None``."""
        if self.method != "tools/call" or self.params is None:
            return None
        arguments = self.params.get("arguments")
        return arguments if isinstance(arguments, Mapping) else None


def _json_default(obj: object) -> Any:
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _dumps(obj: Any) -> bytes:
    compact = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    try:
        return compact.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped
        return json.dumps(obj, separators=(",", ":"), default=_json_default).encode("ascii")


@dataclass(frozen=True, slots=True)
class McpRequest:
    """A request body that passed every rung of :func:`parse_request`.

    Attributes:
        messages: The decoded elements, in body order (one unless a batch).
        is_batch: Whether the body was a JSON array.
        era: Which wire shape the request uses.
        protocol_version: From ``MCP-Protocol-Version`` or ``params._meta``, when known.
    """

    messages: tuple[Message, ...]
    is_batch: bool
    era: Era
    protocol_version: str | None

    @property
    def method(self) -> str | None:
        """The first message's method (``None`` for a response or an empty request)."""
        return self.messages[0].method if self.messages else None

    @property
    def tool_name(self) -> str | None:
        """The first message's tool name, when it is a ``tools/call``."""
        return self.messages[0].tool_name if self.messages else None

    def encode(self) -> bytes:
        """Encode as compact UTF-8 JSON: one object, or an array when :attr:`is_batch`.

        Raises:
            ValueError: A non-batch request holds no message (after :meth:`keep`).
        """
        if self.is_batch:
            return _dumps([m.raw for m in self.messages])
        if not self.messages:
            raise ValueError("a non-batch McpRequest with no message has nothing to encode")
        return _dumps(self.messages[0].raw)

    def keep(self, indices: Iterable[int]) -> McpRequest:
        """Return a copy holding only the messages at ``indices``, in their original order.

        Raises:
            IndexError: An index is outside ``range(len(self.messages))``.
        """
        wanted = set(indices)
        if bad := sorted(i for i in wanted if not 0 <= i < len(self.messages)):
            raise IndexError(f"message index {bad[0]} out of range for {len(self.messages)} message(s)")
        kept = tuple(m for i, m in enumerate(self.messages) if i in wanted)
        return McpRequest(kept, self.is_batch, self.era, self.protocol_version)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request refused before any stage decides on it.

    Attributes:
        status: The HTTP status to answer with.
        code: The JSON-RPC error code.
        message: What was wrong and what would be right.
        id: The request id, when known.
        data: Optional JSON-RPC ``error.data``.
    """

    status: int
    code: int
    message: str
    id: str | int | None = None
    data: Any = None


def error_object(id: str | int | None, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """Build a JSON-RPC 2.0 error response object (``data`` only when not ``None``)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": error}


def encode_error(id: str | int | None, code: int, message: str, data: Any = None) -> bytes:
    """Encode :func:`error_object` as compact UTF-8 JSON."""
    return _dumps(error_object(id, code, message, data))


def _valid_id(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _classify(obj: object) -> Message | str:
    """Classify one decoded element, or say why it is not JSON-RPC 2.0."""
    if not isinstance(obj, dict):
        return f"a JSON-RPC message must be an object, not a JSON {_json_type(obj)}"
    if obj.get("jsonrpc") != "2.0":
        return 'a JSON-RPC message needs "jsonrpc": "2.0"'
    params = obj.get("params")
    if params is not None and not isinstance(params, dict):
        return f'"params" must be an object, not a JSON {_json_type(params)}'
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str):
            return f'"method" must be a string, not a JSON {_json_type(method)}'
        if "id" not in obj:
            return Message("notification", None, method, params, obj)
        if not _valid_id(obj["id"]):
            return f'a request "id" must be a string or an integer, not a JSON {_json_type(obj["id"])}'
        return Message("request", obj["id"], method, params, obj)
    has_result, has_error = "result" in obj, "error" in obj
    if has_result == has_error:
        return 'a JSON-RPC message needs "method" (request), or exactly one of "result" and "error" (response)'
    if has_error and not isinstance(obj["error"], dict):
        return '"error" must be an object with "code" and "message"'
    if not (_valid_id(obj.get("id")) or (has_error and obj.get("id", 0) is None)):
        return 'a response needs the "id" of the request it answers, a string or an integer'
    return Message("response", obj["id"], None, None, obj)


def parse_message(obj: Any) -> Message | None:
    """Classify one decoded JSON element; ``None`` if it is not a JSON-RPC 2.0 message."""
    message = _classify(obj)
    return message if isinstance(message, Message) else None


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


_UNSAFE_TEXT: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def unsafe_text(value: str) -> str | None:
    """Why ``value`` cannot name a tool or method (a control character, a lone surrogate), or ``None``.

    Such names cannot travel in the ``x-mcp-*`` headers derived from them (a header
    value holds no NUL, CR or LF, and a lone surrogate has no UTF-8 encoding).
    """
    found = _UNSAFE_TEXT.search(value)
    if found is None:
        return None
    char = found.group()
    what = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return f"it holds {what} (U+{ord(char):04X} at index {found.start()})"


def _meta_version(element: object) -> tuple[bool, Any]:
    """Whether ``params._meta`` carries the protocol-version key (the modern signal), and its value.

    The key's presence, not its value, marks a modern-shaped message, as in the
    MCP SDK's server: a modern body at an unknown revision is still modern.
    """
    params = element.get("params") if isinstance(element, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    if isinstance(meta, dict) and PROTOCOL_VERSION_META_KEY in meta:
        return True, meta[PROTOCOL_VERSION_META_KEY]
    return False, None


def parse_request(
    body: bytes, headers: Mapping[str, str], *, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> McpRequest | Rejection:
    """Decode and validate an MCP request body; see the module docstring for the ladder.

    Args:
        body: The whole HTTP request body.
        headers: The request headers, keys lower-case.
        max_bytes: The largest body accepted.

    Returns:
        The parsed request, or the :class:`Rejection` of the first failing rung.
        Never raises on any input.
    """
    if len(body) > max_bytes:
        return Rejection(413, INVALID_REQUEST, f"request body of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    try:
        decoded = strict_loads(body)
    except UnicodeDecodeError as e:
        return Rejection(400, PARSE_ERROR, f"request body is not valid UTF-8 (bad byte at offset {e.start})")
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno} (char {e.pos})"
        return Rejection(400, PARSE_ERROR, f"request body is not valid JSON: {e.msg} at {where}")
    except DuplicateKeyError as e:
        key = quote(e.args[0])
        msg = f"request body repeats the key {key} in one JSON object; each key may appear only once"
        return Rejection(400, INVALID_REQUEST, msg)
    except ValueError as e:  # NaN/Infinity, or an integer past the int-to-str digit limit
        return Rejection(400, PARSE_ERROR, f"request body is not valid JSON: {e}")
    except RecursionError:
        return Rejection(400, PARSE_ERROR, "request body is not acceptable JSON: it nests too deeply")
    return _validate(decoded, headers)


def _validate(decoded: Any, headers: Mapping[str, str]) -> McpRequest | Rejection:
    is_batch = isinstance(decoded, list)
    elements: list[Any] = decoded if is_batch else [decoded]
    if is_batch and not elements:
        return Rejection(400, INVALID_REQUEST, "empty batch: a JSON-RPC batch must hold at least one message")
    if not is_batch and not isinstance(decoded, dict):
        msg = f"request body must be a JSON-RPC object or a batch array, not a JSON {_json_type(decoded)}"
        return Rejection(400, INVALID_REQUEST, msg)
    header_version = headers.get(MCP_PROTOCOL_VERSION)
    if is_batch and (rejection := _batch_rejection(elements, header_version)) is not None:
        return rejection
    messages: list[Message] = []
    for index, element in enumerate(elements):
        message = _classify(element)
        if isinstance(message, str):
            where = f"batch element {index}" if is_batch else "request body"
            raw_id = element.get("id") if isinstance(element, dict) else None
            return Rejection(400, INVALID_REQUEST, f"{where} is not valid: {message}", _id_or_none(raw_id))
        messages.append(message)
    for index, message in enumerate(messages):
        if message.method is not None and (why := unsafe_text(message.method)) is not None:
            where = f"batch element {index}" if is_batch else "request body"
            msg = f"{where} is not valid: method {quote(message.method)} is not a method name: {why}"
            return Rejection(400, INVALID_REQUEST, msg, message.id)
        if (rejection := _tools_call_rejection(message)) is not None:
            return rejection
    first = messages[0]
    is_modern_body, meta_version = (False, None) if is_batch else _meta_version(first.raw)
    era = Era.MODERN if is_modern_body or header_version in MODERN_PROTOCOL_VERSIONS else Era.LEGACY
    modern_request = not is_batch and first.kind == "request" and header_version in MODERN_PROTOCOL_VERSIONS
    if modern_request and (why := _missing_meta_version(first.params, header_version)):
        return Rejection(http_status_for(INVALID_PARAMS), INVALID_PARAMS, why, first.id)
    if not is_batch and first.method is not None:
        is_request = first.kind == "request"
        if why := routing_header_mismatch(headers, era, first.method, first.params, is_request, meta_version):
            return Rejection(400, HEADER_MISMATCH, why, first.id)
    version = header_version if header_version is not None else meta_version
    return McpRequest(tuple(messages), is_batch, era, version if isinstance(version, str) else None)


def _missing_meta_version(params: Mapping[str, Any] | None, version: str | None) -> str | None:
    """Say how a modern request lacks ``params._meta``'s protocol version, or ``None`` if it has one.

    Only presence is checked, as by the SDK's server: whether it is the header's
    version (``-32020``) is the next rung, whether the upstream serves it
    (``-32022``) the upstream's to say.
    """
    key = quote(PROTOCOL_VERSION_META_KEY)
    params = params or {}
    meta = params.get("_meta")
    if not isinstance(meta, Mapping):
        got = "has no params._meta" if "_meta" not in params else f"has params._meta as a JSON {_json_type(meta)}"
        return f"a {version} request carries its protocol version in params._meta[{key}]; this request {got}"
    if PROTOCOL_VERSION_META_KEY not in meta:
        return f"params._meta has no {key}: a {version} request carries its protocol version there"
    return None


def _id_or_none(value: object) -> str | int | None:
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def _batch_rejection(elements: list[Any], header_version: str | None) -> Rejection | None:
    allowed = " and ".join(sorted(BATCH_PROTOCOL_VERSIONS))
    if header_version is not None and header_version not in BATCH_PROTOCOL_VERSIONS:
        msg = (
            f"JSON-RPC batches are not allowed with MCP-Protocol-Version {quote(header_version)}; only "
            f"{allowed} allow them: send each message in its own request"
        )
        return Rejection(400, INVALID_REQUEST, msg)
    for index, element in enumerate(elements):
        if (modern := _meta_version(element))[0]:
            msg = (
                f"batch element {index} uses the modern revision {quote(modern[1])} (params._meta), which "
                f"does not allow JSON-RPC batches; only {allowed} do: send each message in its own request"
            )
            return Rejection(400, INVALID_REQUEST, msg)
    return None


def _tools_call_rejection(message: Message) -> Rejection | None:
    if message.method != "tools/call":
        return None
    params = message.params or {}
    name = params.get("name")
    if not isinstance(name, str) or not name:
        got = quote(name)
        msg = f"tools/call needs params.name, the name of the tool to call, as a non-empty string; got {got}"
        return Rejection(400, INVALID_PARAMS, msg, message.id)
    if (why := unsafe_text(name)) is not None:
        msg = f"tools/call params.name {quote(name)} is not a tool name: {why}"
        return Rejection(400, INVALID_PARAMS, msg, message.id)
    arguments = params.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        msg = f"tools/call params.arguments must be an object, not a JSON {_json_type(arguments)}"
        return Rejection(400, INVALID_PARAMS, msg, message.id)
    return None
