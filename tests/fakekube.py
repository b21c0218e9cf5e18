"""A small fake of the Kubernetes API server's HTTP endpoints, on loopback (a test stand-in).

No API server can run on this machine, so the controller's tests talk to this over
real HTTP with the real ``kubernetes`` client. It speaks just what the controller
uses: list (with ``labelSelector`` equality), watch (``?watch=true``, streamed JSON
lines), get, create, replace (optimistic ``resourceVersion``), server-side apply
(``application/apply-patch+yaml``, which it records with its ``fieldManager``),
merge-patch of ``/status``, and delete. It keeps ``uid``, ``generation`` (bumped
when ``spec`` changes) and ``resourceVersion``, and can be told to fail the next
requests. Nothing here validates schemas: the renderers' tests do that.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)


@dataclass
class Request:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str


@dataclass
class FakeState:
    """Everything the fake stores; tests read and seed it directly."""

    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    """(api path of the collection without namespace, namespace, name) → object."""
    events: list[tuple[int, str, str, dict[str, Any]]] = field(default_factory=list)
    """(resourceVersion, collection, type, object)."""
    requests: list[Request] = field(default_factory=list)
    fail: list[int] = field(default_factory=list)
    version: int = 1
    cond: threading.Condition = field(default_factory=threading.Condition)


def _collection(match: re.Match[str]) -> str:
    group = "v1" if match["core"] else f"{match['group']}/{match['version']}"
    return f"{group}/{match['plural']}"


class FakeApiServer(ThreadingHTTPServer):
    """The fake, bound to 127.0.0.1 on a free port."""

    daemon_threads = True

    def __init__(self) -> None:
        self.state = FakeState()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        """The base URL for a kubernetes client Configuration."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    # --- direct access for tests --------------------------------------------------------

    def put(self, collection: str, obj: dict[str, Any], event: str = "ADDED") -> dict[str, Any]:
        """Store ``obj`` as a user would create it (uid, generation, resourceVersion set)."""
        with self.state.cond:
            meta = obj.setdefault("metadata", {})
            key = (collection, meta.get("namespace", ""), meta["name"])
            old = self.state.objects.get(key)
            meta.setdefault("uid", (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
            generation = int((old or {}).get("metadata", {}).get("generation") or 0)
            if old is None or old.get("spec") != obj.get("spec"):
                generation += 1
            meta["generation"] = generation
            if old is not None and "status" in old and "status" not in obj:
                obj["status"] = old["status"]
            self._bump(collection, "MODIFIED" if old else event, obj)
            self.state.objects[key] = obj
            return copy.deepcopy(obj)

    def remove(self, collection: str, namespace: str, name: str) -> None:
        """Delete an object (and send the watch event)."""
        with self.state.cond:
            obj = self.state.objects.pop((collection, namespace, name))
            self._bump(collection, "DELETED", obj)

    def get(self, collection: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored object."""
        with self.state.cond:
            found = self.state.objects.get((collection, namespace, name))
            return copy.deepcopy(found) if found else None

    def names(self, collection: str, namespace: str = "") -> list[str]:
        """Names stored in a collection (and namespace)."""
        with self.state.cond:
            return sorted(
                n for c, ns, n in self.state.objects if c == collection and (not namespace or ns == namespace)
            )

    def _bump(self, collection: str, kind: str, obj: dict[str, Any]) -> None:
        self.state.version += 1
        obj["metadata"]["resourceVersion"] = str(self.state.version)
        self.state.events.append((self.state.version, collection, kind, copy.deepcopy(obj)))
        self.state.cond.notify_all()


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, message: str) -> None:
        self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        state = self.server.state
        body: dict[str, Any] = (self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None) or {}
        with state.cond:
            state.requests.append(Request(method, parts.path, query, self.headers.get("Content-Type", "")))
            if state.fail:
                self._status(state.fail.pop(0), "injected failure")
                return
        match = _PATH.match(parts.path)
        if match is None:
            self._status(404, f"no route for {parts.path}")
            return
        collection, ns, name = _collection(match), match["ns"] or "", match["name"]
        if method == "GET" and name is None and query.get("watch") == ["true"]:
            self._watch(collection, ns, query)
            return
        with state.cond:
            key = (collection, ns, name or "")
            found = state.objects.get(key)
            if method == "GET" and name is None:
                self._reply(
                    200,
                    {
                        "kind": "List",
                        "metadata": {"resourceVersion": str(state.version)},
                        "items": self._list(collection, ns, query),
                    },
                )
            elif method == "GET":
                self._reply(200, found) if found else self._status(404, f"{name} not found")
            elif method == "POST":
                if (collection, ns, body["metadata"]["name"]) in state.objects:
                    self._status(409, "already exists")
                else:
                    body["metadata"].setdefault("namespace", ns) if ns else None
                    self._reply(201, self.server.put(collection, body))
            elif method == "PUT":
                if found is None:
                    self._status(404, "not found")
                elif body["metadata"].get("resourceVersion") != found["metadata"]["resourceVersion"]:
                    self._status(409, "the object has been modified")
                else:
                    self._reply(200, self.server.put(collection, body))
            elif method == "PATCH" and match["sub"] == "status":
                if found is None:
                    self._status(404, "not found")
                else:
                    found["status"] = body["status"]
                    self.server._bump(collection, "MODIFIED", found)
                    self._reply(200, found)
            elif method == "PATCH":
                self._apply(collection, ns, name or "", found, body, query)
            elif method == "DELETE":
                if found is None:
                    self._status(404, "not found")
                else:
                    self.server.remove(collection, ns, name or "")
                    self._reply(200, {"kind": "Status", "status": "Success"})
            else:
                self._status(405, "method not allowed")

    def _list(self, collection: str, ns: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        wanted = dict(p.split("=", 1) for p in query.get("labelSelector", [""])[0].split(",") if "=" in p)
        items = []
        for (c, namespace, _), obj in sorted(self.server.state.objects.items()):
            labels = obj.get("metadata", {}).get("labels") or {}
            if c == collection and (not ns or namespace == ns) and all(labels.get(k) == v for k, v in wanted.items()):
                items.append(copy.deepcopy(obj))
        return items

    def _apply(
        self,
        collection: str,
        ns: str,
        name: str,
        found: dict[str, Any] | None,
        body: dict[str, Any],
        query: dict[str, list[str]],
    ) -> None:
        if "application/apply-patch+yaml" not in self.headers.get("Content-Type", ""):
            self._status(415, "this fake only does server-side apply and status merge patches")
            return
        if not query.get("fieldManager"):
            self._status(422, "fieldManager is required for apply patch")
            return
        merged = copy.deepcopy(body)
        if found is not None:
            merged["metadata"] = {**found["metadata"], **body["metadata"]}
        merged["metadata"]["managedFields"] = [{"manager": query["fieldManager"][0], "operation": "Apply"}]
        self._reply(200, self.server.put(collection, merged))

    def _watch(self, collection: str, ns: str, query: dict[str, list[str]]) -> None:
        state = self.server.state
        deadline = time.monotonic() + float(query.get("timeoutSeconds", ["30"])[0])
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event_type: str, obj: dict[str, Any]) -> None:
            line = json.dumps({"type": event_type, "object": obj}).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()

        try:
            with state.cond:
                if not since:
                    for obj in self._list(collection, ns, {}):
                        send("ADDED", obj)
                    since = state.version
            while time.monotonic() < deadline:
                with state.cond:
                    pending = [e for e in state.events if e[0] > since and e[1] == collection]
                    if not pending:
                        state.cond.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                        continue
                for version, _, event_type, obj in pending:
                    if not ns or obj["metadata"].get("namespace") == ns:
                        send(event_type, obj)
                    since = version
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


@contextmanager
def fake_api_server() -> Iterator[FakeApiServer]:
    """Run the fake in a thread for the duration of a ``with`` block."""
    server = FakeApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
