"""The MCP conformance suite, run against upstreams directly and through `mcp-extproc up` (`make conformance`)."""
