"""The one exception tree. Lower-layer exceptions are mapped to these at the boundary.

Denials are values (:class:`extproc.api.Deny`); these are for faults and bad input.
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


class StageFault(ExtProcError):
    """A stage's hook raised; carries the stage name for logs and metrics."""

    def __init__(self, stage: str, hook: str, cause: BaseException) -> None:
        super().__init__(f"stage {stage!r} failed in {hook}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.hook = hook
        self.cause = cause


class ProcessError(ExtProcError):
    """A child process (Envoy, the gRPC server) failed to start or died."""


class PolicyBackendError(ExtProcError):
    """A policy backend (embedded Rego or a remote OPA server) could not decide; deny (fail closed)."""
