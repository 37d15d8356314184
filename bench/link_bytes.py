"""What a federated round moves over a site's line, per architecture, dense against compressed.

Bytes depend on the tensors' shapes, not on their values or on training: the model is built on
PyTorch's meta device (no weights allocated, so the `paper` architecture costs no memory), a seeded
random update is drawn for every tensor that travels, and each message is counted as the round
engine counts it, ``ArrayRecord.count_bytes()`` of what would be sent: dense float32 tensors, or the
codec's packed top-k + int8 arrays (``--compress --compress-downlink``, after a site's first contact,
which gets the model whole). A round, as a run with the defaults makes it, is three messages per
site: the model down, the update up, and the evaluation request down (the model again, or with
``--compress-downlink`` the changes since the training message). Minutes on a link are those bytes
over the line rate (``fedlite.federated.link_model``).

    fedlite bench link-bytes --presets small,paper --topk 0.1,0.01 --link-mbps 20,100 --out OUT
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from fedlite.atomic import atomic_write_text

ROUND_KINDS = {"end to end": False, "frozen encoders": True}  # name → encoders frozen


def travelling_shapes(preset: str, frozen_encoders: bool) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors a round of ``preset`` sends, from a model built without weights."""
    import torch

    from fedlite.federated.params import trainable_names
    from fedlite.model import build_model
    from fedlite.presets import get_preset

    with torch.device("meta"):
        model = build_model(get_preset(preset))
    names = set(trainable_names(model, frozen_encoders))
    return {name: tuple(p.shape) for name, p in model.named_parameters() if name in names}


def random_update(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded float32 update of these shapes: what the codec keeps depends on shapes, not values."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def message_bytes(update: dict[str, np.ndarray], topk: float | None) -> int:
    """Bytes of one message carrying ``update``: dense (``topk`` None) or through the codec at that
    share, counted as the round engine counts a message."""
    from fedlite.federated.compress import encode_update, pack_encoded
    from fedlite.federated.records import to_record

    if topk is not None:
        update = pack_encoded(encode_update(update, None, topk)[0])
    return to_record(update).count_bytes()


def link_rows(presets: list[str], topks: list[float], rates: tuple[float, ...]) -> list[dict]:
    """One row per preset, round kind and codec: bytes per site each way and minutes per round."""
    from fedlite.federated.link_model import rate_key, transfer_seconds

    rows = []
    for preset in presets:
        for kind, frozen in ROUND_KINDS.items():
            shapes = travelling_shapes(preset, frozen)
            params = sum(int(np.prod(s)) for s in shapes.values())
            update = random_update(shapes)
            dense = message_bytes(update, None)
            for topk in [None, *topks]:
                one = message_bytes(update, topk) if topk is not None else dense
                down, up = 2 * one, one  # training and evaluation messages down, the update up
                rows.append({"preset": preset, "round": kind, "tensors": len(shapes), "parameters": params,
                             "codec": "dense" if topk is None else f"top-k {topk:g} + int8", "topk": topk,
                             "message_bytes": one, "down_bytes": down, "up_bytes": up, "ratio": dense / one,
                             "minutes": {rate_key(r): transfer_seconds(down + up, r) / 60 for r in rates}})
    return rows


def format_table(rows: list[dict], rates: tuple[float, ...]) -> str:
    from fedlite.federated.link_model import rate_key

    head = ["model", "round", "codec", "MB a message", "MB a round", "fewer bytes",
            *[f"transfer a round at {rate_key(r)} Mbit/s" for r in rates]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        count = row["parameters"]
        model = f"`{row['preset']}` ({count / 1e6:.1f} M)" if count >= 1e6 else f"`{row['preset']}` ({count / 1e3:.0f} k)"
        both_ways = (row["down_bytes"] + row["up_bytes"]) / 1e6
        cells = [model, row["round"], row["codec"], f"{row['message_bytes'] / 1e6:.3f}", f"{both_ways:.2f}",
                 f"{row['ratio']:.1f}×",
                 *[_minutes(row["minutes"][rate_key(r)]) for r in rates]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _minutes(value: float) -> str:
    return f"{value:.1f} min" if value >= 1 else f"{value * 60:.1f} s"


@click.command()
@click.option("--presets", default="small,paper", show_default=True, help="Comma-separated presets.")
@click.option("--topk", "topks", default="0.1,0.01", show_default=True,
              help="Comma-separated top-k shares to compare against dense.")
@click.option("--link-mbps", default="20,100", show_default=True, help="Line rates in Mbit/s.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench-link-bytes"), show_default=True)
def main(presets: str, topks: str, link_mbps: str, out: Path) -> None:
    """Bytes and minutes per federated round on hospital links, dense against compressed."""
    from fedlite.errors import InputError
    from fedlite.federated.link_model import parse_link_mbps
    from fedlite.presets import PRESETS, get_preset

    names = [p.strip() for p in presets.split(",") if p.strip()]
    if not names:
        raise InputError("--presets gave no preset", hint=f"choose from {', '.join(PRESETS)}")
    for name in names:  # every name checked before any model is built
        get_preset(name)
    try:
        shares = [float(t) for t in topks.split(",") if t.strip()]
    except ValueError:
        shares = [float("nan")]
    if not all(0 < t <= 1 for t in shares):
        raise InputError(f"--topk {topks!r}: each share must be a number in (0, 1]")
    rates = parse_link_mbps(link_mbps)
    if not rates:
        raise InputError("--link-mbps gave no line rate", hint="e.g. --link-mbps 20,100")
    rows = link_rows(names, shares, rates)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "link_bytes.json", json.dumps({"rates_mbps": list(rates), "rows": rows}, indent=2) + "\n")
    table = format_table(rows, rates)
    atomic_write_text(out / "link_bytes.md", table)
    click.echo(table)
    click.echo(f"wrote {out / 'link_bytes.json'} and {out / 'link_bytes.md'}")
