"""The core: the pipeline, the stage registry, audit, metrics and reloads."""
