"""Rego backends: the embedded engine (regopy, rego-cpp) and a remote OPA server.

Both answer one question, the value of the policy's ``query`` for an input
document::

    EmbeddedRego(module, query)  compile once: Interpreter.build("x = <query>") → Bundle
        evaluate(input) ──▶ set_input + query_bundle (no parsing per decision) ──▶ value | None
    RemoteOpa(url, query)        opa-python-client (Data API, aiohttp session reused)
        evaluate(input) ──▶ POST /v1/data/<package path>/<rule> {"input": …} ──▶ result | None

``None`` means undefined. A backend that cannot answer raises
:class:`extproc.errors.PolicyBackendError`; the policy stage then denies (fail
closed). :func:`compile_problem` turns a rego-cpp syntax error into
``<module>:<line>:<column>: <message>`` for ``mcp-extproc check``.

The engines are imported on first use, not with this module: regopy (about
10 MB resident) and opa-python-client with aiohttp (about 14 MB) cost nothing
in a server whose policies use neither. With tracing on, an evaluation is a ``rego evaluate``
span (engine, module or OPA URL, query; never the input document).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Protocol
from urllib.parse import urlsplit

from extproc import tracing
from extproc.errors import PolicyBackendError

_ERROR = re.compile(r"\(error \d+:(?P<file>[^|]+)\|(?P<offset>\d+)\|\d+\s+\(errormsg \d+:(?P<msg>[^)]*)\)")


class RegoBackend(Protocol):
    """Evaluates one query for an input document."""

    async def evaluate(self, document: dict[str, Any]) -> Any:
        """The query's value (``None`` when undefined).

        Raises:
            PolicyBackendError: the backend cannot answer.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def compile_problem(name: str, module: str, query: str) -> str | None:
    """``None`` when ``module`` compiles with ``query``; else ``name:line:col: message``."""
    from regopy import RegoError

    try:
        _build(name, module, query)
    except RegoError as exc:
        return _describe(name, module, str(exc))
    return None


def _build(name: str, module: str, query: str) -> Any:
    from regopy import Interpreter

    builder = Interpreter()
    builder.add_module(name, module)
    return builder.build(f"x = {query}")


def _describe(name: str, module: str, error: str) -> str:
    found = _ERROR.search(error)
    if found is None:
        return f"{name}: {error.strip()}"
    offset = int(found["offset"])
    line = module.count("\n", 0, offset) + 1
    column = offset - (module.rfind("\n", 0, offset) + 1) + 1
    return f"{name}:{line}:{column}: {found['msg'].strip()}"


class EmbeddedRego:
    """A module compiled once into a bundle and evaluated in process.

    Raises:
        PolicyBackendError: at construction, when the module does not compile.
    """

    def __init__(self, name: str, module: str, query: str) -> None:
        from regopy import Input, Interpreter, RegoError

        self._input, self._error = Input, RegoError
        try:
            self._bundle = _build(name, module, query)
        except RegoError as exc:
            raise PolicyBackendError(f"Rego does not compile: {_describe(name, module, str(exc))}") from None
        self._runner = Interpreter()
        self._span = {
            "mcp_extproc.rego.engine": "embedded",
            "mcp_extproc.rego.module": name,
            "mcp_extproc.rego.query": query,
        }

    async def evaluate(self, document: dict[str, Any]) -> Any:
        with tracing.span("rego evaluate", self._span):
            return self._evaluate(document)

    def _evaluate(self, document: dict[str, Any]) -> Any:
        try:
            self._runner.set_input(self._input(document))
            output = self._runner.query_bundle(self._bundle)
        except self._error as exc:
            raise PolicyBackendError(f"Rego evaluation failed: {str(exc).strip()[:200]}") from None
        if not output.ok():
            raise PolicyBackendError(f"Rego evaluation failed: {str(output)[:200]}")
        if str(output) == "undefined":
            return None
        node = output.binding("x")
        return None if node is None else json.loads(node.json())

    async def close(self) -> None:
        return None


class RemoteOpa:
    """A remote OPA server's Data API, through opa-python-client (one session, reused)."""

    def __init__(self, url: str, query: str, timeout: float) -> None:
        import aiohttp
        from opa_client.opa_async import AsyncOpaClient

        self._client_errors = (aiohttp.ClientError, TimeoutError)
        parts = urlsplit(url)
        path = query.removeprefix("data.").split(".")
        self._package, self._rule = ".".join(path[:-1]), path[-1]
        self._url = url
        self._client = AsyncOpaClient(
            host=parts.hostname or "localhost",
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            timeout=timeout,
            retries=0,
        )
        self._opened = False
        self._lock = asyncio.Lock()
        self._span = {
            "mcp_extproc.rego.engine": "opa",
            "url.full": tracing.safe_url(url),
            "mcp_extproc.rego.query": query,
        }

    async def evaluate(self, document: dict[str, Any]) -> Any:
        with tracing.span("rego evaluate", self._span, client=True):
            return await self._evaluate(document)

    async def _evaluate(self, document: dict[str, Any]) -> Any:
        if not self._opened:
            async with self._lock:
                if not self._opened:
                    await self._client.__aenter__()
                    self._opened = True
        try:
            answer = await self._client.query_rule(document, self._package, self._rule or None)
        except self._client_errors as exc:
            raise PolicyBackendError(f"OPA at {self._url} did not answer: {type(exc).__name__}") from None
        except ValueError as exc:
            raise PolicyBackendError(f"OPA at {self._url} answered something that is not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise PolicyBackendError(f"OPA at {self._url} answered {type(answer).__name__}, not an object")
        return answer.get("result")

    async def close(self) -> None:
        if self._opened:
            await self._client.close_connection()
