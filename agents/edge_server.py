"""The coordinator's side of edge fine-tuning: federated averaging of a bundle's head, then a new bundle.

Each round the sites get the global head weights (a few thousand numbers, not the student), train
them on their cached embeddings and send back compressed head updates; they are screened and
averaged exactly like full-model updates (FedAvg weights, staleness damping, rejection of malformed
ones). Before the first round and after every round the sites evaluate the global head on their own
cases and send back aggregate metrics only. The result is the same bundle with the averaged head:
new head files, new hashes, version one higher, and a record of the rounds in its manifest.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedlite.agents.embedding_cache import encoder_fingerprint
from fedlite.atomic import atomic_write_text
from fedlite.export.bundle import verify_bundle
from fedlite.export.head_swap import read_head_weights, write_bundle_with_head
from fedlite.federated.aggregate import weighted_delta
from fedlite.federated.config import FederatedConfig
from fedlite.federated.params import to_record
from fedlite.federated.rounds import (QUERY_TIMEOUT, Outstanding, federated_evaluate, sample_sites, update_round,
                                      wait_for_nodes)
from fedlite.federated.server_app import RUN_CONFIG, site_settings

log = logging.getLogger(__name__)
ROUNDS = "edge_rounds.jsonl"


HEADLINE = ("loss", "accuracy", "auc", "stage_macro_f1")


def evaluate_head_at_sites(grid: Grid, weights: dict[str, np.ndarray], config: dict, nodes: list[int],
                           num_stages: int, timeout: float) -> dict:
    """The head ``weights`` scored on the sites' validation parts: merged metrics and cases per site."""
    content = RecordDict({"arrays": to_record(weights), "config": ConfigRecord(config)})
    evaluation = federated_evaluate(grid, nodes, content, num_stages, timeout)
    return {"metrics": evaluation.metrics, "headline": {k: evaluation.metrics[k] for k in HEADLINE
                                                         if k in evaluation.metrics},
            **evaluation.to_record()}


def run_edge_server(grid: Grid, cfg: FederatedConfig, progress: bool = True) -> dict:
    bundle = Path(cfg.edge_bundle)
    meta = verify_bundle(bundle)
    weights = read_head_weights(bundle, meta)
    shapes = {n: tuple(a.shape) for n, a in weights.items()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ROUNDS).write_text("")
    atomic_write_text(out / RUN_CONFIG, json.dumps(cfg.to_flat(), indent=2) + "\n")
    settings = {**site_settings(cfg), "mode": "edge", "encoder-fingerprint": encoder_fingerprint(meta),
                "bundle-version": int(meta["bundle_version"])}
    head_bytes = int(sum(a.size for a in weights.values()) * 4)
    student_bytes = int(meta["model"]["parameters"]) * 4
    eval_timeout = cfg.round_timeout or QUERY_TIMEOUT

    num_stages = len(meta["stage_names"])
    nodes = wait_for_nodes(grid, cfg.min_sites)
    before = evaluate_head_at_sites(grid, weights, settings, nodes, num_stages, eval_timeout)
    history = [{"round": 0, "eval": before}]
    log.info("edge fine-tuning of %s (head: %d parameters) across %d sites; before: %s", bundle,
             head_bytes // 4, len(nodes), before["headline"])
    rng = np.random.default_rng([cfg.seed, 0])
    outstanding: dict[str, Outstanding] = {}
    after = before
    bar = tqdm(range(1, cfg.rounds + 1), desc="edge rounds", disable=not progress, unit="round")
    for server_round in bar:
        start = time.perf_counter()
        nodes = wait_for_nodes(grid, cfg.min_sites)
        sampled = sample_sites(nodes, cfg.sites_per_round, rng)
        record = to_record(weights)
        content = RecordDict({"arrays": record, "config": ConfigRecord({**settings, "server-round": server_round})})
        accepted, rejected, replies = update_round(grid, sampled, content, shapes, outstanding, server_round,
                                                   cfg.round_timeout, cfg.max_staleness)
        if accepted:
            delta = weighted_delta(accepted, cfg.staleness_decay)
            weights = {n: (weights[n] + delta[n]).astype(np.float32) for n in weights}
        train_seconds = time.perf_counter() - start
        after = evaluate_head_at_sites(grid, weights, settings, nodes, num_stages, eval_timeout)
        received = replies.bytes_received
        mean_received = float(np.mean(list(received.values()))) if received else float("nan")
        row = {
            "round": server_round, "sites": [u.site for u in accepted], "rejected": [r.__dict__ for r in rejected],
            "late_dropped": replies.late_dropped, "eval": after,
            "train_loss": float(np.average([u.metrics["train-loss"] for u in accepted],
                                           weights=[u.num_examples for u in accepted])) if accepted else None,
            "bytes_sent_per_site": record.count_bytes(), "bytes_sent": record.count_bytes() * len(sampled),
            "bytes_received": received,
            "head_update_dense_bytes": head_bytes, "student_fp32_bytes": student_bytes,
            "compression_ratio": head_bytes / mean_received if received else None,
            "student_to_update_ratio": student_bytes / mean_received if received else None,
            "site_train_seconds": {u.site: u.metrics.get("train-seconds") for u in accepted},
            "site_embed_seconds": {u.site: u.metrics.get("embed-seconds") for u in accepted},
            "site_peak_memory_mb": {u.site: u.metrics.get("peak-memory-mb") for u in accepted},
            "round_seconds": train_seconds, "eval_seconds": time.perf_counter() - start - train_seconds,
        }
        epsilons = [u.metrics["epsilon"] for u in accepted if "epsilon" in u.metrics]
        if epsilons:
            row["epsilon_worst_site"] = max(epsilons)
        history.append(row)
        with (out / ROUNDS).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if after["metrics"]:
            bar.set_postfix(acc=f"{after['metrics']['accuracy']:.3f}")
    bar.close()

    update = {"kind": "edge fine-tuning", "rounds": cfg.rounds, "sites": sorted(after["cases"]),
              "validation_cases": after["cases"], "validation_before": before["headline"],
              "validation_after": after["headline"],
              "dp": cfg.dp, "compress": cfg.compress, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    new_meta = write_bundle_with_head(bundle, out / "bundle", weights, update, force=True)
    summary = {"bundle": str(out / "bundle"), "bundle_version": new_meta["bundle_version"],
               "before": before["headline"], "after": after["headline"], "validation_cases": after["cases"],
               "rounds": len(history) - 1,
               "bytes_received": sum(sum(h["bytes_received"].values()) for h in history[1:]),
               "bytes_sent": sum(h["bytes_sent"] for h in history[1:]),
               "epsilon": max((h["epsilon_worst_site"] for h in history if "epsilon_worst_site" in h), default=None),
               "config": cfg.to_flat()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
