"""mcp-extproc: an Envoy ext_proc extension server for MCP traffic."""

__version__ = "0.1.0"
