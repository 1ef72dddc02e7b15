"""The promotion metrics: gate verdicts, canary share and rollbacks, shadow agreement.

Registered on the service's CollectorRegistry beside `service.metrics` (one set per registry,
so several registries sharing one in tests do not register twice). Labels are model names the
server loaded, version numbers it loaded, fixed reason words and class indexes: all bounded.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.registry.events import (
    RegistryEvent,
    TrafficChanged,
    VersionLoaded,
    VersionRejected,
)

CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
ROLES = ("current", "candidate")
GATE_REASONS = ("gate", "gate_invalid")
ROLLBACK_REASONS = ("errors", "disagreement", "divergence")
CLASSES = tuple(str(c) for c in range(10))


class PromotionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rejected = Counter(
            "mnist_gate_rejected_versions_total",
            "Versions that loaded but failed their model's quality gate (reason gate), or were "
            "held because the gate is unusable (gate_invalid).",
            ["model", "reason"], registry=r,
        )
        self.canary_percent = Gauge(
            "mnist_canary_percent", "Share of default traffic routed to the canary (0: none).",
            ["model"], registry=r, multiprocess_mode="livemax",
        )
        self.rollbacks = Counter(
            "mnist_canary_rollbacks_total",
            "Canaries taken out of traffic automatically, by the threshold they passed "
            "(errors, disagreement, divergence).",
            ["model", "reason"], registry=r,
        )
        self.shadow_compared = Counter(
            "mnist_shadow_compared_total",
            "Images answered by the current version and recomputed by the candidate (shadow, "
            "or a canary's disagreement check), by whether the top classes agree.",
            ["model", "result"], registry=r,
        )
        self.shadow_dropped = Counter(
            "mnist_shadow_dropped_total",
            "Images of live traffic not recomputed (shadow or canary check) because the bounded "
            "queue of the second forward pass was full.",
            ["model"], registry=r,
        )
        self.shadow_predictions = Counter(
            "mnist_shadow_predictions_total",
            "Predicted class of each compared image, by role (current or candidate).",
            ["model", "role", "class"], registry=r,
        )
        self.shadow_confidence = Histogram(
            "mnist_shadow_confidence",
            "Top-class probability of each compared image, by role (current or candidate).",
            ["model", "role"], buckets=CONFIDENCE_BUCKETS, registry=r,
        )

    def on_event(self, event: RegistryEvent) -> None:
        """A registry listener: counts gate rejections, shows the canary's share, and
        creates a model's series when it first loads (zeros on the dashboard, not gaps)."""
        if isinstance(event, VersionRejected):
            self.rejected.labels(event.model, event.reason).inc()
        elif isinstance(event, TrafficChanged):
            self.canary_percent.labels(event.model).set(event.canary_percent)
        elif isinstance(event, VersionLoaded):
            self._precreate(event.model)

    def _precreate(self, model: str) -> None:
        for reason in GATE_REASONS:
            self.rejected.labels(model, reason)
        for reason in ROLLBACK_REASONS:
            self.rollbacks.labels(model, reason)
        for result in ("agree", "disagree"):
            self.shadow_compared.labels(model, result)
        self.shadow_dropped.labels(model)
        self.canary_percent.labels(model)
        for role in ROLES:
            self.shadow_confidence.labels(model, role)
            for cls in CLASSES:
                self.shadow_predictions.labels(model, role, cls)


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, PromotionMetrics] = (
    weakref.WeakKeyDictionary()
)


def promotion_metrics(registry: CollectorRegistry) -> PromotionMetrics:
    """The promotion metrics of `registry`, created on first use."""
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = _BY_REGISTRY[registry] = PromotionMetrics(registry)
    return found
