"""Test upstreams: MCP servers that integration tests and benchmarks start as real processes."""
