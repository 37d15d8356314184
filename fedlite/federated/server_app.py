"""The coordinator side of federated training (Flower ServerApp).

Training is a job of the round engine (``fedlite.federated.engine``): each round the sites get the
global trainable parameters and send updates, which are screened and averaged (FedAvg, or FedProx
whose term the sites add); then the sites score the new model on their validation parts (federated
evaluation: statistics only, merged here) and the round is checkpointed; ``best/`` is the round the
sites scored best. The coordinator needs no patient data; a pooled test set (``server-test``) is
optional and reported beside the federated metrics. ``resume`` continues a run whose server process
died from its last completed round.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlite.atomic import atomic_write_text, json_text, recover_staged, require_free
from fedlite.checkpoint import load_checkpoint, save_checkpoint
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import LABEL_NAMES, read_dataset
from fedlite.errors import InputError
from fedlite.federated.config import FederatedConfig
from fedlite.federated.downlink import DownlinkStream
from fedlite.federated.engine import UpdateJob, downlink_messages, run_rounds, summed_bytes
from fedlite.federated.params import add_to_params, frozen_fingerprint, get_arrays, set_arrays, trainable_names
from fedlite.federated.preflight import check_sites_data
from fedlite.federated.records import to_record
from fedlite.federated.rounds import QUERY_TIMEOUT, federated_evaluate
from fedlite.federated.task import build_initial_model, run_tokenizer
from fedlite.plots import plot_history
from fedlite.run_record import AT_SITES, RunRecord, run_record
from fedlite.training import evaluate_model, resolve_device

log = logging.getLogger(__name__)
# Progress for people and scripts watching a run (last completed round, best round); resuming
# trusts the last checkpoint instead, which is written first.
STATE = "server_state.json"
ROUNDS = "rounds.jsonl"


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


class TrainingJob(UpdateJob):
    """Federated training of the full model as a job of the round engine: the trainable tensors
    travel (the encoders' stay home while frozen, proven equal by a fingerprint); after a round the
    sites score the new model (every ``eval-every`` rounds and the last), and ``last/`` and ``best/``
    are checkpointed."""

    message_type = "train"

    def __init__(self, grid: Grid, cfg: FederatedConfig, model, tokenizer, state: dict, device):
        self.grid, self.cfg, self.model, self.tokenizer, self.state = grid, cfg, model, tokenizer, state
        self.device = device
        self.test_loader = _server_test_loader(cfg, tokenizer, model.config, cfg.stages)
        self.record = RunRecord("federated", AT_SITES, 0, asdict(cfg))
        self.downlink = DownlinkStream(cfg.topk_fraction) if cfg.compress_downlink else None
        self._settings: tuple[int, dict] = (0, {})

    def _trainable(self, server_round: int) -> list[str]:
        return trainable_names(self.model, self.cfg.encoders_frozen(server_round))

    def parameters(self, server_round: int) -> dict[str, np.ndarray]:
        return get_arrays(self.model, self._trainable(server_round))

    def settings(self, server_round: int) -> dict:
        """The round's settings, computed once per round: the fingerprint hashes every frozen weight,
        and the round's averaging changes only the trainable ones, so evaluation sends the same."""
        if self._settings[0] != server_round:
            self._settings = (server_round, {
                **self.cfg.site_settings(), "server-round": server_round, "num-stages": len(self.cfg.stages),
                "frozen-fingerprint": frozen_fingerprint(self.model, self._trainable(server_round))})
        return self._settings[1]

    def apply(self, delta: dict[str, np.ndarray]) -> None:
        add_to_params(self.model, delta)

    @contextmanager
    def model_of_record(self):
        """The model this run produces, loaded in ``self.model`` while the block runs: the global
        model θ, or with a downlink stream the copy θ̂ the sites hold — what they trained from and
        what their scores describe. θ runs ahead of θ̂ by changes not yet sent, computed from older
        copies, so it is neither validated nor, late in a run, better."""
        if self.downlink is None or not self.downlink.reference:
            yield
            return
        ahead = get_arrays(self.model, list(self.downlink.reference))
        set_arrays(self.model, self.downlink.reference)
        try:
            yield
        finally:
            set_arrays(self.model, ahead)

    def evaluate(self, server_round: int, row: dict, nodes: list[int]) -> None:
        cfg = self.cfg
        row.update({"frozen_encoders": cfg.encoders_frozen(server_round), "lr": cfg.lr_for_round(server_round)})
        metrics = {}
        if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
            contents, version = self._evaluation_messages(server_round, nodes)
            evaluation = federated_evaluate(self.grid, nodes, contents, len(cfg.stages),
                                            cfg.round_timeout or QUERY_TIMEOUT, cfg.gamma)
            if self.downlink is not None:
                row["downlink_residual_norm"] = self.downlink.residual_norm(self.parameters(server_round))
                for node in evaluation.answered_nodes:
                    self.downlink.delivered(node, version)
                for node in evaluation.failed_nodes:
                    self.downlink.forget(node)
            metrics = evaluation.metrics
            row["federated_eval"] = evaluation.to_record()
            if self.test_loader is not None:
                with self.model_of_record():
                    row["server_test"] = evaluate_model(self.model, self.test_loader, self.device)
        row["eval"] = metrics

    def _evaluation_messages(self, server_round: int, nodes: list[int]) -> tuple[RecordDict | dict, int | None]:
        """The model to score: the same dense parameters for every site, or (downlink stream) each
        site's changes up to the new version, so the sites score the copy they now hold."""
        arrays, settings = self.parameters(server_round), self.settings(server_round)
        if self.downlink is None:
            return RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(settings)}), None
        return downlink_messages(self.downlink, arrays, settings, nodes), self.downlink.version

    def save(self, server_round: int, row: dict) -> None:
        """``last/`` every round, ``best/`` when the sites scored it best; then the progress file."""
        out, state = Path(self.cfg.out), self.state
        metrics, server_test = row["eval"], row.get("server_test")
        names = dict(stage_names=self.cfg.stages, label_names=list(LABEL_NAMES))
        meta = self.record.at(server_round).to_dict()
        kept = {**metrics, **({"server_test": server_test} if server_test else {})}
        score = metrics.get("stage_macro_f1")
        with self.model_of_record():
            if score is not None and score > state["best_score"]:
                state.update(best_round=server_round, best_score=score)
                save_checkpoint(out / "best", self.model, self.tokenizer, metrics=kept, training=meta, **names)
            save_checkpoint(out / "last", self.model, self.tokenizer, metrics=kept, training=meta, **names)
        state["round"] = server_round
        atomic_write_text(out / STATE, json.dumps(state) + "\n")


def run_server(grid: Grid, cfg: FederatedConfig, resume: bool = False, progress: bool = True,
               force: bool = False) -> dict:
    """Run (or with ``resume`` continue) the training job; an existing run directory is replaced only
    with ``force``."""
    out = Path(cfg.out)
    if not resume:
        require_free(out, force, "run directory")
    check_sites_data(grid, cfg.min_sites, cfg.round_timeout or QUERY_TIMEOUT)
    out.mkdir(parents=True, exist_ok=True)
    model = build_initial_model(cfg, len(cfg.stages))
    state = {"round": 0, "best_round": 0, "best_score": -1.0}
    history: list[dict] = []
    if resume:
        state, history = _resume_state(out, model)
        log.info("resuming %s after round %d", out, state["round"])
    else:
        (out / ROUNDS).write_text("")
        cfg.write_run_config(out)
    job = TrainingJob(grid, cfg, model, run_tokenizer(cfg), state, resolve_device(cfg.device))
    rng = np.random.default_rng([cfg.seed, state["round"]])
    history += run_rounds(grid, job, cfg, range(state["round"] + 1, cfg.rounds + 1), rng, out / ROUNDS,
                          "federated rounds", progress)
    return _write_summary(out, cfg, history, state)


def _resume_state(out: Path, model) -> tuple[dict, list[dict]]:
    """Continue from the last checkpoint: its round is the last one completed, whatever else the
    killed process managed to write after it. A checkpoint caught mid-replace is recovered; a torn
    or missing round record loses those rows only (logged), never the run."""
    for name in ("last", "best"):
        if recover_staged(out / name):
            log.warning("recovered %s, whose replacement a crash interrupted", out / name)
    if not (out / "last").is_dir():
        raise InputError("nothing to resume: the run has no completed round", path=out)
    last = load_checkpoint(out / "last")
    model.load_state_dict(last.model.state_dict())
    completed = run_record(last.meta["training"], out / "last").step
    rows = []
    lines = (out / ROUNDS).read_text(encoding="utf-8", errors="replace").splitlines() if (out / ROUNDS).exists() else []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            log.warning("%s line %d is torn (the server died writing it); dropped", out / ROUNDS, number)
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
    if not lines:
        log.warning("%s is missing or empty: the resumed run's record starts after round %d", out / ROUNDS, completed)
    history = [row for row in rows if row["round"] <= completed]
    atomic_write_text(out / ROUNDS, "".join(json_text(row) + "\n" for row in history))
    scored = [(row["eval"]["stage_macro_f1"], row["round"]) for row in history
              if isinstance(row.get("eval"), dict) and row["eval"].get("stage_macro_f1") is not None]
    best_score, best_round = max(scored) if scored else (-1.0, 0)
    return {"round": completed, "best_round": best_round, "best_score": best_score}, history


def _write_summary(out: Path, cfg: FederatedConfig, history: list[dict], state: dict) -> dict:
    evaluated = [h for h in history if h.get("eval")]
    sent, received = summed_bytes(history)
    summary = {
        "rounds": len(history), "best_round": state["best_round"],
        "best": next((h["eval"] for h in evaluated if h["round"] == state["best_round"]), {}),
        "last": evaluated[-1]["eval"] if evaluated else {},
        "server_test": next((h["server_test"] for h in reversed(history) if "server_test" in h), None),
        "eval_cases": evaluated[-1].get("federated_eval", {}).get("cases", {}) if evaluated else {},
        "bytes_sent": sent, "bytes_received": received,
        "epsilon": max((h["epsilon_worst_site"] for h in history if "epsilon_worst_site" in h), default=None),
        "training": RunRecord("federated", AT_SITES, len(history), asdict(cfg)).to_dict(),
    }
    atomic_write_text(out / "summary.json", json_text(summary, indent=2) + "\n")
    curves = [{**h, "train_loss": h["train_loss"] if h["train_loss"] is not None else float("nan")} for h in history]
    plot_history(curves, out / "curves.png", x_key="round", title=f"{cfg.preset} · federated")
    return summary


def format_training_summary(summary: dict, out: Path) -> str:
    """What ``fedlite train`` prints after a federated run: the sites' evaluation of the best round,
    the pooled test set when one was given, what travelled, and where the outputs are."""
    from fedlite.metrics import format_metrics

    lines = []
    if summary.get("best"):
        stage_names = json.loads((out / "best" / "config.json").read_text())["stage_names"]
        cases = summary["eval_cases"]
        lines += [f"federated evaluation, best round ({sum(cases.values())} validation cases at {len(cases)} sites):",
                  format_metrics(summary["best"], stage_names)]
        if summary.get("server_test"):
            test = summary["server_test"]
            lines.append(f"\nserver test set, last round: accuracy {test['accuracy'] * 100:.2f} %, "
                         f"AUC {test['auc']:.4f}, stage macro-F1 {test['stage_macro_f1']:.4f}")
    sent, received = summary["bytes_sent"], summary["bytes_received"]
    lines.append(f"\nrounds: {summary['rounds']} (best: {summary['best_round']}); sent {sent / 1e6:.1f} MB, "
                 f"received {received / 1e6:.1f} MB" + (f"; worst site ε = {summary['epsilon']:.2f}"
                                                        if summary.get("epsilon") is not None else ""))
    lines.append(f"best checkpoint: {out / 'best'}\nrounds: {out / 'rounds.jsonl'}\ncurves: {out / 'curves.png'}")
    return "\n".join(lines)


def run_from_config(grid: Grid, flat: dict, progress: bool = True):
    """The job a deployed run's config names: a federated export, edge fine-tuning or training."""
    if flat.get("export-checkpoint"):
        from fedlite.export.federated import export_from_config

        return export_from_config(grid, flat, progress=progress)
    cfg = FederatedConfig.from_flat(flat)
    if cfg.edge_bundle:
        from fedlite.federated.edge_server import run_edge_server

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
