"""The front doors Envoy calls: ext_proc, the gRPC and HTTP ext_authz checks, and their servers."""
