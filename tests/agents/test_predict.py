"""`fedlite predict`: one case or a whole dataset through a bundle, bad notes refused by name."""

import json

import pytest
from click.testing import CliRunner

from fedlite.cli import main
from fedlite.data.manifest import read_dataset


@pytest.fixture()
def case(teacher_run):
    data = read_dataset(teacher_run[1] / "test")
    first = data.cases[0]
    return data.image_path(first), first.text


def test_one_case_gets_a_call_and_probabilities(teacher_bundle, case, tmp_path):
    image, note = case
    note_file = tmp_path / "note.txt"
    note_file.write_text(note, encoding="utf-8")
    result = CliRunner().invoke(main, ["predict", str(teacher_bundle), "--image", str(image),
                                       "--text-file", str(note_file), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert 0 <= out["leukemia_probability"] <= 1
    assert sum(out["stage_probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert (out["stage"] is None) == (out["leukemia_probability"] < 0.5)


@pytest.mark.parametrize("note,message", [("   ", "note is empty"), ("x " * 15_000, "characters")])
def test_empty_or_huge_notes_are_refused(teacher_bundle, case, note, message):
    result = CliRunner().invoke(main, ["predict", str(teacher_bundle), "--image", str(case[0]), "--text", note])
    assert result.exit_code == 2 and message in result.output


def test_a_dataset_gets_one_line_per_case_and_metrics(teacher_bundle, teacher_run, tmp_path):
    out = tmp_path / "predictions.jsonl"
    result = CliRunner().invoke(main, ["predict", str(teacher_bundle), "--data", str(teacher_run[1] / "test"),
                                       "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    ids = [c.id for c in read_dataset(teacher_run[1] / "test").cases]
    assert [l["id"] for l in lines] == ids and summary["cases"] == len(ids)
    assert 0 <= summary["metrics"]["accuracy"] <= 1


def test_a_missing_image_is_named(teacher_bundle, tmp_path):
    result = CliRunner().invoke(main, ["predict", str(teacher_bundle), "--image", str(tmp_path / "nope.png"),
                                       "--text", "WBC 12"])
    assert result.exit_code == 2 and "nope.png" in result.output and "not found" in result.output
