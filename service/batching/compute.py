"""The one compute path both drivers share: resolve once, group by version, forward, deliver.

`plan` resolves each (model, version, label) once per batch and groups requests by the
version they get, so a batch never mixes versions and holds each version's reference for its
whole forward (a hot swap meanwhile frees the old version only after the batch); it fails the
requests that expired while queued and those whose version cannot be resolved. `forward` runs
one `Model.predict` per group and may run on any thread (NumPy releases the GIL: the asyncio
driver hands big groups to a thread); `finish` hands each request its rows, or fails every
waiter of a group whose forward failed, and records the batch. `run` is the three inline,
as the completion-queue driver uses them. Nothing here raises into a driver: a waiter is
never left hanging.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from service.batching.contract import (
    Array,
    BatchMetrics,
    Clock,
    ForwardObserver,
    Prediction,
    Resolver,
)
from service.batching.queue import Batch, Pending
from service.errors import DeadlineExceeded, ServiceError
from service.registry import ServableVersion

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Group:
    """The requests of one batch that one version answers, and its forward's outcome."""

    version: ServableVersion
    members: list[Pending]
    rows: int = 0
    x: Array | None = None
    probs: Array | None = None
    error: Exception | None = None
    forward_s: float = 0.0


class Compute:
    """See the module docstring; `observers` are told of each group's forward."""

    def __init__(self, resolver: Resolver, metrics: BatchMetrics, clock: Clock) -> None:
        self._resolve = resolver.resolve
        self._metrics = metrics
        self._clock = clock
        self._observers: list[ForwardObserver] = []

    def add_observer(self, observer: ForwardObserver) -> None:
        self._observers.append(observer)

    def run(self, batch: Batch) -> None:
        """Plan, forward and finish every group of `batch` on this thread."""
        try:
            for group in self.plan(batch):
                self.forward(group)
                self.finish(group)
        except Exception:  # a bug: never leave a waiter hanging
            self.fail_all(batch)

    def plan(self, batch: Batch) -> list[Group]:
        """Fail what cannot be computed; group the rest by the version each resolves to now."""
        for p in batch.expired:
            _fail(p, DeadlineExceeded("deadline passed while queued; the request was dropped"))
        resolve = self._resolve
        requests = batch.requests
        if len(requests) == 1:  # the common case at low concurrency: no grouping to do
            p = requests[0]
            try:
                return [Group(resolve(p.model, p.version, p.label), requests, p.rows)]
            except ServiceError as e:
                _fail(p, e)
                return []
        groups: dict[int, Group] = {}
        resolved: dict[tuple[str, int, str], ServableVersion] = {}
        for p in requests:
            key = (p.model, p.version, p.label)
            sv = resolved.get(key)
            if sv is None:
                try:
                    sv = resolved[key] = resolve(*key)
                except ServiceError as e:
                    _fail(p, e)
                    continue
            group = groups.get(id(sv))
            if group is None:
                group = groups[id(sv)] = Group(sv, [])
            group.members.append(p)
            group.rows += p.rows
        return list(groups.values())

    def forward(self, group: Group) -> None:
        """One forward pass for `group` (any thread); the outcome is kept for `finish`."""
        members = group.members
        x = members[0].x if len(members) == 1 else np.concatenate([p.x for p in members])
        group.x = x
        started = self._clock()
        try:
            group.probs = group.version.model.predict(x)
        except Exception as e:
            group.error = e
        group.forward_s = self._clock() - started

    def finish(self, group: Group) -> None:
        """Deliver each member its rows (or the forward's failure), record the batch, tell
        the observers: on the driver's thread."""
        sv, members, probs = group.version, group.members, group.probs
        if probs is None:
            self._failed(group)
            return
        now = self._clock()
        waits = [now - p.enqueued for p in members]
        start = 0
        for p in members:
            end = start + p.rows
            if not p.answered:
                p.answered = True
                if not p.waiter.done():
                    p.waiter.set_result(Prediction(probs[start:end], sv))
            start = end
        self._metrics.batch_done(sv.name, sv.version, waits, group.forward_s, probs)
        if self._observers and group.x is not None:
            self._observe(sv, group.x, probs)

    def fail_all(self, batch: Batch) -> None:
        """After an unexpected error: every request not yet answered fails."""
        log.exception("batch failed unexpectedly")
        error = ServiceError("batch failed unexpectedly")
        for p in batch.requests:
            _fail(p, error)
        for p in batch.expired:
            _fail(p, error)

    def _failed(self, group: Group) -> None:
        sv, x, e = group.version, group.x, group.error
        rows = 0 if x is None else x.shape[0]
        log.error("forward failed: model %s version %d, %d rows", sv.name, sv.version, rows,
                  exc_info=e)
        # A server fault, not the caller's: INTERNAL, and every waiter hears of it.
        err = ServiceError(
            f"forward pass of {sv.name} version {sv.version} failed: {type(e).__name__}"
        )
        for p in group.members:
            _fail(p, err)

    def _observe(self, sv: ServableVersion, x: Array, probs: Array) -> None:
        for observer in self._observers:
            try:
                observer(sv, x, probs)
            except Exception:
                log.exception("forward observer %r failed (the batch was answered)", observer)


def _fail(p: Pending, error: BaseException) -> None:
    if not p.answered:
        p.answered = True
        if not p.waiter.done():
            p.waiter.set_exception(error)
