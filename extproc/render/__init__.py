"""The Envoy renderer: pure, no I/O; shared by ``up``, ``render envoy`` and the controller."""
