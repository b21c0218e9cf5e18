"""Strict JSON decoding: only JSON every parser reads the same way. Pure.

The request ladder (:func:`extproc.mcp.jsonrpc.parse_request`) and the response
readers that must not be fooled (the ``tools/list`` filter,
:mod:`plugins.lib.rewrite`) decode with the same rules::

    bytes ─▶ UTF-8 (strict: no byte order mark, no invalid byte)
          ─▶ json.loads: no NaN / Infinity, no repeated key in an object
          ─▶ a value, or the reason it is refused (an integer past Python's digit
             limit, nesting past its recursion limit, any syntax error)

Each refused input is one where another parser (a JavaScript client's
``JSON.parse`` after a lenient UTF-8 decode, say) may read something other than
what Python would, or something Python cannot read at all.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.mcp.headers import quote

__all__ = ["DuplicateKeyError", "JsonUnreadable", "read_json", "strict_loads"]


class DuplicateKeyError(ValueError):
    """An object repeats a key (``args[0]``): a parser differential waiting to happen (first copy or last?)."""


class JsonUnreadable(ValueError):
    """JSON that :func:`read_json` cannot read with certainty; the message says why ("not valid UTF-8 ...")."""


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def strict_loads(data: bytes | str) -> Any:
    """``json.loads`` with the rules above, raising what the steps raise.

    Raises:
        UnicodeDecodeError: ``data`` is bytes and not UTF-8.
        json.JSONDecodeError: not JSON (a byte order mark included).
        DuplicateKeyError: an object repeats a key.
        ValueError: ``NaN``/``Infinity``, or an integer past the int-to-str digit limit.
        RecursionError: the value nests too deeply.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(text, object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)


def read_json(data: bytes | str) -> Any:
    """Decode JSON strictly, for a reader that must be certain of what it read.

    Raises:
        JsonUnreadable: ``data`` is not such JSON; the message says why.
    """
    try:
        return strict_loads(data)
    except UnicodeDecodeError as e:
        raise JsonUnreadable(f"not valid UTF-8 (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise JsonUnreadable(f"not valid JSON: {e.msg} (char {e.pos})") from None
    except DuplicateKeyError as e:
        raise JsonUnreadable(f"JSON that repeats the key {quote(e.args[0])} in one object") from None
    except ValueError as e:
        why = "an integer too long to read exactly" if "integer string conversion" in str(e) else str(e)
        raise JsonUnreadable(f"not acceptable JSON: {why}") from None
    except RecursionError:
        raise JsonUnreadable("not acceptable JSON: it nests too deeply") from None
