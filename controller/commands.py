"""The controller's commands, found by ``mcp-extproc`` through entry points (``mcp_extproc.commands``).

``render-k8s``: ``mcp-extproc render k8s -f FILE`` → every object the controller
would apply for the resources in FILE (the same renderers the loop uses).
``controller``: ``mcp-extproc controller`` → the reconcile loop and the webhook.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from extproc.errors import ConfigError


def render_k8s(path: Path, settings: ControllerSettings | None = None) -> tuple[str, list[str]]:
    """The objects for the resources in ``path`` as multi-document YAML, and warnings.

    Raises:
        ConfigError: the file cannot be read, or a custom resource in it is invalid.
    """
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    rendered = render_documents([d for d in docs if d is not None], settings or ControllerSettings())
    objects = []
    warnings = []
    for namespace, (view, result) in rendered.items():
        for (kind, name), error in sorted(view.invalid.items()):
            raise ConfigError(f"{path}: {kind} {namespace}/{name}: {error}")
        for (kind, name), problems in sorted(result.problems.items()):
            warnings += [f"{kind} {namespace}/{name}: {p}" for p in problems]
        objects += result.objects
    return yaml.safe_dump_all(objects, sort_keys=False), warnings


def run_controller(args: argparse.Namespace) -> int:
    """``mcp-extproc controller``: run the reconcile loop (and the webhook) until SIGTERM."""
    try:
        from controller.runtime.loop import ControllerOptions, run
    except ImportError as exc:
        raise ConfigError(
            f"the controller needs its extra dependencies: pip install 'mcp-extproc[controller]' ({exc})"
        ) from None

    if not args.report_interval > 0:
        raise ConfigError(f"--report-interval: expected seconds above 0, got {args.report_interval}")
    settings = ControllerSettings(namespace=args.namespace, **({"image": args.image} if args.image else {}))
    options = ControllerOptions(
        kubeconfig=args.kubeconfig,
        probe=args.probe,
        webhook=args.webhook or None,
        resync_s=args.resync,
        report_interval_s=args.report_interval,
        leader_election=not args.no_leader_election,
    )
    return run(settings, options)
