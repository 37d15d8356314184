"""Static INT8 calibration from statistics merged across sites: no calibration case leaves a site.

A site runs the coordinator's prepared FP32 graph (``prepare_graph``'s output, the graph the
coordinator quantizes) on its own cases and sends back only per-tensor aggregates, as a flat
``{name: np.ndarray}`` dict that fits a Flower ArrayRecord:

    "<tensor>::min", "<tensor>::max"   float32, shape (1,)  - what onnxruntime's MinMax calibrator computes
    "<tensor>::hist", "<tensor>::edges" int64 counts, float32 edges - only when the coordinator sent edges

Min of mins and max of maxes equal the pooled MinMax range exactly, so the graph quantized from merged
statistics is the graph pooled ``quantize_static`` gives. Histograms use edges fixed by the
coordinator (``histogram_edges``, from a first MinMax round) so that sites' counts add up; the
Entropy and Percentile ranges are then computed by onnxruntime's own HistogramCollector.

Only numpy, onnx and onnxruntime here: a hospital agent runs ``collect_statistics`` without torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization.calibrate import (CalibraterBase, CalibrationDataReader, CalibrationMethod,
                                                HistogramCollector, TensorsData, create_calibrator)

from fedlite.errors import InputError, Problem

SEPARATOR = "::"
KINDS = ("min", "max", "hist", "edges")
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


@dataclass
class CalibrationStats:
    """Per-tensor aggregates of one site's cases, or of several sites' merged."""

    ranges: dict[str, tuple[np.ndarray, np.ndarray]]  # tensor -> (min, max), float32 shape (1,)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # tensor -> (counts, edges)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for name, (low, high) in self.ranges.items():
            arrays[f"{name}{SEPARATOR}min"], arrays[f"{name}{SEPARATOR}max"] = low, high
        for name, (counts, edges) in self.histograms.items():
            arrays[f"{name}{SEPARATOR}hist"], arrays[f"{name}{SEPARATOR}edges"] = counts, edges
        return arrays


def calibrated_tensors(graph: str | Path, operators: Sequence[str]) -> list[str]:
    """The tensors onnxruntime calibrates in ``graph`` for these operators: what statistics must cover."""
    calibrator = CalibraterBase(Path(graph), list(operators))
    return sorted(calibrator.select_tensors_to_calibrate(calibrator.model)[0])


class _SiteFeeds(CalibrationDataReader):
    """Hands the site's feeds to the MinMax calibrator, showing each one to the histogram pass too."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], also=None) -> None:
        self.feeds, self.also, self.count = iter(feeds), also, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self.feeds, None)
        if feed is not None:
            self.count += 1
            if self.also is not None:
                self.also(feed)
        return feed


def _check_edges(edges: Mapping[str, np.ndarray], tensors: list[str]) -> dict[str, np.ndarray]:
    def bad(name: str, message: str) -> Problem:
        return Problem(message, path="histogram edges", field=name, hint="use the coordinator's histogram_edges")

    problems = [bad(name, "none for this tensor") for name in tensors if name not in edges]
    problems += [bad(name, "for a tensor this graph does not calibrate") for name in edges if name not in tensors]
    checked = {}
    for name in tensors:
        e = np.asarray(edges.get(name, [0.0, 1.0]))
        if e.ndim != 1 or e.size < 2 or e.dtype != np.float32 or not np.isfinite(e).all() or not (np.diff(e) > 0).all():
            problems.append(bad(name, "must be a 1-D float32 array, finite and increasing"))
        checked[name] = e
    if problems:
        raise InputError(problems)
    return checked


def _private_copy(graph: Path, scratch: Path) -> Path:
    """``graph`` in ``scratch``: a hard link where the file system allows one, else a copy."""
    private = scratch / graph.name
    try:
        os.link(graph, private)
    except OSError:
        shutil.copyfile(graph, private)
    return private


def collect_statistics(graph: str | Path, feeds: Iterable[dict[str, np.ndarray]], operators: Sequence[str],
                       edges: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run the site's own cases through ``graph`` and keep only per-tensor aggregates.

    ``graph`` must be the coordinator's prepared graph, ``operators`` its QuantSettings.operators, so
    that tensor names and the calibrated set match what the coordinator quantizes. With ``edges``
    (from ``histogram_edges``) the site also counts each tensor's values on those fixed bins; values
    outside them land in the end bins.
    """
    with tempfile.TemporaryDirectory(prefix="fedlite-calibrate-") as scratch:
        # onnxruntime writes an inferred copy beside the graph it calibrates; the shipped graph sits in
        # a cache that other sites of a simulation read at the same time, so it is calibrated from here
        graph = _private_copy(Path(graph), Path(scratch))
        minmax = create_calibrator(graph, list(operators), augmented_model_path=str(Path(scratch) / "minmax.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
        histograms: dict[str, np.ndarray] = {}
        fixed: dict[str, np.ndarray] = {}
        count_values = None
        if edges is not None:
            values = create_calibrator(graph, list(operators), augmented_model_path=str(Path(scratch) / "values.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile)
            fixed = _check_edges(edges, sorted(values.tensors_to_calibrate))
            histograms = {name: np.zeros(e.size - 1, dtype=np.int64) for name, e in fixed.items()}
            outputs = [o.name for o in values.infer_session.get_outputs()]

            def count_values(feed: dict[str, np.ndarray]) -> None:
                for name, value in zip(outputs, values.infer_session.run(None, feed)):
                    if name in histograms:
                        v = np.asarray(value).ravel()
                        v = np.clip(v[~np.isnan(v)], fixed[name][0], fixed[name][-1])
                        histograms[name] += np.histogram(v, bins=fixed[name])[0]

        reader = _SiteFeeds(feeds, count_values)
        try:
            minmax.collect_data(reader)
        except ValueError:
            if reader.count == 0:
                raise InputError("this site has no calibration cases", hint="calibrate on a site with cases") from None
            raise
        ranges = minmax.compute_data()
    stats = CalibrationStats({name: tuple(np.asarray(v, dtype=np.float32).reshape(1) for v in td.range_value)
                              for name, td in ranges.items()},
                             {name: (counts, fixed[name]) for name, counts in histograms.items()})
    return stats.to_arrays()


def decode_statistics(arrays: Mapping[str, object], expected: Iterable[str] | None = None,
                      source: str = "calibration statistics") -> CalibrationStats:
    """Check a site's untrusted statistics dict and turn it into CalibrationStats.

    ``expected``: the tensors the coordinator's graph calibrates (``calibrated_tensors``); a reply
    covering others comes from a different graph. Every problem names its tensor.
    """
    problems: list[Problem] = []

    def bad(name: str, message: str, hint: str | None = None) -> None:
        problems.append(Problem(message, path=source, field=name, hint=hint))

    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, sep, kind = str(key).rpartition(SEPARATOR)
        if not sep or not name or kind not in KINDS:
            bad(str(key), "not a calibration statistic",
                hint=f"keys are '<tensor>{SEPARATOR}' + one of {', '.join(KINDS)}")
        elif not isinstance(value, np.ndarray):
            bad(name, f"{kind} is a {type(value).__name__}, not a numpy array")
        else:
            parts.setdefault(name, {})[kind] = value
    if not arrays and expected is None:
        bad("-", "no statistics at all", hint="the site sent an empty record")

    ranges, histograms = {}, {}
    for name, got in parts.items():
        if "min" not in got or "max" not in got:
            bad(name, f"needs both min and max, got {', '.join(sorted(got))}")
            continue
        low, high = got["min"], got["max"]
        if any(a.dtype != np.float32 or a.shape != (1,) for a in (low, high)):
            bad(name, f"min and max must be float32 arrays of shape (1,), got {low.dtype}{low.shape} and "
                      f"{high.dtype}{high.shape}")
            continue
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            bad(name, f"min {low[0]} / max {high[0]} is not finite")
            continue
        if low[0] > high[0]:
            bad(name, f"min {low[0]} is above max {high[0]}")
            continue
        ranges[name] = (low, high)
        if ("hist" in got) != ("edges" in got):
            bad(name, "a histogram needs both hist and edges")
        elif "hist" in got:
            counts, edges = got["hist"], got["edges"]
            if counts.dtype != np.int64 or counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
                bad(name, f"hist must be non-negative int64 counts in a 1-D array, got {counts.dtype}{counts.shape}")
            elif edges.dtype != np.float32 or edges.shape != (counts.size + 1,):
                bad(name, f"edges must be float32 of shape ({counts.size + 1},), got {edges.dtype}{edges.shape}")
            elif not np.isfinite(edges).all() or not (np.diff(edges) > 0).all():
                bad(name, "edges must be finite and increasing")
            else:
                histograms[name] = (counts, edges)
    if expected is not None:
        expected = set(expected)
        for name in sorted(expected - set(parts)):
            bad(name, "missing: the coordinator's graph calibrates this tensor")
        for name in sorted(set(parts) - expected):
            bad(name, "not a tensor the coordinator's graph calibrates", hint="was another graph calibrated?")
    if problems:
        raise InputError(problems)
    return CalibrationStats(ranges, histograms)


def merge_statistics(sites: Sequence[CalibrationStats]) -> CalibrationStats:
    """Min of mins, max of maxes, sums of histograms on identical edges: the pooled statistics."""
    if not sites:
        raise InputError("no site sent calibration statistics", hint="calibrate on at least one site")
    every = set.intersection(*(set(s.ranges) for s in sites))
    problems = [Problem(f"calibrated by only some sites ({sum(name in s.ranges for s in sites)} of {len(sites)})",
                        path="merged calibration statistics", field=name, hint="were different graphs calibrated?")
                for name in sorted(set().union(*(s.ranges for s in sites)) - every)]
    ranges, histograms = {}, {}
    for name in sorted(every):
        ranges[name] = (np.minimum.reduce([s.ranges[name][0] for s in sites]),
                        np.maximum.reduce([s.ranges[name][1] for s in sites]))
        hists = [s.histograms.get(name) for s in sites]
        if all(h is None for h in hists):
            continue
        if any(h is None for h in hists) or any(not np.array_equal(h[1], hists[0][1]) for h in hists):
            problems.append(Problem("histograms differ in their edges or are missing at some sites",
                                    path="merged calibration statistics", field=name,
                                    hint="every site must count on the coordinator's histogram_edges"))
            continue
        histograms[name] = (np.sum([h[0] for h in hists], axis=0, dtype=np.int64), hists[0][1])
    if problems:
        raise InputError(problems)
    return CalibrationStats(ranges, histograms)


def histogram_edges(stats: CalibrationStats, bins: int = 2048) -> dict[str, np.ndarray]:
    """Fixed bins per tensor for a histogram round: symmetric over the merged range, as onnxruntime's
    HistogramCollector lays out a first batch, so every site counts on the same edges."""
    edges = {}
    for name, (low, high) in stats.ranges.items():
        threshold = np.float32(max(abs(low[0]), abs(high[0])))
        edges[name] = np.histogram_bin_edges(np.zeros(0, dtype=np.float32), bins, range=(-threshold, threshold))
    return edges


def ranges_from_statistics(stats: CalibrationStats, method: str = "minmax", percentile: float = 99.999,
                           num_quantized_bins: int = 128) -> TensorsData:
    """The calibration result onnxruntime's quantizer consumes, computed from statistics only."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    if method == "minmax":
        return TensorsData(CalibrationMethod.MinMax, dict(stats.ranges))
    missing = sorted(set(stats.ranges) - set(stats.histograms))
    if missing:
        raise InputError([Problem(f"{method} calibration needs a histogram for this tensor",
                                  path="calibration statistics", field=name,
                                  hint="run a histogram round with histogram_edges") for name in missing])
    if method == "entropy":
        few = sorted(name for name, (counts, _) in stats.histograms.items() if counts.size < num_quantized_bins)
        if few:
            raise InputError([Problem(f"entropy calibration needs at least {num_quantized_bins} histogram bins",
                                      path="calibration statistics", field=name,
                                      hint="pass a larger bins to histogram_edges") for name in few])
    if not stats.histograms:
        return TensorsData(METHODS[method], {})
    collector = HistogramCollector(method=method, symmetric=False,
                                   num_bins=max(counts.size for counts, _ in stats.histograms.values()),
                                   num_quantized_bins=num_quantized_bins, percentile=percentile, scenario="same")
    collector.histogram_dict = {
        name: (counts, edges, stats.ranges[name][0][0], stats.ranges[name][1][0], edges[-1])
        for name, (counts, edges) in stats.histograms.items()}
    with contextlib.redirect_stdout(io.StringIO()):  # the collector prints its progress
        result = collector.compute_collection_result()
    return TensorsData(METHODS[method], result)
