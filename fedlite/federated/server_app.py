"""The coordinator side of federated training (Flower ServerApp).

Each round: sample sites, send them the global trainable parameters, collect their updates until
the round's deadline, screen and average them (FedAvg, or FedProx whose term the sites add), apply
the average, have the sites score it on their validation parts (federated evaluation: statistics
only, merged here), record the round and checkpoint; ``best/`` is the round the sites scored best.
The coordinator needs no patient data; a pooled test set (``server-test``) is optional and reported
beside the federated metrics. A site that misses the deadline does not stall the round; its update
is folded into a later one, damped by its staleness. ``resume`` continues a run whose server process
died from its last completed round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedlite.atomic import atomic_write_text
from fedlite.checkpoint import load_checkpoint, save_checkpoint
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import LABEL_NAMES, read_dataset
from fedlite.errors import InputError
from fedlite.federated.aggregate import update_norm, weighted_delta
from fedlite.federated.config import FederatedConfig
from fedlite.federated.params import add_to_params, frozen_fingerprint, get_arrays, to_record, trainable_names
from fedlite.federated.rounds import (QUERY_TIMEOUT, Outstanding, federated_evaluate, sample_sites, update_round,
                                      wait_for_nodes)
from fedlite.federated.task import build_initial_model, run_tokenizer
from fedlite.plots import plot_history
from fedlite.training import evaluate_model, resolve_device

log = logging.getLogger(__name__)
# Progress for people and scripts watching a run (last completed round, best round); resuming
# trusts the last checkpoint instead, which is written first.
STATE = "server_state.json"
ROUNDS = "rounds.jsonl"
RUN_CONFIG = "run_config.json"


def site_settings(cfg: FederatedConfig) -> dict:
    """The run settings sites need; the server's own paths stay on the server."""
    return {k: v for k, v in cfg.to_flat().items() if k not in ("split-dir", "out", "server-test")}


def load_run_config(run_dir: str | Path) -> FederatedConfig:
    """The settings a run started with, so ``--resume`` continues exactly that run."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise InputError(f"not a federated run directory (no {RUN_CONFIG})", path=run_dir)
    return FederatedConfig.from_flat({**json.loads(path.read_text()), "out": str(run_dir)})


def sites_busy_seconds(updates: list, start: float, end: float, fallback: float, what: str = "compute") -> float:
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


def _server_test_loader(cfg: FederatedConfig, tokenizer, config, stage_names: list[str]):
    """The optional pooled test set of the research protocol; a deployment needs none."""
    if not cfg.server_test:
        return None
    test_set = read_dataset(cfg.server_test)
    if list(test_set.info.stage_names) != stage_names:
        raise InputError(f"the server test set's stages {list(test_set.info.stage_names)} differ from the run's "
                         f"{stage_names}", path=Path(cfg.server_test) / "dataset.json")
    return make_loader(CaseDataset(test_set, tokenizer if config.uses_text else None, config.text.max_length,
                                   use_image=config.uses_image), cfg.batch_size, shuffle=False)


def run_server(grid: Grid, cfg: FederatedConfig, resume: bool = False, progress: bool = True) -> dict:
    stage_names, label_names = cfg.stages, list(LABEL_NAMES)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model = build_initial_model(cfg, len(stage_names))
    state = {"round": 0, "best_round": 0, "best_score": -1.0}
    history: list[dict] = []
    if resume:
        state, history = _resume_state(out, model)
        log.info("resuming %s after round %d", out, state["round"])
    else:
        (out / ROUNDS).write_text("")
        atomic_write_text(out / RUN_CONFIG, json.dumps(cfg.to_flat(), indent=2) + "\n")
    tokenizer = run_tokenizer(cfg)
    test_loader = _server_test_loader(cfg, tokenizer, model.config, stage_names)
    rng = np.random.default_rng([cfg.seed, state["round"]])
    outstanding: dict[str, Outstanding] = {}
    training_meta = {"mode": "federated", **cfg.to_flat()}
    bar = tqdm(range(state["round"] + 1, cfg.rounds + 1), desc="federated rounds", disable=not progress, unit="round")
    for server_round in bar:
        start = time.perf_counter()
        wall_start = time.time()
        nodes = wait_for_nodes(grid, cfg.min_sites)
        sampled = sample_sites(nodes, cfg.sites_per_round, rng)
        frozen = cfg.encoders_frozen(server_round)
        trainable = trainable_names(model, frozen)
        arrays = get_arrays(model, trainable)
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        record = to_record(arrays)
        flat = {**site_settings(cfg), "server-round": server_round, "num-stages": len(stage_names),
                "frozen-fingerprint": frozen_fingerprint(model, trainable)}
        content = RecordDict({"arrays": record, "config": ConfigRecord(flat)})
        accepted, rejected, replies = update_round(grid, sampled, content, shapes, outstanding, server_round,
                                                   cfg.round_timeout, cfg.max_staleness)
        aggregate_start = time.perf_counter()
        step_norm = None
        if accepted:
            delta = weighted_delta(accepted, cfg.staleness_decay)
            add_to_params(model, delta)
            step_norm = update_norm(delta)
        aggregate_seconds = time.perf_counter() - aggregate_start
        eval_start = time.perf_counter()
        evaluation, server_test = None, None
        if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
            global_model = RecordDict({"arrays": to_record(get_arrays(model, trainable)),
                                       "config": ConfigRecord(flat)})
            evaluation = federated_evaluate(grid, nodes, global_model, len(stage_names),
                                            cfg.round_timeout or QUERY_TIMEOUT, cfg.gamma)
            if test_loader is not None:
                server_test = evaluate_model(model, test_loader, device)
        metrics = evaluation.metrics if evaluation is not None else {}
        eval_seconds = time.perf_counter() - eval_start
        round_seconds = time.perf_counter() - start
        fresh = [u for u in accepted if u.staleness == 0]
        slowest = max((float(u.metrics.get("train-seconds", 0.0)) for u in fresh), default=0.0)
        compute = sites_busy_seconds(fresh, wall_start, wall_start + round_seconds - eval_seconds, slowest)
        training = sites_busy_seconds(fresh, wall_start, wall_start + round_seconds - eval_seconds, slowest,
                                      what="train")
        record_row = {
            "round": server_round, "frozen_encoders": frozen, "lr": cfg.lr_for_round(server_round),
            "sites": [u.site for u in accepted], "rejected": [r.__dict__ for r in rejected],
            "late_dropped": replies.late_dropped, "stale_folded": [u.site for u in accepted if u.staleness > 0],
            "train_loss": float(np.average([u.metrics["train-loss"] for u in accepted],
                                           weights=[u.num_examples for u in accepted])) if accepted else None,
            "eval": metrics, "update_norm": step_norm,
            "bytes_sent_per_site": record.count_bytes(), "bytes_sent": record.count_bytes() * len(sampled),
            "bytes_received": replies.bytes_received,
            "dense_update_bytes": int(sum(np.prod(s) for s in shapes.values()) * 4),
            "round_seconds": round_seconds, "slowest_site_train_seconds": slowest,
            "aggregate_seconds": aggregate_seconds, "eval_seconds": eval_seconds,
            "site_compute_seconds": compute, "site_training_seconds": training,
            "communication_seconds": max(0.0, round_seconds - compute - aggregate_seconds - eval_seconds),
            "samples_trained": int(sum(u.metrics.get("samples", 0) for u in accepted)),
            "site_train_seconds": {u.site: u.metrics.get("train-seconds") for u in accepted},
            "site_peak_memory_mb": {u.site: u.metrics.get("peak-memory-mb") for u in accepted},
        }
        if evaluation is not None:
            record_row["federated_eval"] = evaluation.to_record()
        if server_test is not None:
            record_row["server_test"] = server_test
        epsilons = [u.metrics["epsilon"] for u in accepted if "epsilon" in u.metrics]
        if epsilons:
            record_row["epsilon_worst_site"] = max(epsilons)
        received = sum(replies.bytes_received.values())
        if received:
            record_row["compression_ratio"] = record_row["dense_update_bytes"] * len(replies.bytes_received) / received
        history.append(record_row)
        with (out / ROUNDS).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record_row) + "\n")
        names = dict(stage_names=stage_names, label_names=label_names)
        meta = {**training_meta, "round": server_round}
        kept = {**metrics, **({"server_test": server_test} if server_test else {})}
        score = metrics.get("stage_macro_f1")
        if score is not None and score > state["best_score"]:
            state.update(best_round=server_round, best_score=score)
            save_checkpoint(out / "best", model, tokenizer, metrics=kept, training=meta, **names)
        save_checkpoint(out / "last", model, tokenizer, metrics=kept, training=meta, **names)
        state["round"] = server_round
        atomic_write_text(out / STATE, json.dumps(state) + "\n")
        if metrics:
            bar.set_postfix(acc=f"{metrics['accuracy']:.3f}", f1=f"{metrics['stage_macro_f1']:.3f}")
        if cfg.convergence_tol > 0 and step_norm is not None and step_norm < cfg.convergence_tol:
            log.info("converged after round %d: ‖Δθ‖ = %.3g < %g", server_round, step_norm, cfg.convergence_tol)
            break
    bar.close()
    summary = _write_summary(out, cfg, history, state)
    return summary


def _resume_state(out: Path, model) -> tuple[dict, list[dict]]:
    """Continue from the last checkpoint: its round is the last one completed, whatever else the
    killed process managed to write after it."""
    if not (out / "last").is_dir():
        raise InputError("nothing to resume: the run has no completed round", path=out)
    last = load_checkpoint(out / "last")
    model.load_state_dict(last.model.state_dict())
    completed = int(last.meta["training"]["round"])
    rows = [json.loads(line) for line in (out / ROUNDS).read_text().splitlines() if line.strip()]
    history = [row for row in rows if row["round"] <= completed]
    atomic_write_text(out / ROUNDS, "".join(json.dumps(row) + "\n" for row in history))
    scored = [(row["eval"]["stage_macro_f1"], row["round"]) for row in history if row.get("eval")]
    best_score, best_round = max(scored) if scored else (-1.0, 0)
    return {"round": completed, "best_round": best_round, "best_score": best_score}, history


def _write_summary(out: Path, cfg: FederatedConfig, history: list[dict], state: dict) -> dict:
    evaluated = [h for h in history if h.get("eval")]
    summary = {
        "rounds": len(history), "best_round": state["best_round"],
        "best": next((h["eval"] for h in evaluated if h["round"] == state["best_round"]), {}),
        "last": evaluated[-1]["eval"] if evaluated else {},
        "server_test": next((h["server_test"] for h in reversed(history) if "server_test" in h), None),
        "eval_cases": evaluated[-1].get("federated_eval", {}).get("cases", {}) if evaluated else {},
        "bytes_sent": sum(h["bytes_sent"] + h.get("federated_eval", {}).get("bytes_sent", 0) for h in history),
        "bytes_received": sum(sum(h["bytes_received"].values()) for h in history),
        "epsilon": max((h["epsilon_worst_site"] for h in history if "epsilon_worst_site" in h), default=None),
        "config": cfg.to_flat(),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    curves = [{**h, "train_loss": h["train_loss"] if h["train_loss"] is not None else float("nan")} for h in history]
    plot_history(curves, out / "curves.png", x_key="round", title=f"{cfg.preset} · federated")
    return summary


def run_from_config(grid: Grid, flat: dict, progress: bool = True):
    """The job a deployed run's config names: a federated export, edge fine-tuning or training."""
    if flat.get("export-checkpoint"):
        from fedlite.export.federated import export_from_config

        return export_from_config(grid, flat, progress=progress)
    cfg = FederatedConfig.from_flat(flat)
    if cfg.edge_bundle:
        from fedlite.agents.edge_server import run_edge_server

        return run_edge_server(grid, cfg, progress=progress)
    return run_server(grid, cfg, progress=progress)


def make_server_app(job: Callable[[Grid], object] | None = None, outcome: dict | None = None) -> ServerApp:
    """The ServerApp of a deployment (``job`` None: the run config says what to do) or of a
    simulation, whose ``job`` result or exception is left in ``outcome`` for the caller."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if job is None:
            run_from_config(grid, dict(context.run_config))
            return
        try:
            outcome["result"] = job(grid)
        except BaseException as exc:  # handed to the simulation's caller, which raises it there
            outcome["error"] = exc

    return server


# For Flower's deployment engine (`flwr run .`): settings come from the run config.
app = make_server_app()
