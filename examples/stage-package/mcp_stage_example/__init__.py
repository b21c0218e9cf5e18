"""An example in-process mcp-extproc stage, packaged and found by entry point."""
