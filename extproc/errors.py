"""The one exception tree. Lower-layer exceptions are mapped to these where the library is called.

Denials are values (:class:`extproc.api.Deny`); these are for faults and bad input::

    ExtProcError                      every error raised on purpose
    ├── ConfigError                   a resource document, pipeline file or flag is wrong
    ├── PluginError                   a stage cannot be loaded, breaks the contract, or failed to start
    ├── PolicyBackendError            embedded Rego or a remote OPA server could not decide (deny)
    ├── ProcessError                  a child process (Envoy) failed to start or died
    └── (raised by helpers, caught by their stage and turned into a denial or a fault)
        ├── plugins.lib.jwks.JwksUnavailable / UnknownKey     an issuer's keys
        ├── plugins.lib.tokens.TokenError                     an upstream token endpoint
        ├── plugins.lib.external_client.ServiceFault          an external stage service
        ├── extproc.mcp.sse.SseTooLarge                       an SSE event over the limit
        └── controller.runtime.kube.KubeError                 the Kubernetes API server
"""

from __future__ import annotations


class ExtProcError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ExtProcError):
    """A resource document, pipeline configuration or flag is wrong.

    The message says what was wrong, where (file, kind, name, field) and what
    would be right.
    """


class PluginError(ExtProcError):
    """A stage cannot be found, does not honour the stage contract, or failed to start."""


class ProcessError(ExtProcError):
    """A child process (Envoy, the gRPC server) failed to start or died."""


class PolicyBackendError(ExtProcError):
    """A policy backend (embedded Rego or a remote OPA server) could not decide; deny (fail closed)."""
