"""The controller: custom resources → Envoy config, NetworkPolicies, mesh/Gateway attachment, injection.

Pure renderers (no I/O; an import-linter contract keeps the Kubernetes client out):
``crds`` (CRDs from :mod:`extproc.config.models`), ``view`` (validation into a Catalog),
``sidecar`` (the bootstrap from :mod:`extproc.render.bootstrap`, shared with ``up``, and the
extension server's files), ``netpol``, ``gateway``, ``istio``, ``extserver``,
``inject``, ``webhook_config``, ``status`` and ``render`` (all of them per namespace).

I/O edges: ``kube`` (the official ``kubernetes`` client), ``reconcile``, ``lease``,
``loop`` (watches, queue, backoff, probes) and ``webhook`` (AdmissionReview over HTTPS).
``commands`` provides ``mcp-extproc render k8s`` and ``mcp-extproc controller`` through
entry points, so the core never imports this package.
"""
