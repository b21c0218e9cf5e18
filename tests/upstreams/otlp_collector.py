"""A stand-in for an OpenTelemetry Collector: OTLP/HTTP and OTLP/gRPC trace receivers on loopback.

No OpenTelemetry Collector binary can be installed on this machine, so the tests send their
traces here. It decodes what the exporters send with the official ``opentelemetry-proto``
messages (the ones the Collector uses) and records every span::

    POST /v1/traces  (application/x-protobuf, gzip or not) ──▶ ExportTraceServiceRequest
    TraceService/Export over gRPC (the second port)        ──▶ ExportTraceServiceRequest
        ──▶ one JSON line per span appended to --record FILE (read them with read_spans)

Run: ``python -m tests.upstreams.otlp_collector --port 0 --record spans.jsonl``; it prints
``GRPC <port>`` and then ``READY <port>`` (the HTTP port) once both accept connections.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
from pathlib import Path
from typing import Any, TypedDict

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.upstreams.serving import bind_loopback, serve_ready


class SpanRecord(TypedDict):
    """One received span."""

    service: str
    via: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: dict[str, str]
    links: list[dict[str, str]]
    events: list[dict[str, Any]]


def value_of(value: common_pb2.AnyValue) -> Any:
    """An OTLP ``AnyValue`` as plain JSON."""
    which = value.WhichOneof("value")
    if which == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in pairs}


def records_of(request: pb.ExportTraceServiceRequest, via: str) -> list[SpanRecord]:
    """Every span of an export request, flattened."""
    found: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(
                    {
                        "service": service,
                        "via": via,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "attributes": _attributes(span.attributes),
                        "status": {
                            "code": trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                            "message": span.status.message,
                        },
                        "links": [
                            {"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()} for link in span.links
                        ],
                        "events": [{"name": e.name, "attributes": _attributes(e.attributes)} for e in span.events],
                    }
                )
    return found


def read_spans(path: Path) -> list[SpanRecord]:
    """Every span recorded so far (the file may not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, request: pb.ExportTraceServiceRequest, via: str) -> None:
        lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records_of(request, via))
        with self.path.open("a") as out:
            out.write(lines)


class _TraceService(pb_grpc.TraceServiceServicer):
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    async def Export(self, request: pb.ExportTraceServiceRequest, context: Any) -> pb.ExportTraceServiceResponse:
        self.recorder.write(request, "grpc")
        return pb.ExportTraceServiceResponse()


def build_app(recorder: _Recorder) -> Starlette:
    async def traces(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if not request.headers.get("content-type", "").startswith("application/x-protobuf"):
            return Response("only application/x-protobuf", status_code=415)
        message = pb.ExportTraceServiceRequest()
        message.ParseFromString(body)
        recorder.write(message, "http")
        reply = pb.ExportTraceServiceResponse().SerializeToString()
        return Response(reply, media_type="application/x-protobuf")

    return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])


async def _main(port: int, grpc_port: int, record: Path) -> None:
    recorder = _Recorder(record)
    server = grpc.aio.server()
    pb_grpc.add_TraceServiceServicer_to_server(_TraceService(recorder), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    sys.stdout.write(f"GRPC {bound}\n")
    sys.stdout.flush()
    try:
        await serve_ready(bind_loopback(port), build_app(recorder), "otlp-collector")
    finally:
        await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="the OTLP/HTTP port (0: a free one)")
    parser.add_argument("--grpc-port", type=int, default=0, help="the OTLP/gRPC port (0: a free one)")
    parser.add_argument("--record", type=Path, required=True, help="append every span here, one JSON line each")
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.grpc_port, args.record))


if __name__ == "__main__":
    main()
