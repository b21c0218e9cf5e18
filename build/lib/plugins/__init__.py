"""Built-in stages, registered as ``mcp_extproc.stages`` entry points.

- ``mcp`` (:mod:`plugins.mcp_stage`): parse and classify MCP requests.
- ``allowlist`` (:mod:`plugins.allowlist`): enforce ``MCPServer`` tool allow-lists.
"""
