"""The coordinator's side of edge fine-tuning: federated averaging of a bundle's head, then a new bundle.

Edge fine-tuning is a job of the round engine (``fedlite.federated.engine``): each round the sites
get the global head weights (a few thousand numbers, not the student), train them on their cached
embeddings and send back compressed head updates, screened and averaged like full-model updates.
Before the first round and after every round the sites score the global head on their validation
parts and send back statistics only. The result is the same bundle with the averaged head: new head
files, new hashes, version one higher, and a record of the rounds in its manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedlite.atomic import atomic_write_text, json_text, require_free
from fedlite.errors import InputError
from fedlite.export.bundle import encoder_fingerprint, verify_bundle
from fedlite.export.head_swap import read_head_weights, write_bundle_with_head
from fedlite.export.signing import SIGNATURE, load_private_key
from fedlite.federated.config import FederatedConfig
from fedlite.federated.engine import UpdateJob, run_rounds, summed_bytes
from fedlite.federated.preflight import check_sites_data
from fedlite.federated.records import to_record
from fedlite.federated.rounds import QUERY_TIMEOUT, FederatedEvaluation, federated_evaluate, wait_for_nodes
from fedlite.run_record import AT_SITES, RunRecord

log = logging.getLogger(__name__)
ROUNDS = "edge_rounds.jsonl"
HEADLINE = ("loss", "accuracy", "auc", "stage_macro_f1")


def headline(evaluation: FederatedEvaluation) -> dict:
    return {k: evaluation.metrics[k] for k in HEADLINE if k in evaluation.metrics}


class EdgeJob(UpdateJob):
    """Rounds over a bundle's head: the head's weights travel, the encoders stay at the sites."""

    message_type = "train"

    def __init__(self, grid: Grid, cfg: FederatedConfig, meta: dict, weights: dict[str, np.ndarray]):
        self.grid, self.cfg, self.weights = grid, cfg, weights
        self.base = {**cfg.site_settings(), "mode": "edge", "encoder-fingerprint": encoder_fingerprint(meta),
                     "bundle-version": int(meta["bundle_version"])}
        self.num_stages = len(meta["stage_names"])
        self.student_bytes = int(meta["model"]["parameters"]) * 4
        self.evaluation: FederatedEvaluation | None = None

    def parameters(self, server_round: int) -> dict[str, np.ndarray]:
        return self.weights

    def settings(self, server_round: int) -> dict:
        return {**self.base, "server-round": server_round}

    def apply(self, delta: dict[str, np.ndarray]) -> None:
        self.weights = {n: (self.weights[n] + delta[n]).astype(np.float32) for n in self.weights}

    def score(self, nodes: list[int]) -> FederatedEvaluation:
        """The current head scored on the sites' validation parts."""
        content = RecordDict({"arrays": to_record(self.weights), "config": ConfigRecord(self.base)})
        self.evaluation = federated_evaluate(self.grid, nodes, content, self.num_stages,
                                             self.cfg.round_timeout or QUERY_TIMEOUT)
        return self.evaluation

    def evaluate(self, server_round: int, row: dict, nodes: list[int]) -> None:
        evaluation = self.score(nodes)
        received = row["bytes_received"]
        row.update({"eval": evaluation.metrics, "federated_eval": evaluation.to_record(),
                    "student_fp32_bytes": self.student_bytes,
                    "student_to_update_ratio": (self.student_bytes / float(np.mean(list(received.values())))
                                                if received else None)})


def edge_signing_key(bundle: Path, sign_key: str | Path | None):
    """The key the fine-tuned bundle is signed with; a signed bundle must not come back unsigned,
    since its agents may pin the key. Checked before any site is asked for anything."""
    if sign_key:
        return load_private_key(sign_key)
    if (Path(bundle) / SIGNATURE).exists():
        raise InputError("the bundle is signed and its agents may pin the key: sign the fine-tuned bundle too",
                         path=bundle, hint="give the consortium's private key (--sign KEY, run config sign-key)")
    return None


def run_edge_server(grid: Grid, cfg: FederatedConfig, progress: bool = True, force: bool = False) -> dict:
    bundle = Path(cfg.edge_bundle)
    require_free(cfg.out, force, "run directory")
    meta = verify_bundle(bundle)
    signing_key = edge_signing_key(bundle, cfg.sign_key)
    check_sites_data(grid, cfg.min_sites, cfg.round_timeout or QUERY_TIMEOUT)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ROUNDS).write_text("")
    cfg.write_run_config(out)
    job = EdgeJob(grid, cfg, meta, read_head_weights(bundle, meta))
    before = job.score(wait_for_nodes(grid, cfg.min_sites))
    log.info("edge fine-tuning of %s (head: %d parameters); before: %s", bundle,
             sum(a.size for a in job.weights.values()), headline(before))
    history = run_rounds(grid, job, cfg, range(1, cfg.rounds + 1), np.random.default_rng([cfg.seed, 0]),
                         out / ROUNDS, "edge rounds", progress)
    after = job.evaluation
    update = {"kind": "edge fine-tuning", "rounds": cfg.rounds, "sites": sorted(after.cases),
              "validation_cases": after.cases, "validation_before": headline(before),
              "validation_after": headline(after),
              "dp": cfg.dp, "compress": cfg.compress, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    new_meta = write_bundle_with_head(bundle, out / "bundle", job.weights, update, force=True,
                                      signing_key=signing_key)
    sent, received = summed_bytes(history)
    summary = {"bundle": str(out / "bundle"), "bundle_version": new_meta["bundle_version"],
               "before": headline(before), "after": headline(after), "validation_cases": after.cases,
               "rounds": len(history), "bytes_received": received, "bytes_sent": sent,
               "epsilon": max((h["epsilon_worst_site"] for h in history if "epsilon_worst_site" in h), default=None),
               "training": RunRecord("edge", AT_SITES, len(history), asdict(cfg)).to_dict()}
    atomic_write_text(out / "summary.json", json_text(summary, indent=2) + "\n")
    return summary


def format_edge_summary(summary: dict) -> str:
    """What ``fedlite train --edge`` prints: the head before and after on the sites' validation
    parts, what travelled, and the new bundle."""
    def line(metrics: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "-"

    cases = summary.get("validation_cases", {})
    return (f"validation ({sum(cases.values())} held-out cases at {len(cases)} sites)\n"
            f"  before: {line(summary['before'])}\n  after:  {line(summary['after'])}\n"
            f"rounds: {summary['rounds']}; sent {summary['bytes_sent'] / 1e3:.1f} kB, received "
            f"{summary['bytes_received'] / 1e3:.1f} kB"
            + (f"; worst site ε = {summary['epsilon']:.2f}" if summary.get("epsilon") is not None else "")
            + f"\nbundle: {summary['bundle']} (version {summary['bundle_version']})")
