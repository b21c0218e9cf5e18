"""The controller's pure renderers: resources in, Kubernetes objects out; no I/O."""
