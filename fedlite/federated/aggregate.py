"""Server-side screening and weighted averaging of site updates.

An update from a remote site is untrusted input: wrong keys or shapes, NaN/Inf, or a norm far beyond
the other sites' are rejected with the site named, never averaged in. Accepted updates are averaged
with FedAvg's weights N_c/N (paper eq. 4); late ones are damped by e^{−λτ} for staleness τ (eq. 31).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SiteUpdate:
    site: str
    delta: dict[str, np.ndarray]
    num_examples: int
    staleness: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class Rejection:
    site: str
    reason: str


def check_update(delta: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why this update cannot be aggregated, or None if it can."""
    missing = sorted(set(expected) - set(delta))
    extra = sorted(set(delta) - set(expected))
    if missing:
        return f"missing {len(missing)} tensors, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected tensors, e.g. {extra[0]}"
    for name, shape in expected.items():
        value = delta[name]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            return f"{name}: expected floating-point values, got {getattr(value, 'dtype', type(value))}"
        if tuple(value.shape) != tuple(shape):
            return f"{name}: shape {tuple(value.shape)}, expected {tuple(shape)}"
        if not np.isfinite(value).all():
            return f"{name}: contains NaN or Inf"
    return None


def update_norm(delta: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))


def screen_updates(updates: list[SiteUpdate], expected: dict[str, tuple[int, ...]],
                   outlier_factor: float = 10.0) -> tuple[list[SiteUpdate], list[Rejection]]:
    """Drop malformed updates, then those whose norm exceeds ``outlier_factor`` × the median of the
    others (only with at least three well-formed updates, where a median means something)."""
    accepted, rejected = [], []
    for update in updates:
        reason = check_update(update.delta, expected)
        if reason is None and update.num_examples <= 0:
            reason = f"reported {update.num_examples} training examples"
        (rejected.append(Rejection(update.site, reason)) if reason else accepted.append(update))
    if len(accepted) >= 3:
        norms = [update_norm(u.delta) for u in accepted]
        kept = []
        for i, update in enumerate(accepted):
            others = float(np.median([n for j, n in enumerate(norms) if j != i]))
            if others > 0 and norms[i] > outlier_factor * others:
                rejected.append(Rejection(update.site, f"update norm {norms[i]:.3g} is over {outlier_factor:g}x "
                                                       f"the other sites' median {others:.3g}"))
            else:
                kept.append(update)
        accepted = kept
    return accepted, rejected


def aggregation_weights(updates: list[SiteUpdate], staleness_decay: float) -> list[float]:
    """(N_c / N) · e^{−λτ}: FedAvg's sample-count weights, damped for late updates."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total * math.exp(-staleness_decay * u.staleness) for u in updates]


def weighted_delta(updates: list[SiteUpdate], staleness_decay: float = 0.0) -> dict[str, np.ndarray]:
    weights = aggregation_weights(updates, staleness_decay)
    names = updates[0].delta.keys()
    return {name: sum(np.float32(w) * u.delta[name] for w, u in zip(weights, updates)).astype(np.float32)
            for name in names}
