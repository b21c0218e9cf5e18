"""The ``mcp-extproc`` commands: the argument parser, running the servers and Envoy, checks, listings."""
