"""``fedlite predict``: one case, or every case of a manifest, through a bundle on this machine.

Results stay on the machine that computed them: printed, or written as JSON lines next to the
site's data. Notes are checked as the manifest checks them, so a note that training would have
refused is refused here too, with where it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlite.agents.runtime import BundleRuntime, Prediction
from fedlite.atomic import atomic_write_text
from fedlite.data.manifest import MAX_NOTE_CHARS, read_dataset
from fedlite.errors import InputError
from fedlite.metrics import evaluate_predictions


def check_note(text: str, source: str) -> str:
    if not text.strip():
        raise InputError("the clinical note is empty", path=source, hint="every case needs its note")
    if len(text) > MAX_NOTE_CHARS:
        raise InputError(f"the note is {len(text):,} characters, far past the {MAX_NOTE_CHARS:,} a clinical note "
                         "has", path=source, hint="pass the note of this case only")
    return text


def read_note_file(path: Path) -> str:
    if not path.is_file():
        raise InputError("note file not found", path=path)
    try:
        return check_note(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise InputError(f"note is not UTF-8 text: {exc.reason} at byte {exc.start}", path=path) from None


def case_result(runtime: BundleRuntime, pred: Prediction, row: int) -> dict:
    leukemia = pred.leukemia_prob[row]
    stage = pred.stage_prob[row]
    positive = bool(leukemia[1] >= 0.5)
    return {
        "leukemia": runtime.label_names[int(positive)],
        "leukemia_probability": float(leukemia[1]),
        "stage": runtime.stage_names[int(stage.argmax())] if positive else None,
        "stage_probabilities": {name: float(p) for name, p in zip(runtime.stage_names, stage)},
    }


def predict_case(runtime: BundleRuntime, image: Path, note: str) -> dict:
    pred = runtime.predict(runtime.load_images([image]), [check_note(note, "--text")])
    result = case_result(runtime, pred, 0)
    result["note_truncated"] = bool(pred.truncated_notes)
    return result


def format_case(result: dict) -> str:
    lines = [f"{result['leukemia']} (probability of leukemia {result['leukemia_probability']:.3f})"]
    if result["stage"] is not None:
        lines.append(f"stage: {result['stage']}  (" + ", ".join(
            f"{k} {v:.2f}" for k, v in result["stage_probabilities"].items()) + ")")
    if result.get("note_truncated"):
        lines.append("note: longer than the model's window; its end was not read")
    return "\n".join(lines)


def predict_manifest(runtime: BundleRuntime, data: Path, out: Path, batch_size: int = 16,
                     progress: bool = True) -> dict:
    """Predictions for every case of a dataset as JSON lines (written atomically) and its metrics."""
    dataset = read_dataset(data)
    pred = runtime.predict_dataset(dataset, batch_size=batch_size, progress=progress)
    lines = [json.dumps({"id": case.id, **case_result(runtime, pred, i)}) for i, case in enumerate(dataset.cases)]
    atomic_write_text(out, "\n".join(lines) + "\n", mode=0o600)  # per-case calls stay with their owner
    labels = np.array([c.leukemia for c in dataset.cases])
    stages = np.array([-1 if c.stage is None else c.stage for c in dataset.cases])
    metrics = evaluate_predictions(labels, stages, pred.leukemia_prob, pred.stage_prob)
    return {"cases": len(dataset), "out": str(out), "truncated_notes": pred.truncated_notes, "metrics": metrics}
