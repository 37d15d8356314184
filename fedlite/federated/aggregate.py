"""Server-side screening and weighted averaging of site updates.

An update from a remote site is untrusted input: wrong keys or shapes, NaN/Inf (as float32), a norm
above an absolute bound or far beyond the other sites' are rejected with the site named, never
averaged in. Accepted updates are averaged with FedAvg's weights N_c/N (paper eq. 4), no site's above
a cap; late ones are damped by e^{−λτ} for staleness τ (eq. 31). A coordinate-wise median or trimmed
mean is there for consortia that expect a poisoning site.
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
    """Why this update cannot be aggregated, or None if it can. Values are judged as the float32
    they will be added as: 1e300 in float64 is Inf here."""
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
        with np.errstate(over="ignore"):
            if not np.isfinite(value.astype(np.float32, copy=False)).all():
                return f"{name}: contains NaN or Inf (as float32)"
    return None


def update_norm(delta: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))


def screen_updates(updates: list[SiteUpdate], expected: dict[str, tuple[int, ...]], max_norm: float = math.inf,
                   outlier_factor: float = 10.0) -> tuple[list[SiteUpdate], list[Rejection]]:
    """Drop malformed updates and those longer than ``max_norm`` (a bound that holds with any
    number of sites), then those whose norm exceeds ``outlier_factor`` × the median of the others
    (only with at least three well-formed updates, where a median means something). Kept updates
    are float32."""
    accepted, rejected = [], []
    for update in updates:
        reason = check_update(update.delta, expected)
        if reason is None and update.num_examples <= 0:
            reason = f"reported {update.num_examples} training examples"
        if reason is None:
            update.delta = {n: v.astype(np.float32, copy=False) for n, v in update.delta.items()}
            norm = update_norm(update.delta)
            if norm > max_norm:
                reason = f"update norm {norm:.3g} is over the bound {max_norm:.3g}"
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


def capped_shares(counts: list[int], max_share: float = 1.0) -> np.ndarray:
    """FedAvg's shares N_c/N, no site's above ``max_share`` once three or more sites take part
    (what a capped site loses goes to the others in proportion): a site that overstates its case
    count cannot take the step over. With two sites a cap would turn FedAvg into a plain mean."""
    counts = np.asarray(counts, dtype=np.float64)
    shares = counts / counts.sum()
    if len(counts) < 3 or max_share >= 1:
        return shares
    cap = max(max_share, 1 / len(counts))
    capped = np.zeros(len(counts), dtype=bool)
    while True:
        free = counts[~capped].sum()
        shares = np.where(capped, cap, counts * (1 - cap * capped.sum()) / free if free > 0 else 0.0)
        over = (shares > cap * (1 + 1e-12)) & ~capped
        if not over.any():
            return shares
        capped |= over


def aggregation_weights(updates: list[SiteUpdate], staleness_decay: float, max_share: float = 1.0) -> list[float]:
    """(N_c / N) · e^{−λτ}: FedAvg's sample-count weights (capped), damped for late updates."""
    shares = capped_shares([u.num_examples for u in updates], max_share)
    return [float(s) * math.exp(-staleness_decay * u.staleness) for s, u in zip(shares, updates)]


def weighted_delta(updates: list[SiteUpdate], staleness_decay: float = 0.0,
                   max_share: float = 1.0) -> dict[str, np.ndarray]:
    """Σ w_c Δ_c per tensor; a late update that did not train a tensor (computed while the encoders
    were frozen) counts as a zero change of it."""
    weights = aggregation_weights(updates, staleness_decay, max_share)
    return {name: sum(np.float32(w) * u.delta[name] for w, u in zip(weights, updates) if name in u.delta
                      ).astype(np.float32)
            for name in _names(updates)}


def _names(updates: list[SiteUpdate]) -> list[str]:
    return list(dict.fromkeys(name for u in updates for name in u.delta))


def robust_delta(updates: list[SiteUpdate], method: str, trim_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Coordinate-wise median or trimmed mean of the updates: a few sites, whatever they send and
    whatever case counts they claim, cannot move a coordinate past the honest majority's values."""
    out = {}
    for name in _names(updates):
        stacked = np.stack([u.delta[name] for u in updates if name in u.delta])
        if method == "median":
            out[name] = np.median(stacked, axis=0).astype(np.float32)
        else:
            k = int(trim_fraction * len(stacked))
            out[name] = np.sort(stacked, axis=0)[k:len(stacked) - k].mean(axis=0).astype(np.float32)
    return out


def aggregate(updates: list[SiteUpdate], method: str = "fedavg", staleness_decay: float = 0.0,
              max_share: float = 1.0, trim_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """The round's step from the accepted updates: FedAvg's weighted mean, or a robust estimate."""
    if method == "fedavg":
        return weighted_delta(updates, staleness_decay, max_share)
    return robust_delta(updates, method, trim_fraction)
