"""Configuration: resource models, the resource loader and catalog, the pipeline file, settings.

Kubernetes-free, and shared with the controller.
"""
