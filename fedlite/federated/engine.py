"""The coordinator's round loop, written once for every job that trains at the sites.

Full-model training, edge fine-tuning of a bundle's head and the export's distillation are all
the same loop: wait for enough sites, sample them, push the global parameters, collect updates until
the deadline (late ones are kept and folded into a later round, damped by their staleness), screen
(with a norm bound relative to the parameters sent), aggregate, apply unless the result would not be
finite, evaluate, save, record. A job says only what differs through ``UpdateJob``: which
parameters travel with which settings, how the average is applied, how the result is scored and
kept. Every job's rounds are recorded in one schema (``round_record``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedlite.atomic import json_text
from fedlite.federated.aggregate import Rejection, SiteUpdate, aggregate, update_norm
from fedlite.federated.compress import warmed_topk
from fedlite.federated.config import FederatedConfig
from fedlite.federated.downlink import DownlinkStream
from fedlite.federated.link_model import link_record
from fedlite.federated.records import to_record
from fedlite.federated.rounds import RoundReplies, sample_sites, update_round, wait_for_nodes

log = logging.getLogger(__name__)


class UpdateJob:
    """What one kind of federated training contributes to the shared loop."""

    message_type = "train"  # or "train.<job>", routed to the sites' handler for that job
    downlink: DownlinkStream | None = None  # set: the parameters travel as compressed changes

    def parameters(self, server_round: int) -> dict[str, np.ndarray]:
        """The global arrays the sites start this round from (and send deltas of)."""
        raise NotImplementedError

    def settings(self, server_round: int) -> dict:
        """The flat settings sent with them."""
        raise NotImplementedError

    def apply(self, delta: dict[str, np.ndarray]) -> None:
        """Add the round's averaged update to the global parameters."""
        raise NotImplementedError

    def evaluate(self, server_round: int, row: dict, nodes: list[int]) -> None:
        """Score the new parameters (at the sites) and add the job's own fields to ``row``."""

    def save(self, server_round: int, row: dict) -> None:
        """Keep the round's result (checkpoints) before its record is written."""


@dataclass
class RoundExchange:
    """What one round moved: the updates kept and refused, and the replies' bytes."""

    accepted: list[SiteUpdate]
    rejected: list[Rejection]
    replies: RoundReplies
    sampled: list[int]
    bytes_sent: dict[int, int]  # node → bytes of its message's parameters
    dense_bytes: int  # the parameters as one dense message
    shapes: dict[str, tuple[int, ...]]


def append_row(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json_text(row) + "\n")


def run_rounds(grid: Grid, job: UpdateJob, cfg: FederatedConfig, rounds: range, rng: np.random.Generator,
               log_path: Path, desc: str, progress: bool = True) -> list[dict]:
    """Run ``rounds`` of ``job``; each round's record is appended to ``log_path`` once the job has
    saved the round (so a record implies its checkpoint). Stops early when the run converged
    (``cfg.convergence_tol``)."""
    history, outstanding = [], {}  # outstanding: messages whose replies may still come, round to round
    bar = tqdm(rounds, desc=desc, disable=not progress, unit="round")
    for server_round in bar:
        start, wall_start = time.perf_counter(), time.time()
        nodes = wait_for_nodes(grid, cfg.min_sites)
        sampled = sample_sites(nodes, cfg.sites_per_round, rng)
        arrays = job.parameters(server_round)
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        contents, versions = round_messages(job, arrays, job.settings(server_round), sampled)
        max_norm = cfg.max_update_ratio * max(update_norm(arrays), 1.0)
        accepted, rejected, replies = update_round(grid, contents, shapes, outstanding, server_round,
                                                   cfg.round_timeout, cfg.max_staleness, job.message_type, max_norm,
                                                   versions)
        if job.downlink is not None:
            for node, version in replies.delivered.items():
                job.downlink.delivered(node, version)
            for node in replies.failed_nodes:
                job.downlink.forget(node)
        aggregate_start = time.perf_counter()
        step, refused = None, None
        if accepted:
            delta = aggregate(accepted, cfg.aggregation, cfg.staleness_decay, cfg.max_site_share, cfg.trim_fraction)
            refused = non_finite_result(arrays, delta)
            if refused is None:
                job.apply(delta)
                step = update_norm(delta)
            else:
                log.error("round %d: the averaged update is not applied: %s", server_round, refused)
        sent = {node: content["arrays"].count_bytes() for node, content in contents.items()}
        row = round_record(server_round, RoundExchange(accepted, rejected, replies, sampled, sent,
                                                       int(sum(a.nbytes for a in arrays.values())), shapes), step)
        row["step_refused"] = refused
        eval_start = time.perf_counter()
        job.evaluate(server_round, row, nodes)
        end = time.perf_counter()
        row.update(round_timing(accepted, wall_start, aggregate_start - start, eval_start - aggregate_start,
                                end - eval_start))
        row.update(link_record(row, cfg.link_rates))
        job.save(server_round, row)
        history.append(row)
        append_row(log_path, row)
        bar.set_postfix(_postfix(row))
        if cfg.convergence_tol > 0 and step is not None and step < cfg.convergence_tol:
            log.info("converged after round %d: ‖Δθ‖ = %.3g < %g", server_round, step, cfg.convergence_tol)
            break
    bar.close()
    return history


def round_messages(job: UpdateJob, arrays: dict[str, np.ndarray], settings: dict,
                   sampled: list[int]) -> tuple[dict[int, RecordDict], dict[int, int] | None]:
    """Each sampled node's message: the same dense parameters for all, or (with a downlink stream)
    what brings each node from the version it holds to the newest; and the version each carries."""
    if job.downlink is None:
        record = to_record(arrays)
        return {node: RecordDict({"arrays": record, "config": ConfigRecord(settings)}) for node in sampled}, None
    return downlink_messages(job.downlink, arrays, settings, sampled), {node: job.downlink.version for node in sampled}


def downlink_messages(stream: DownlinkStream, arrays: dict[str, np.ndarray], settings: dict,
                      nodes: list[int]) -> dict[int, RecordDict]:
    """A new version of the stream towards ``arrays``, and each node's message up to it."""
    stream.advance(arrays, warmed_topk(stream.topk_fraction, int(settings.get("topk-warmup-rounds", 0)),
                                       int(settings.get("server-round", 1))))
    contents = {}
    for node in nodes:
        node_arrays, downlink = stream.message_for(node)
        contents[node] = RecordDict({"arrays": to_record(node_arrays),
                                     "config": ConfigRecord({**settings, **downlink})})
    return contents


def non_finite_result(arrays: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> str | None:
    """Why adding ``delta`` would leave a parameter NaN or Inf (each update was finite, their sum
    or its sum with the model can still overflow), or None."""
    with np.errstate(over="ignore", invalid="ignore"):
        for name, value in delta.items():
            if not np.isfinite(arrays[name] + value).all():
                return f"{name} would not be finite"
    return None


def round_record(server_round: int, exchange: RoundExchange, step_norm: float | None) -> dict:
    """The fields every job records for a round: who took part, what was refused and why, the
    update's loss and size, bytes each way, the sites' own costs."""
    accepted, replies = exchange.accepted, exchange.replies
    dense = int(sum(np.prod(s) for s in exchange.shapes.values()) * 4)
    received, sent = sum(replies.bytes_received.values()), sum(exchange.bytes_sent.values())
    row = {
        "round": server_round, "sites": [u.site for u in accepted], "rejected": [r.__dict__ for r in exchange.rejected],
        "late_dropped": replies.late_dropped, "stale_folded": [u.site for u in accepted if u.staleness > 0],
        "train_loss": float(np.average([u.metrics["train-loss"] for u in accepted],
                                       weights=[u.num_examples for u in accepted])) if accepted else None,
        "update_norm": step_norm,
        # the largest message to one site (all alike unless the parameters travel as changes)
        "bytes_sent_per_site": max(exchange.bytes_sent.values(), default=0), "bytes_sent": sent,
        "downlink_compression_ratio": exchange.dense_bytes * len(exchange.bytes_sent) / sent if sent else None,
        "bytes_received": replies.bytes_received, "dense_update_bytes": dense,
        "compression_ratio": dense * len(replies.bytes_received) / received if received else None,
        "samples_trained": int(sum(u.metrics.get("samples", 0) for u in accepted)),
        "site_cases": {u.site: u.num_examples for u in accepted},
        "site_train_seconds": {u.site: u.metrics.get("train-seconds") for u in accepted},
        "site_peak_memory_mb": {u.site: u.metrics.get("peak-memory-mb") for u in accepted},
    }
    epsilons = [u.metrics["epsilon"] for u in accepted if "epsilon" in u.metrics]
    if epsilons:
        row["epsilon_worst_site"] = max(epsilons)
    embedding = {u.site: u.metrics["embed-seconds"] for u in accepted if "embed-seconds" in u.metrics}
    if embedding:  # sites that train on embeddings (edge rounds, frozen rounds) say what computing them cost
        row["site_embed_seconds"] = embedding
        row["site_embeddings_cached"] = {u.site: bool(u.metrics.get("embeddings-cached")) for u in accepted
                                         if "embed-seconds" in u.metrics}
    return row


def round_timing(accepted: list[SiteUpdate], wall_start: float, exchange: float, aggregate: float,
                 evaluation: float) -> dict:
    """Where the round's time went; the parts add up to ``round_seconds``. During the exchange the
    sites' reported busy intervals are compute, the rest is transport and waiting."""
    fresh = [u for u in accepted if u.staleness == 0]
    slowest = max((float(u.metrics.get("train-seconds", 0.0)) for u in fresh), default=0.0)
    compute = sites_busy_seconds(fresh, wall_start, wall_start + exchange, slowest)
    training = sites_busy_seconds(fresh, wall_start, wall_start + exchange, slowest, what="train")
    return {"slowest_site_train_seconds": slowest, "site_compute_seconds": compute,
            "site_training_seconds": training, "communication_seconds": max(0.0, exchange - compute),
            "aggregate_seconds": aggregate, "eval_seconds": evaluation,
            "round_seconds": exchange + aggregate + evaluation}


def sites_busy_seconds(updates: list[SiteUpdate], start: float, end: float, fallback: float,
                       what: str = "compute") -> float:
    """Seconds of the round during which at least one site was busy: the union of the sites'
    ``what`` intervals ("compute": the whole reply; "train": the training loop alone), wall clock,
    clipped to the round. Sites queued behind others on a shared machine count as busy, not as
    transport. ``fallback`` when a site did not report its interval."""
    intervals = []
    for update in updates:
        first, last = update.metrics.get(f"{what}-start"), update.metrics.get(f"{what}-end")
        if first is None or last is None:
            return fallback
        intervals.append((max(start, float(first)), min(end, float(last))))
    busy, reached = 0.0, start
    for first, last in sorted(intervals):
        if last > reached:
            busy += last - max(first, reached)
            reached = last
    return busy


def _postfix(row: dict) -> dict:
    metrics = row.get("eval") or {}
    if "accuracy" in metrics:
        return {"acc": f"{metrics['accuracy']:.3f}", "f1": f"{metrics['stage_macro_f1']:.3f}"}
    return {"loss": f"{row['train_loss']:.3f}"} if row["train_loss"] is not None else {}


def summed_bytes(history: list[dict]) -> tuple[int, int]:
    """Bytes sent to and received from the sites over ``history``, evaluation queries included."""
    sent = sum(h["bytes_sent"] + h.get("federated_eval", {}).get("bytes_sent", 0) for h in history)
    return sent, sum(sum(h["bytes_received"].values()) for h in history)
