"""The ``external`` stage's side of the wire: configuration, channel, ``Describe``, ``Process``.

Data flow::

    ServiceConfig ──startup──▶ one grpc.aio channel per service (TCP or unix socket,
                               optional (m)TLS), reused by every call
                  ──Describe─▶ validate the answer (name, phases, methods, failure mode);
                               a bad answer is a PluginError naming the stage and field
    ProcessRequest ──Process (per-call deadline)──▶ ProcessResponse
                   ── UNAVAILABLE / DEADLINE_EXCEEDED / any RPC error ──▶ ServiceFault
                                 (the stage applies the service's failure mode)

With tracing on, each ``Process`` call is a client span and carries its ``traceparent`` in the
call's metadata, so the service's own spans join the trace.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

import grpc
from pydantic import Field, field_validator, model_validator

from extproc import tracing
from extproc.api import FailureMode, StageConfig
from extproc.errors import ExtProcError, PluginError
from extproc.external.wire import validate_description
from mcp_extproc.stage.v1 import stage_pb2 as pb
from mcp_extproc.stage.v1 import stage_pb2_grpc as pb_grpc

_HOSTPORT_RE: Final = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
# A restarted stage service is found again within a second, not after gRPC's default
# backoff of up to two minutes (calls fail fast meanwhile and follow the failure mode).
_CHANNEL_OPTIONS: Final[list[tuple[str, Any]]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TlsConfig(StageConfig):
    """TLS towards the stage service; ``certFile`` + ``keyFile`` make it mutual TLS."""

    ca_file: Path | None = Field(default=None, alias="caFile")
    cert_file: Path | None = Field(default=None, alias="certFile")
    key_file: Path | None = Field(default=None, alias="keyFile")
    server_name: str | None = Field(default=None, alias="serverName")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mutual TLS needs both certFile and keyFile (or neither)")
        return self


class ServiceConfig(StageConfig):
    """One external stage service, as the pipeline file configures it."""

    address: str
    deadline_ms: int = Field(default=250, gt=0, le=60_000, alias="deadlineMs")
    describe_deadline_ms: int = Field(default=5_000, gt=0, le=60_000, alias="describeDeadlineMs")
    tls: TlsConfig | None = None
    servers: list[str] = Field(default_factory=list)
    failure_mode: FailureMode | None = Field(default=None, alias="failureMode")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value.startswith("unix:"):
            if len(value) <= len("unix:"):
                raise ValueError("a unix socket address needs a path, e.g. unix:/run/stage.sock")
            return value
        match = _HOSTPORT_RE.match(value)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:50061) nor unix:/path/to.sock")
        return value


class ExternalConfig(StageConfig):
    """Configuration of the ``external`` stage: the services it calls, in order.

    ``fastCalls``: ``true`` vouches that no service reads ``tools/call`` responses or
    rewrites a ``tools/call``, so calls may take the ``auto`` front door's fast route
    (one ext_authz ``Check``, request phase only, no body rewriting). A service that
    asks for the response phase of ``tools/call`` is then refused at startup; one that
    rewrites a call's params gets the call refused (403), never silently unrewritten.
    """

    services: list[ServiceConfig] = Field(min_length=1)
    fast_calls: bool = Field(default=False, alias="fastCalls")


class ServiceFault(ExtProcError):
    """A call to a stage service failed (unreachable, too slow, or an RPC error)."""


def _client_version() -> str:
    try:
        return version("mcp-extproc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    def read(path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise PluginError(f"stage 'external': tls.{what}: cannot read {path}: {exc.strerror or exc}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca_file, "caFile"),
        private_key=read(tls.key_file, "keyFile"),
        certificate_chain=read(tls.cert_file, "certFile"),
    )


class Service:
    """One configured stage service: its channel, its description, and calls to it."""

    def __init__(self, config: ServiceConfig, index: int) -> None:
        self.config = config
        self.where = f"stage 'external': services[{index}] at {config.address}"
        self.description: pb.DescribeResponse | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ExternalStageStub | None = None
        self._span: dict[str, tracing.Value] = {
            "rpc.system": "grpc",
            "rpc.service": "mcp_extproc.stage.v1.ExternalStage",
            "rpc.method": "Process",
            "server.address": config.address,
        }

    @property
    def name(self) -> str:
        """The name the service gave in ``Describe`` (its address until then)."""
        return self.description.name if self.description else self.config.address

    @property
    def failure_mode(self) -> FailureMode:
        """The pipeline file's ``failureMode``, else the service's own, else closed."""
        if self.config.failure_mode is not None:
            return self.config.failure_mode
        if self.description is not None and self.description.failure_mode == pb.FAILURE_MODE_OPEN:
            return FailureMode.OPEN
        return FailureMode.CLOSED

    async def open(self) -> None:
        """Open the channel and ask ``Describe``.

        Raises:
            PluginError: the service did not answer, or answered something that breaks the protocol.
        """
        options = list(_CHANNEL_OPTIONS)
        tls = self.config.tls
        if tls is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.aio.secure_channel(self.config.address, _credentials(tls), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.config.address, options=options)
        self._stub = pb_grpc.ExternalStageStub(self._channel)
        timeout = self.config.describe_deadline_ms / 1000
        try:
            # wait_for_ready: a service started alongside us gets the whole deadline to come up.
            answer = await self._stub.Describe(
                pb.DescribeRequest(client_version=_client_version()), timeout=timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            await self.close()
            raise PluginError(
                f"{self.where}: Describe failed: {exc.code().name}: {exc.details()} "
                f"(is the service running and listening there? deadline {self.config.describe_deadline_ms} ms)"
            ) from None
        self.description = validate_description(answer, self.where)

    async def close(self) -> None:
        """Close the channel (idempotent)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def applies_to(self, server: str) -> bool:
        """True when this service is configured for MCP server ``server`` (no ``servers:`` = every server)."""
        return not self.config.servers or server in self.config.servers

    def wants(self, phase: pb.Phase.ValueType, method: str | None) -> bool:
        """True when the service asked for ``phase`` and ``method``."""
        described = self.description
        if described is None or phase not in described.phases:
            return False
        if not described.methods:
            return True
        return method is not None and any(fnmatchcase(method, glob) for glob in described.methods)

    async def process(self, request: pb.ProcessRequest) -> pb.ProcessResponse:
        """Call ``Process`` with the per-call deadline.

        Raises:
            ServiceFault: unreachable, past the deadline, or any other RPC error; the message says which.
        """
        if self._stub is None:
            raise ServiceFault(f"{self.where}: not started")
        with tracing.span(f"external {self.name} Process", self._span, client=True):
            carrier: dict[str, str] = {}
            tracing.inject(carrier)  # the service's own spans join the trace
            try:
                reply: pb.ProcessResponse = await self._stub.Process(
                    request, timeout=self.config.deadline_ms / 1000, metadata=tuple(carrier.items()) or None
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise ServiceFault(f"did not answer within {self.config.deadline_ms} ms") from None
                if code is grpc.StatusCode.UNAVAILABLE:
                    raise ServiceFault("is unreachable (UNAVAILABLE)") from None
                raise ServiceFault(f"failed: {code.name}: {exc.details()}") from None
            return reply
