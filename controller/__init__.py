"""The controller (custom resources → Envoy config, NetworkPolicies, mesh attachment).

Not built yet: tracked by the controller issue. It will reuse
:mod:`extproc.resources` (the resource models) and :mod:`extproc.bootstrap`
(the one bootstrap renderer shared with ``mcp-extproc up``).
"""
