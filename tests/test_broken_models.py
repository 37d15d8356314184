"""A broken model never reaches a clinician: non-finite weights are refused on load, non-finite
outputs stop prediction and scoring, a NaN anywhere in a parity report fails the gate, and records
are strict JSON."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedlite.atomic import json_text
from fedlite.checkpoint import WEIGHTS, load_checkpoint
from fedlite.errors import InputError
from fedlite.eval_stats import EvalStats
from fedlite.export.parity import NO_GATE, Gate, gate_failures


def test_a_checkpoint_with_nan_weights_is_refused_on_load(teacher_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(teacher_run[0], broken)
    state = load_file(str(broken / WEIGHTS))
    name = next(n for n, t in state.items() if t.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(broken / WEIGHTS))
    with pytest.raises(InputError, match="NaN or Inf.*broken"):
        load_checkpoint(broken)


def test_the_bundle_refuses_to_give_a_nan_probability(teacher_bundle):
    from fedlite.agents.runtime import BundleRuntime

    runtime = BundleRuntime(teacher_bundle)

    class NanHead:
        def run(self, names, feeds):
            n = len(next(iter(feeds.values())))
            return [np.full((n, 2), np.nan, np.float32), np.full((n, len(runtime.stage_names)), 0.25, np.float32)]

    pixels = np.zeros((1, 3, runtime.image_size, runtime.image_size), np.float32)
    assert np.isfinite(runtime.predict(pixels, ["a note"]).leukemia_prob).all()
    runtime.sessions["head"] = NanHead()
    with pytest.raises(InputError, match="NaN or Inf.*broken"):
        runtime.predict(pixels, ["a note"])


def test_scoring_refuses_nan_probabilities():
    with pytest.raises(InputError, match="NaN or Inf"):
        EvalStats.from_predictions(np.array([0, 1]), np.array([-1, 0]), np.array([[np.nan, np.nan], [0.2, 0.8]]),
                                   np.full((2, 4), 0.25))


def _report(**bundle) -> dict:
    teacher = {"cases": 100, "positives": 50, "accuracy": 0.9, "auc": 0.95, "stage_macro_f1": 0.6,
               "stage_accuracy": 0.6}
    got = {**teacher, "case_agreement": 1.0, "leukemia_agreement": 1.0, **bundle}
    return {"reference": "teacher", "models": {"teacher": teacher, "bundle": got}}


def test_a_nan_anywhere_in_the_report_fails_even_a_gate_that_allows_everything():
    assert gate_failures(_report(), "bundle", NO_GATE) == []
    failures = gate_failures(_report(auc=float("nan")), "bundle", NO_GATE)
    assert len(failures) == 1 and "the bundle's auc not a number" in failures[0]


def test_the_gate_has_a_floor_at_chance_whatever_the_teacher():
    report = _report(auc=0.5)
    report["models"]["teacher"]["auc"] = 0.5
    assert any("not above 0.5" in f for f in gate_failures(report, "bundle", Gate()))
    assert gate_failures(report, "bundle", NO_GATE) == []
    report["models"]["bundle"]["auc"] = 0.0  # a few verification cases can rank every pair the wrong way
    assert gate_failures(report, "bundle", NO_GATE) == []
    assert any("not above 0.5" in f for f in gate_failures(report, "bundle", Gate()))


def test_records_are_strict_json_with_undefined_metrics_as_null():
    text = json_text({"auc": float("nan"), "loss": [1.0, float("inf")], "n": 3})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written")) == {"auc": None,
                                                                                      "loss": [1.0, None], "n": 3}
