"""Latency statistics in the conventions of MLPerf Inference's single-stream scenario: percentiles
of per-query latency over many timed queries, after warm-up, over several repeats."""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def latency_summary(samples_ms: list[float] | np.ndarray) -> dict:
    """p50/p90/p95/p99, mean and standard deviation of latencies in milliseconds."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no latency samples")
    out = {f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES}
    out.update(mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1 else 0.0, n=int(x.size))
    return out


def repeated_summary(repeats: list[list[float]]) -> dict:
    """Pooled statistics plus the spread of p50 across repeats (how stable the machine was)."""
    pooled = latency_summary([v for run in repeats for v in run])
    medians = [float(np.percentile(run, 50)) for run in repeats]
    pooled["repeats"] = len(repeats)
    pooled["p50_per_repeat"] = medians
    pooled["p50_spread"] = (max(medians) - min(medians)) / max(min(medians), 1e-12)
    return pooled


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator
