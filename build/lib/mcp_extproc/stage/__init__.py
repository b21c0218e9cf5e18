"""mcp_extproc.stage: the external stage protocol, by version."""
