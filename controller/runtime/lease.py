"""Leader election through a ``coordination.k8s.io/v1`` Lease.

Data flow::

    try_acquire(): get Lease ──absent──▶ create (holder = me)
                             ──held by me, or expired──▶ replace (resourceVersion: optimistic)
                             ──held by another, fresh──▶ not leader
    409 on create/replace = someone else won the race → not leader.

Written here rather than taken from ``kubernetes.leaderelection``: that module
builds its API client from the process-global configuration, calls ``sys.exit``
on bad settings and cannot be stopped; this one uses the controller's client and
stops when asked.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

from controller.runtime.kube import Kube, KubeError


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _format(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.strptime(value.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")
    except ValueError:
        try:
            return datetime.datetime.strptime(value.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            return None


@dataclass
class LeaseElector:
    """Holds (or waits for) one Lease.

    Attributes:
        kube: the API.
        name / namespace: the Lease.
        identity: this replica (its pod name).
        duration_s: how long a lease lasts without renewal.
    """

    kube: Kube
    name: str
    namespace: str
    identity: str
    duration_s: int = 15

    def try_acquire(self) -> bool:
        """Acquire or renew; True when this replica leads."""
        now = _now()
        lease = self.kube.get("Lease", self.name, self.namespace)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "renewTime": _format(now),
        }
        try:
            if lease is None:
                self.kube.create(
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**spec, "acquireTime": _format(now), "leaseTransitions": 0},
                    }
                )
                return True
            current = lease.get("spec") or {}
            renewed = _parse(current.get("renewTime"))
            duration = int(current.get("leaseDurationSeconds") or self.duration_s)
            mine = current.get("holderIdentity") == self.identity
            expired = renewed is None or now > renewed + datetime.timedelta(seconds=duration)
            if not mine and not expired:
                return False
            transitions = int(current.get("leaseTransitions") or 0) + (0 if mine else 1)
            acquired = current.get("acquireTime") if mine else _format(now)
            lease["spec"] = {**current, **spec, "acquireTime": acquired, "leaseTransitions": transitions}
            lease.setdefault("apiVersion", "coordination.k8s.io/v1")
            lease.setdefault("kind", "Lease")
            self.kube.replace(lease)
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    def hold(self, stop: threading.Event, leading: threading.Event, renew_s: float) -> None:
        """Keep trying; set ``leading`` while this replica holds the Lease, until ``stop``."""
        while not stop.is_set():
            try:
                ok = self.try_acquire()
            except KubeError:
                ok = False
            if ok:
                leading.set()
            elif leading.is_set():
                leading.clear()
                stop.set()  # lost the lease: stop acting; the process exits and restarts
            stop.wait(renew_s)
