"""Generated Python stubs of the project's own protocols (``protos/``); do not edit.

``mcp_extproc.stage.v1``: the external stage protocol (``stage_pb2``, ``stage_pb2_grpc``).
Regenerate with ``python protos/generate.py``; the test suite checks they match.
"""
