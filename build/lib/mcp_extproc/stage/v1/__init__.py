"""mcp_extproc.stage.v1: generated from protos/mcp_extproc/stage/v1/stage.proto; do not edit."""
