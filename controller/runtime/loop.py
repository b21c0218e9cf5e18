"""The reconcile loop: watches with resync, a work queue with backoff, leader election, probes.

Data flow::

    watch every custom kind (view.CUSTOM_KINDS, all namespaces) ──event──▶ queue(namespace)
    every resync_s: every namespace                                  ──▶ queue
    worker: queue ──Reconciler.reconcile(ns)──▶ ok: forget failures; a consent expiring
                                            │      within resync_s: queue(ns) at that time
                                            └─ KubeError: requeue after min(cap, base·2^n)
    LeaseElector: only the leader watches and reconciles; every replica serves
    /healthz, /metrics and the injection webhook.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.render.meta import ControllerSettings
from controller.render.view import CUSTOM_KINDS
from controller.runtime.kube import Kube, KubeError, load_client
from controller.runtime.lease import LeaseElector
from controller.runtime.reconcile import Reconciler
from extproc.config.settings import split_hostport

log = logging.getLogger("mcp_extproc.controller")


@dataclass(frozen=True)
class ControllerOptions:
    """How the loop runs (flags of ``mcp-extproc controller``)."""

    kubeconfig: str | None = None
    probe: str | None = "0.0.0.0:8080"
    webhook: str | None = "0.0.0.0:9443"
    resync_s: float = 300.0
    report_interval_s: float = 30.0
    watch_timeout_s: int = 300
    leader_election: bool = True
    lease_name: str = "mcp-extproc-controller"
    lease_duration_s: int = 15
    renew_s: float = 5.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 60.0


class Metrics:
    """The controller's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "mcp_extproc_controller_reconciles", "Namespace reconciles by result", ["result"], registry=self.registry
        )
        self.seconds = Histogram(
            "mcp_extproc_controller_reconcile_seconds", "Time to reconcile one namespace", registry=self.registry
        )
        self.leader = Gauge("mcp_extproc_controller_leader", "1 while this replica leads", registry=self.registry)
        self.queue = Gauge(
            "mcp_extproc_controller_queue", "Namespaces waiting to be reconciled", registry=self.registry
        )


EXPIRY_SLACK_S: Final = 0.5
"""How long after a consent's ``expiresAt`` its namespace is reconciled again (so the pass
sees it past even with the wall clock a little behind the monotonic one)."""


def backoff(failures: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: about base·2^(failures-1), never above ``cap_s``."""
    delay: float = min(cap_s, base_s * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not security


class Controller:
    """The leader's work: watch, queue and reconcile.

    Time alone changes one thing: an ``MCPConsent`` whose ``expiresAt`` passes gets
    ``Expired=True`` without any object changing, so no watch event announces it. Every
    reconcile returns when the namespace's next consent expires; when that is within one
    resync interval, the namespace is queued for that moment (plus :data:`EXPIRY_SLACK_S`),
    and a later expiry is queued by a later pass (the resync comes round first). So the
    condition turns within about a second of ``expiresAt`` while the worker keeps up, and
    never later than one resync interval (``resync_s``) after it: were the timer lost (a
    failed pass retried, a new leader), the resync's pass writes it. The extension servers
    refuse a lapsed consent on their own clock either way; the status is for people.
    """

    def __init__(self, kube: Kube, settings: ControllerSettings, options: ControllerOptions, metrics: Metrics) -> None:
        self.kube = kube
        self.options = options
        self.metrics = metrics
        self.reconciler = Reconciler(kube, settings, report_interval_s=options.report_interval_s)
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._cond = threading.Condition()
        self.threads: list[threading.Thread] = []

    def enqueue(self, namespace: str, delay_s: float = 0.0) -> None:
        """Reconcile ``namespace`` after ``delay_s`` (sooner if it is already due sooner)."""
        with self._cond:
            due = time.monotonic() + delay_s
            self._due[namespace] = min(due, self._due.get(namespace, due))
            self.metrics.queue.set(len(self._due))
            self._cond.notify_all()

    def _next(self, stop: threading.Event) -> str | None:
        with self._cond:
            while not stop.is_set():
                now = time.monotonic()
                ready = [(due, ns) for ns, due in self._due.items() if due <= now]
                if ready:
                    _, namespace = min(ready)
                    del self._due[namespace]
                    self.metrics.queue.set(len(self._due))
                    return namespace
                wait = min([due - now for due in self._due.values()], default=0.5)
                self._cond.wait(timeout=max(0.01, min(wait, 0.5)))
        return None

    def work(self, stop: threading.Event) -> None:
        """Reconcile queued namespaces until ``stop``."""
        while (namespace := self._next(stop)) is not None:
            started = time.monotonic()
            try:
                expiry_s = self.reconciler.reconcile(namespace)
            except KubeError as exc:
                failures = self._failures.get(namespace, 0) + 1
                self._failures[namespace] = failures
                delay = backoff(failures, self.options.backoff_base_s, self.options.backoff_cap_s)
                log.warning("reconcile %s failed (%d in a row), retry in %.1fs: %s", namespace, failures, delay, exc)
                self.metrics.reconciles.labels("error").inc()
                self.enqueue(namespace, delay)
            else:
                self._failures.pop(namespace, None)
                self.metrics.reconciles.labels("ok").inc()
                self.metrics.seconds.observe(time.monotonic() - started)
                if expiry_s is not None and expiry_s <= self.options.resync_s:
                    self.enqueue(namespace, expiry_s + EXPIRY_SLACK_S)

    def watch(self, kind: str, stop: threading.Event) -> None:
        """Queue the namespace of every change to ``kind``; restart the watch when it ends or fails."""
        failures = 0
        while not stop.is_set():
            try:
                for _type, obj in self.kube.watch(kind, self.options.watch_timeout_s):
                    failures = 0
                    self.enqueue(str(obj.get("metadata", {}).get("namespace", "default")))
                    if stop.is_set():
                        return
            except KubeError as exc:
                failures += 1
                delay = backoff(failures, self.options.backoff_base_s, self.options.backoff_cap_s)
                log.warning("watch %s failed, retry in %.1fs: %s", kind, delay, exc)
                stop.wait(delay)

    def resync(self, stop: threading.Event) -> None:
        """Queue every namespace now and every ``resync_s`` (a missed event never lasts)."""
        failures = 0
        while not stop.is_set():
            try:
                for namespace in sorted(self.reconciler.namespaces()):
                    self.enqueue(namespace)
                failures = 0
                stop.wait(self.options.resync_s)
            except KubeError as exc:
                failures += 1
                stop.wait(backoff(failures, self.options.backoff_base_s, self.options.backoff_cap_s))
                log.warning("resync failed: %s", exc)

    def start(self, stop: threading.Event) -> None:
        """Start the worker, the watches and the resync in daemon threads."""
        targets: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
            ("worker", self.work, (stop,)),
            ("resync", self.resync, (stop,)),
        ]
        targets += [(f"watch-{k}", self.watch, (k, stop)) for k in CUSTOM_KINDS]
        for name, target, args in targets:
            thread = threading.Thread(target=target, args=args, name=f"controller-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def healthy(self) -> bool:
        """True while every started thread is alive."""
        return all(t.is_alive() for t in self.threads)


class ProbeServer(ThreadingHTTPServer):
    """``/healthz`` (200 while healthy) and ``/metrics`` (Prometheus)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], healthy: Callable[[], bool], metrics: Metrics) -> None:
        self.healthy = healthy
        self.metrics = metrics
        super().__init__(address, _ProbeHandler)


class _ProbeHandler(BaseHTTPRequestHandler):
    server: ProbeServer

    def do_GET(self) -> None:
        if self.path == "/healthz":
            ok = self.server.healthy()
            body = b"ok\n" if ok else b"unhealthy\n"
            self._send(200 if ok else 503, body, "text/plain")
        elif self.path == "/metrics":
            self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server`` in a daemon thread."""
    thread = threading.Thread(target=server.serve_forever, name="controller-http", daemon=True)
    thread.start()
    return thread


def run_until(
    kube: Kube, settings: ControllerSettings, options: ControllerOptions, stop: threading.Event, metrics: Metrics
) -> Controller:
    """Lead (or wait to lead), then run the controller until ``stop``; returns it for inspection."""
    controller = Controller(kube, settings, options, metrics)
    if not options.leader_election:
        metrics.leader.set(1)
        controller.start(stop)
        return controller
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    elector = LeaseElector(kube, options.lease_name, settings.namespace, identity, options.lease_duration_s)
    leading = threading.Event()
    threading.Thread(
        target=elector.hold, args=(stop, leading, options.renew_s), name="controller-lease", daemon=True
    ).start()

    def lead() -> None:
        while not stop.is_set():
            if leading.wait(0.2):
                log.info("leading as %s", identity)
                metrics.leader.set(1)
                controller.start(stop)
                return

    threading.Thread(target=lead, name="controller-lead", daemon=True).start()
    return controller


def run(settings: ControllerSettings, options: ControllerOptions) -> int:
    """``mcp-extproc controller``: run until SIGTERM/SIGINT or a lost Lease."""
    from controller.runtime.webhook import start_webhook

    kube = Kube(load_client(options.kubeconfig))
    stop = threading.Event()
    metrics = Metrics()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if options.webhook:
        start_webhook(kube, settings, split_hostport(options.webhook, "--webhook"))
    controller = run_until(kube, settings, options, stop, metrics)
    if options.probe:
        probe = ProbeServer(
            split_hostport(options.probe, "--probe"), lambda: not stop.is_set() and controller.healthy(), metrics
        )
        serve_in_thread(probe)
    stop.wait()
    log.info("stopping (healthy=%s)", controller.healthy())
    return 0
