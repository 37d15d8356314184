"""How a model was trained, in one schema for every kind of run.

A checkpoint's ``training`` entry and the ``training`` entry of a run's ``summary.json`` hold a
``RunRecord``: the kind of run (centralized, federated, edge fine-tuning), where its cases were (a
directory of pooled cases, or ``"sites"``: they never left the hospitals), how far it got (epochs
or rounds) and its settings, every key in snake_case. ``run_record`` is the one reader; it also
reads what runs wrote before this schema: federated checkpoints their settings flat in kebab-case
beside ``mode`` and ``round``, centralized ones flat in snake_case beside ``mode`` and ``epoch``,
and federated and edge summaries under ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedlite.errors import InputError

SCHEMA = 1
KINDS = ("centralized", "federated", "edge")
AT_SITES = "sites"  # the ``data`` of a run whose cases stayed at the sites
STEP = {"centralized": "epoch", "federated": "round", "edge": "round"}


@dataclass(frozen=True)
class RunRecord:
    kind: str
    data: str  # a directory of pooled cases, or AT_SITES
    step: int  # epochs (centralized) or rounds completed
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of run {self.kind!r}, not one of {', '.join(KINDS)}")

    @property
    def step_name(self) -> str:
        return STEP[self.kind]

    def at(self, step: int) -> "RunRecord":
        return replace(self, step=step)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "kind": self.kind, "data": self.data, "step": self.step,
                "settings": dict(self.settings)}


def _snake(settings: dict) -> dict:
    return {str(key).replace("-", "_"): value for key, value in settings.items()}


def run_record(entry: dict, where: str | Path | None = None) -> RunRecord:
    """The record in a checkpoint's ``training`` entry or a summary (``where``: named in errors)."""
    if not isinstance(entry, dict):
        raise InputError("the training record is not a JSON object", path=where)
    try:
        if "schema" in entry:
            if entry["schema"] != SCHEMA:
                raise InputError(f"training record schema {entry['schema']!r} is newer than this fedlite reads",
                                 path=where, hint="upgrade fedlite")
            return RunRecord(str(entry["kind"]), str(entry["data"]), int(entry["step"]), dict(entry["settings"]))
        if "training" in entry:  # a summary
            return run_record(entry["training"], where)
        if "config" in entry:  # an older federated or edge summary: its settings only
            settings = _snake(entry["config"])
            kind = "edge" if settings.get("edge_bundle") else "federated"
            return RunRecord(kind, AT_SITES, int(entry.get("rounds", 0)), settings)
        # an older checkpoint: settings flat beside the kind and the step
        settings = _snake({k: v for k, v in entry.items() if k not in ("mode", "round", "epoch")})
        kind = str(entry.get("mode", ""))
        if kind == "centralized":
            return RunRecord(kind, str(settings.pop("data", "")), int(entry.get("epoch", 0)), settings)
        if kind == "federated":
            return RunRecord(kind, AT_SITES, int(entry.get("round", 0)), settings)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the training record is malformed ({exc})", path=where) from None
    raise InputError("the training record names no kind of run", path=where,
                     hint="a checkpoint written by `fedlite train` records how it was trained")
