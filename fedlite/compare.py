"""Side-by-side comparison of finished training runs (federated or centralized): the held-out
metrics, what travelled over the network and how long it took, as a table and a plot, so choosing
between FedAvg, FedProx, DP or compressed updates is a matter of reading one page.

Runs are compared on one held-out set where they have one: a federated run that scored a pooled
test set at the coordinator (``--server-test``, a simulation's default) is shown on it, as a
centralized run is on its ``--eval-data``; otherwise on the sites' validation parts. The column
"scored on" says which, so figures from different sets are never read as comparable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedlite.errors import InputError
from fedlite.federated.link_model import link_record
from fedlite.run_record import run_record

METRICS = (("accuracy", "accuracy"), ("auc", "AUC"), ("stage_macro_f1", "stage macro-F1"))


@dataclass
class RunSummary:
    name: str
    mode: str  # "federated" or "centralized"
    steps: int  # rounds or epochs completed
    last: dict
    best: dict
    best_step: int
    minutes: float  # federated: round wall time; centralized: training time (evaluation excluded)
    scored_on: str = ""  # the held-out set behind ``last``, ``best`` and ``curve``, with its cases
    curve: list[tuple[int, dict]] = field(default_factory=list)
    bytes_sent: int | None = None
    bytes_received: int | None = None
    dense_bytes: int | None = None  # the sites' updates as dense float32
    dense_sent: int | None = None  # the messages to the sites with their parameters as dense float32
    epsilon: float | None = None
    settings: str = ""
    link_minutes: dict[str, float] = field(default_factory=dict)  # Mbit/s → the rounds' minutes on that link


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"not JSON ({exc.msg})", path=path, line=number) from None
    return rows


def load_run(run_dir: str | Path, link_mbps: tuple[float, ...] = ()) -> RunSummary:
    """A finished run directory of ``fedlite train`` (federated or ``--centralized``); ``link_mbps``
    models its rounds on those line rates (beside any its records already hold)."""
    run = Path(run_dir)
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise InputError("no summary.json: not a finished training run", path=run,
                         hint="compare directories written by `fedlite train --out RUN`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON ({exc.msg})", path=summary_path) from None
    for name, reader in (("rounds.jsonl", _federated), ("history.jsonl", _centralized)):
        if (run / name).is_file():
            try:
                return reader(run, summary, _read_jsonl(run / name), link_mbps)
            except (KeyError, TypeError, AttributeError) as exc:
                raise InputError(f"a record lacks the field {exc} or has the wrong type", path=run / name) from None
    raise InputError("neither rounds.jsonl (federated) nor history.jsonl (centralized) found", path=run)


def _federated(run: Path, summary: dict, rounds: list[dict], link_mbps: tuple[float, ...]) -> RunSummary:
    config = run_record(summary, run / "summary.json").settings
    dense = sum(r["dense_update_bytes"] * len(r["bytes_received"]) for r in rounds)
    mu = float(config.get("proximal_mu", 0.0) or 0.0)
    flags = [f"fedprox μ={mu:g}" if mu > 0 else "fedavg"]
    if config.get("compress"):
        flags.append(f"top-k {config.get('topk_fraction')} + int8")
    if config.get("compress_downlink"):
        flags.append("changes down")
    if config.get("dp"):
        flags.append(f"DP σ={config.get('noise_multiplier')} C={config.get('max_grad_norm')}")
    flags.append(f"{config.get('freeze_rounds')} frozen, E={config.get('local_epochs')}, "
                 f"B={config.get('batch_size')}, {config.get('optimizer')} {config.get('lr')}")
    best_round = int(summary.get("best_round", 0))
    tested = [r for r in rounds if r.get("server_test")]
    if tested and tested[-1]["round"] == rounds[-1]["round"]:
        # the pooled test set, at the round the sites chose as best on their own validation parts
        last, curve = tested[-1]["server_test"], [(r["round"], r["server_test"]) for r in tested]
        scored_on = f"{Path(str(config.get('server_test', 'test'))).name} ({last.get('cases', '?')})"
        best = next((r["server_test"] for r in tested if r["round"] == best_round), {})
    else:
        cases = summary.get("eval_cases") or {}
        scored_on = f"sites' validation ({sum(cases.values())})" if cases else "sites' validation"
        last, best = summary.get("last", {}), summary.get("best", {})
        curve = [(r["round"], r["eval"]) for r in rounds if r.get("eval")]
    return RunSummary(
        name=run.name, mode="federated", steps=len(rounds), last=last, best=best, best_step=best_round,
        minutes=sum(r["round_seconds"] for r in rounds) / 60, scored_on=scored_on, curve=curve,
        bytes_sent=int(summary.get("bytes_sent", 0)), bytes_received=int(summary.get("bytes_received", 0)),
        dense_bytes=int(dense), dense_sent=int(sum(_dense_sent(r) for r in rounds)), epsilon=summary.get("epsilon"),
        settings=", ".join(flags), link_minutes=_link_minutes(rounds, link_mbps))


def _dense_sent(row: dict) -> float:
    """Bytes a round's messages to the sites (training and evaluation) would take with the
    parameters sent whole as float32, as a dense downlink sends them."""
    training = row["bytes_sent"] * (row.get("downlink_compression_ratio") or 1.0)
    evaluation = row.get("federated_eval") or {}
    asked = len(evaluation.get("cases", {})) + len(evaluation.get("failed", []))
    return training + (row["dense_update_bytes"] * asked if evaluation.get("bytes_sent") else 0)


def _link_minutes(rounds: list[dict], link_mbps: tuple[float, ...]) -> dict[str, float]:
    """Minutes of all rounds per line rate: as recorded, and modelled from the recorded bytes for
    the rates asked for here."""
    per_round = [{**r.get("round_seconds_on_link", {}), **link_record(r, link_mbps).get("round_seconds_on_link", {})}
                 for r in rounds]
    rates = {key for seconds in per_round for key in seconds}
    return {key: sum(seconds[key] for seconds in per_round) / 60
            for key in sorted(rates, key=float) if all(key in seconds for seconds in per_round)}


def _centralized(run: Path, summary: dict, history: list[dict], link_mbps: tuple[float, ...]) -> RunSummary:
    training = run_record(summary, run / "summary.json").settings
    last = summary.get("last", {})
    eval_data = training.get("eval_data")
    scored_on = f"{Path(str(eval_data)).name if eval_data else 'held-out set'} ({last.get('cases', '?')})"
    return RunSummary(
        name=run.name, mode="centralized", steps=len(history), last=last,
        best=summary.get("best", {}), best_step=int(summary.get("best_epoch", 0)),
        minutes=sum(h.get("train_seconds", 0.0) for h in history) / 60, scored_on=scored_on,
        curve=[(h["epoch"], h["eval"]) for h in history if h.get("eval")],
        settings=f"{summary.get('modality', 'both')} modality, B={training.get('batch_size')}, "
                 f"{training.get('optimizer')} {training.get('lr')}")


def _megabytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.1f}"


def markdown_table(runs: list[RunSummary]) -> str:
    """One row per run: last-step held-out metrics and the set they come from, the stage macro-F1
    of the best round/epoch, bytes and how many times fewer than dense float32 (the updates alone,
    and both directions), and time (also on each modelled hospital link)."""
    rates = sorted({key for r in runs for key in r.link_minutes}, key=float)
    head = ("| run | mode | settings | rounds/epochs | scored on | accuracy | AUC | stage macro-F1 | best F1 (at) "
            "| MB to sites | MB from sites | updates, fewer bytes | both ways, fewer bytes | worst ε | minutes |"
            + "".join(f" minutes at {key} Mbit/s |" for key in rates))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        last = r.last or {}
        ratio = (f"{r.dense_bytes / r.bytes_received:.1f}×" if r.bytes_received and r.dense_bytes else "–")
        moved = (r.bytes_sent or 0) + (r.bytes_received or 0)
        both = (f"{(r.dense_bytes + r.dense_sent) / moved:.1f}×"
                if moved and r.dense_bytes and r.dense_sent is not None else "–")
        cells = [r.name, r.mode, r.settings, str(r.steps), r.scored_on or "–",
                 f"{last['accuracy'] * 100:.1f} %" if "accuracy" in last else "–",
                 f"{last['auc']:.3f}" if "auc" in last else "–",
                 f"{last['stage_macro_f1']:.3f}" if "stage_macro_f1" in last else "–",
                 f"{r.best.get('stage_macro_f1', float('nan')):.3f} ({r.best_step})" if r.best else "–",
                 _megabytes(r.bytes_sent), _megabytes(r.bytes_received), ratio, both,
                 f"{r.epsilon:.2f}" if r.epsilon is not None else "–", f"{r.minutes:.1f}",
                 *(f"{r.link_minutes[key]:.1f}" if key in r.link_minutes else "–" for key in rates)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[RunSummary], path: Path) -> Path:
    """Held-out accuracy, AUC and stage macro-F1 per round/epoch, one line per run."""
    from matplotlib.ticker import MaxNLocator

    from fedlite.plots import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS) + 1.5, 4), sharex=True,
                             layout="constrained")
    for ax, (key, label) in zip(axes, METRICS):
        for r in runs:
            points = [(step, m[key]) for step, m in r.curve if key in m]
            if points:
                ax.plot(*zip(*points), marker="o", label=r.name)
        ax.set_title(label)
        ax.set_xlabel("round / epoch")
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return save_figure(fig, path)
