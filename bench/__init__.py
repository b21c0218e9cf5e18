"""Benchmark harness: plain Envoy vs. Envoy + mcp-extproc (no stages, default pipeline).

Run ``python -m bench`` (or ``make bench``); see ``bench/README.md``.
"""
