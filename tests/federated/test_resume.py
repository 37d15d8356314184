"""A run survives the ways a server dies: mid-write of its round record, between the two renames
that replace a checkpoint, or with its round record gone."""

from __future__ import annotations

import json
import os

import pytest

from fedlite.atomic import recover_staged, staged_dir
from fedlite.checkpoint import save_checkpoint
from fedlite.data.manifest import DEFAULT_STAGE_NAMES, LABEL_NAMES
from fedlite.errors import InputError
from fedlite.federated.config import FederatedConfig
from fedlite.federated.server_app import ROUNDS, _resume_state
from fedlite.federated.task import build_initial_model, run_tokenizer


def test_a_replacement_cut_between_its_renames_is_finished_or_undone(tmp_path):
    final = tmp_path / "last"
    with staged_dir(final) as d:
        (d / "v").write_text("1")
    # the new version complete, the old one moved aside, the crash before the second rename
    with staged_dir(tmp_path / "scratch") as d:
        (d / "v").write_text("2")
    old = tmp_path / ".last.x.old"
    old.mkdir()
    os.replace(final, old / "last")
    os.replace(tmp_path / "scratch", tmp_path / ".last.y.ready")
    assert recover_staged(final) and (final / "v").read_text() == "2"
    assert not list(tmp_path.glob(".last.*"))
    # crashed before the new one was complete: the old one comes back
    old.mkdir()
    os.replace(final, old / "last")
    (tmp_path / ".last.z.tmp").mkdir()  # half written: never used
    assert recover_staged(final) and (final / "v").read_text() == "2"
    assert not recover_staged(final)  # nothing to do when it is in place


@pytest.fixture
def run_dir(tmp_path):
    cfg = FederatedConfig(preset="tiny", rounds=5)
    model = build_initial_model(cfg, 4)
    save_checkpoint(tmp_path / "last", model, run_tokenizer(cfg), metrics={},
                    training={"mode": "federated", "round": 2}, stage_names=list(DEFAULT_STAGE_NAMES),
                    label_names=list(LABEL_NAMES))
    rows = [{"round": r, "eval": {"stage_macro_f1": 0.1 * r}} for r in (1, 2, 3)]
    (tmp_path / ROUNDS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, model


def test_resume_drops_a_torn_last_line_and_rows_after_the_checkpoint(run_dir):
    out, model = run_dir
    with (out / ROUNDS).open("a") as fh:
        fh.write('{"round": 4, "eval": {"stage_ma')
    state, history = _resume_state(out, model)
    assert state["round"] == 2 and [r["round"] for r in history] == [1, 2] and state["best_round"] == 2
    assert [json.loads(line)["round"] for line in (out / ROUNDS).read_text().splitlines()] == [1, 2]


def test_resume_without_a_round_record_keeps_the_checkpoint(run_dir):
    out, model = run_dir
    (out / ROUNDS).unlink()
    state, history = _resume_state(out, model)
    assert state["round"] == 2 and history == []


def test_resume_recovers_a_checkpoint_caught_mid_replace(run_dir):
    out, model = run_dir
    os.replace(out / "last", out / ".last.abc.ready")
    state, _ = _resume_state(out, model)
    assert state["round"] == 2 and (out / "last").is_dir()
    os.replace(out / "last", out / "elsewhere")
    with pytest.raises(InputError, match="nothing to resume"):
        _resume_state(out, model)


def test_a_run_over_an_existing_one_is_refused_before_anything_is_written(tmp_path, synth_split):
    from fedlite.centralized import train_centralized

    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(InputError, match="run directory already exists"):
        train_centralized(synth_split.out_dir, out, preset="tiny", progress=False)
    assert (out / "history.jsonl").read_text() == '{"epoch": 1}\n'


def test_a_bad_image_stops_a_run_before_its_first_epoch(tmp_path, synth_split):
    import shutil

    from fedlite.centralized import train_centralized

    data = tmp_path / "data"
    shutil.copytree(synth_split.out_dir.parent, data)
    split = data / synth_split.out_dir.name
    test = json.loads((split / "test" / "manifest.jsonl").read_text().splitlines()[0])
    (split / "test" / test["image"]).resolve().write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot decode image"):
        train_centralized(split, tmp_path / "run", preset="tiny", progress=False)
    assert not (tmp_path / "run").exists()
