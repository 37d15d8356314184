"""What a round would take on hospital links: its measured bytes over a modelled line rate.

A simulation runs every site on one machine, where a message costs serialisation, not a network.
Given line rates in Mbit/s, each site on a link of its own and the coordinator's side not the
bottleneck, a round's transfer time is its slowest site's bytes over that rate: the model and the
evaluation request down, then its update up. The round on that link is the measured round with its
measured communication replaced by that transfer time.
"""

from __future__ import annotations

import math

from fedlite.errors import InputError


def parse_link_mbps(text: str) -> tuple[float, ...]:
    """``"20,100"`` → (20.0, 100.0); "" → ()."""
    rates = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError:
            rate = math.nan
        if not math.isfinite(rate) or rate <= 0:
            raise InputError(f"link rate {part!r} is not a positive number of Mbit/s",
                             hint="give rates like --link-mbps 20,100")
        rates.append(rate)
    return tuple(rates)


def rate_key(mbps: float) -> str:
    return f"{mbps:g}"


def transfer_seconds(nbytes: int, mbps: float) -> float:
    """Seconds ``nbytes`` take at ``mbps`` Mbit/s."""
    return nbytes * 8 / (mbps * 1e6)


def site_transfer_bytes(row: dict) -> dict[str, int]:
    """Bytes each site moved in this round, both directions: the round's parameters down, its
    update up, and the federated evaluation's request down (shared evenly by the sites asked)."""
    down = int(row["bytes_sent_per_site"])
    evaluation = row.get("federated_eval") or {}
    asked = len(evaluation.get("cases", {})) + len(evaluation.get("failed", []))
    eval_down = int(evaluation.get("bytes_sent", 0)) // asked if asked else 0
    totals = {site: down + int(up) for site, up in row["bytes_received"].items()}
    for site in evaluation.get("cases", {}):
        totals[site] = totals.get(site, down) + eval_down
    return totals


def link_record(row: dict, rates: tuple[float, ...]) -> dict:
    """A round record's fields for these line rates: ``link_seconds`` (the slowest site's transfer)
    and ``round_seconds_on_link``, each keyed by the rate in Mbit/s."""
    if not rates:
        return {}
    slowest = max(site_transfer_bytes(row).values(), default=int(row["bytes_sent_per_site"]))
    compute = max(0.0, float(row["round_seconds"]) - float(row["communication_seconds"]))
    seconds = {rate_key(r): transfer_seconds(slowest, r) for r in rates}
    return {"link_seconds": seconds, "round_seconds_on_link": {k: compute + s for k, s in seconds.items()}}
