"""Benchmark harness: plain Envoy vs. Envoy + mcp-extproc (no stages, the pipelines, each front door).

Run ``python -m bench`` (or ``make bench``); see ``bench/README.md``.
"""
