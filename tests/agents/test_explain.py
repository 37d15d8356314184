"""SHAP explanations: they follow the model, add up, stay on the site, and keep torch out."""

import json
import stat
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fedlite.agents.explain import (ExplainSettings, NoteTokenizer, explain_case, explain_image, explain_text,
                                    patch_baseline, stage_phrase)
from fedlite.agents.explain_report import write_explanation
from fedlite.agents.interpretability import consistency, sparsity, top_k_overlap
from fedlite.agents.runtime import BundleRuntime
from fedlite.cli import main
from fedlite.data.manifest import read_dataset
from fedlite.errors import InputError
from fedlite.export.head_swap import read_head_weights, write_bundle_with_head
from fedlite.text import builtin_tokenizer

SETTINGS = ExplainSettings(batch_size=64)


def test_one_decisive_patch_ranks_first():
    """A model that looks only at the patch in row 3, column 5 must be explained by that patch."""
    patch, grid = 16, 14
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-0.2, 0.2, (3, patch * grid, patch * grid)).astype(np.float32)
    pixels[:, 3 * patch:4 * patch, 5 * patch:6 * patch] = 1.0

    def score(batch):
        signal = batch[:, :, 3 * patch:4 * patch, 5 * patch:6 * patch].mean(axis=(1, 2, 3))
        p = 1 / (1 + np.exp(-4 * signal))
        return np.stack([p, 1 - p], axis=1)

    expl = explain_image(score, pixels, np.zeros_like(pixels), patch, SETTINGS)
    assert expl.values.shape == (grid * grid, 2)
    assert expl.top_features(0, 1) == [3 * grid + 5]
    assert expl.top_features(1, 1) == [3 * grid + 5]
    assert expl.values[3 * grid + 5, 0] > 0 > expl.values[3 * grid + 5, 1]
    assert expl.additivity_error.max() < 1e-5
    assert expl.evaluations <= SETTINGS.max_evals + 1


def test_one_decisive_token_ranks_first():
    tokenizer = NoteTokenizer(builtin_tokenizer(), 128)
    note = "Pale and tired for weeks; marrow shows blasts with Auer rods, platelets low."
    decisive = builtin_tokenizer().token_to_id("marrow")
    assert decisive is not None
    mask_id = builtin_tokenizer().token_to_id("[MASK]")

    def score(ids):
        present = (ids == decisive).any(axis=1).astype(np.float32)
        return np.stack([0.1 + 0.8 * present, 0.5 + 0 * present], axis=1)

    expl = explain_text(score, note, tokenizer, mask_id, SETTINGS)
    position = tokenizer(note)["input_ids"].index(decisive)
    assert expl.top_features(0, 1) == [position]
    assert expl.values[position, 0] == pytest.approx(0.8, abs=1e-6)
    assert np.abs(expl.values[:, 1]).max() < 1e-9  # an output that ignores the note gets nothing
    assert expl.additivity_error.max() < 1e-6


@pytest.fixture(scope="module")
def case(teacher_run):
    _, split = teacher_run
    test = read_dataset(split / "test")
    positive = next(c for c in test.cases if c.leukemia == 1)
    return test, positive


def test_bundle_explanation_adds_up_to_its_prediction(teacher_bundle, case):
    test, c = case
    runtime = BundleRuntime(teacher_bundle)
    pixels = runtime.load_images([test.image_path(c)])
    expl = explain_case(runtime, pixels[0], c.text, SETTINGS)
    pred = runtime.predict(pixels, [c.text])
    stage = int(pred.stage_prob[0].argmax())
    np.testing.assert_allclose(expl.image.outputs, [pred.leukemia_prob[0, 1], pred.stage_prob[0, stage]], atol=1e-5)
    np.testing.assert_allclose(expl.text.outputs, expl.image.outputs, atol=1e-5)
    assert expl.image.values.shape == (expl.grid ** 2, 2)
    assert expl.text.values.shape == (len(expl.tokens), 2)
    assert expl.image.additivity_error.max() < 1e-4 and expl.text.additivity_error.max() < 1e-4
    assert np.abs(expl.text.values).sum() > 0 and np.abs(expl.image.values).sum() > 0
    assert expl.output_names == ["P(leukemia)", f"P({stage_phrase(runtime.stage_names[stage])})"]
    profile = expl.joint_profile(0, 0.3)
    assert profile.shape == (expl.grid ** 2 + len(expl.tokens),)
    assert np.linalg.norm(profile[:expl.grid ** 2]) == pytest.approx(0.3)
    assert np.linalg.norm(profile[expl.grid ** 2:]) == pytest.approx(0.7)
    words = [c.text[w["begin"]:w["end"]] for w in expl.words]
    assert "".join(words) == "".join(c.text.split())[:len("".join(words))]  # words cover the note in order


def test_explanations_change_when_the_head_is_randomized(teacher_bundle, case, tmp_path):
    test, c = case
    weights = read_head_weights(teacher_bundle)
    rng = np.random.default_rng(1)
    shuffled = {k: rng.standard_normal(v.shape).astype(np.float32) * (v.std() + 0.1) for k, v in weights.items()}
    randomized = tmp_path / "randomized"
    meta = write_bundle_with_head(teacher_bundle, randomized, shuffled, {"kind": "randomized for a test"})
    assert meta["bundle_version"] == 2
    original, scrambled = BundleRuntime(teacher_bundle), BundleRuntime(randomized)
    pixels = original.load_images([test.image_path(c)])[0]
    a = explain_case(original, pixels, c.text, SETTINGS)
    b = explain_case(scrambled, pixels, c.text, SETTINGS)
    for modality in ("image", "text"):
        va, vb = getattr(a, modality).values[:, 0], getattr(b, modality).values[:, 0]
        assert np.corrcoef(va, vb)[0, 1] < 0.9, modality


def test_report_files_are_owner_only_and_complete(teacher_bundle, case, tmp_path):
    test, c = case
    runtime = BundleRuntime(teacher_bundle)
    note = c.text + " <b>&</b>"
    smear, pixels = runtime.load_smear(test.image_path(c))
    np.testing.assert_array_equal(pixels, runtime.load_images([test.image_path(c)])[0])
    expl = explain_case(runtime, pixels, note, ExplainSettings(max_evals=50))
    reports = tmp_path / "reports"
    paths = write_explanation(expl, "case/../7", note, smear, runtime.meta, reports)
    assert paths["png"].parent.parent == reports and paths["png"].parent.name.startswith("case_.._7-")
    assert stat.S_IMODE(paths["png"].parent.stat().st_mode) == 0o700
    for p in paths.values():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert "&lt;" in page and "&amp;" in page and "<b>" not in page
    record = json.loads(paths["json"].read_text())
    assert record["prediction"] == expl.prediction
    assert np.array(record["image"]["values"]).shape == (2, expl.grid, expl.grid)
    assert len(record["text"]["values"][0]) == len(expl.tokens)
    assert record["image"]["additivity_error"] == pytest.approx(expl.image.additivity_error.tolist())
    assert len(record["joint_profile"]["values"][1]) == expl.grid ** 2 + len(expl.tokens)


def test_explain_path_never_imports_torch(teacher_bundle, case, tmp_path):
    test, c = case
    script = (
        "import sys, json\n"
        "from fedlite.agents.runtime import BundleRuntime\n"
        "from fedlite.agents.explain import explain_case, ExplainSettings\n"
        f"rt = BundleRuntime({str(teacher_bundle)!r})\n"
        f"e = explain_case(rt, rt.load_images([{str(test.image_path(c))!r}])[0], {c.text!r}, ExplainSettings(max_evals=40))\n"
        "print(json.dumps([n for n in ('torch', 'timm', 'transformers') if n in sys.modules]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_cli_explains_a_case_and_a_dataset(teacher_bundle, case, tmp_path):
    test, c = case
    runner = CliRunner()
    reports = tmp_path / "reports"
    result = runner.invoke(main, ["explain", str(teacher_bundle), "--image", str(test.image_path(c)), "--text", c.text,
                                  "--report-dir", str(reports), "--max-evals", "60", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (reports / test.image_path(c).stem / "explanation.html").is_file()
    assert out["html"].endswith("explanation.html")
    result = runner.invoke(main, ["explain", str(teacher_bundle), "--data", str(test.root), "--limit", "3",
                                  "--report-dir", str(reports), "--max-evals", "60"])
    assert result.exit_code == 0, result.output
    assert "consistency" in result.output and "sparsity" in result.output
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["cases"] == 3
    assert 0 <= summary["measures"]["leukemia"]["image"]["consistency"] <= 1
    result = runner.invoke(main, ["explain", str(teacher_bundle), "--image", str(test.image_path(c)), "--text", "  ",
                                  "--report-dir", str(reports)])
    assert result.exit_code == 2 and "note is empty" in result.output
    result = runner.invoke(main, ["explain", str(teacher_bundle), "--data", str(test.root), "--case", "no-such-case",
                                  "--report-dir", str(reports)])
    assert result.exit_code == 2 and "no-such-case" in result.output


def test_consistency_and_sparsity():
    same = [{"a": 3.0, "b": 2.0, "c": 0.1}] * 5
    assert consistency(same, k=2) == 1.0
    rng = np.random.default_rng(0)
    noisy = [{i: float(v) for i, v in enumerate(rng.standard_normal(50))} for _ in range(8)]
    assert consistency(noisy, k=5) < 0.9
    assert sparsity([np.array([1.0, 0.5, 0.001, 0.0]), np.array([0.0, 0.0, 0.0, 0.0])]) == 1.0
    assert sparsity([np.array([1.0, -0.9, 0.2])]) == 3.0


def test_top_k_overlap_ranks_by_magnitude_whatever_the_sign():
    ours = {"blast": 0.9, "fever": -0.8, "cough": 0.01, "rash": 0.0}
    assert top_k_overlap(ours, {"blast": -0.5, "fever": 0.7, "cough": 0.0, "rash": 0.02}, k=2) == 1.0
    assert top_k_overlap(ours, {"blast": 0.5, "rash": 0.9, "fever": 0.0, "cough": 0.0}, k=2) == 0.5
    assert np.isnan(top_k_overlap({}, ours, k=2))


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="baseline"):
        ExplainSettings(baseline="grey")
    with pytest.raises(InputError, match="max-evals"):
        ExplainSettings(max_evals=2)
    pixels = np.zeros((3, 32, 32), np.float32)
    black = patch_baseline(pixels, "black", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert float(black.max()) == -1.0
