"""Scoring checkpoints on a dataset: one as it is, several as their late fusion (averaged probabilities,
the paper's baseline against a fusion layer), and never on data with other stages."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fedlite.checkpoint import save_checkpoint
from fedlite.cli import main
from fedlite.data.manifest import read_dataset
from fedlite.errors import InputError
from fedlite.evaluate import checkpoint_probabilities, evaluate_checkpoint, evaluate_late_fusion
from fedlite.metrics import evaluate_predictions
from fedlite.model import build_model
from fedlite.presets import get_preset
from fedlite.text import builtin_tokenizer


@pytest.fixture(scope="module")
def unimodal(tmp_path_factory, synth_data):
    root = tmp_path_factory.mktemp("unimodal")
    info = read_dataset(synth_data.root).info
    paths = {}
    for seed, modality in enumerate(("image", "text")):
        torch.manual_seed(seed)
        paths[modality] = save_checkpoint(root / modality, build_model(get_preset("tiny", modality=modality)),
                                          builtin_tokenizer(), list(info.stage_names), list(info.label_names))
    return paths


def test_late_fusion_scores_the_averaged_probabilities(unimodal, synth_data):
    dataset = read_dataset(synth_data.root)
    device = torch.device("cpu")
    image, text = (checkpoint_probabilities(unimodal[m], dataset, device, progress=False) for m in ("image", "text"))
    fused = evaluate_late_fusion([unimodal["image"], unimodal["text"]], synth_data.root, "cpu", progress=False)
    labels = np.array([c.leukemia for c in dataset.cases])
    stages = np.array([-1 if c.stage is None else c.stage for c in dataset.cases])
    expected = evaluate_predictions(labels, stages, (image[0] + text[0]) / 2, (image[1] + text[1]) / 2)
    assert fused["auc"] == pytest.approx(expected["auc"]) and fused["accuracy"] == pytest.approx(expected["accuracy"])
    assert fused["late_fusion"] == [str(unimodal["image"]), str(unimodal["text"])]
    alone = evaluate_checkpoint(unimodal["image"], synth_data.root, "cpu", progress=False)
    assert alone["auc"] == pytest.approx(evaluate_predictions(labels, stages, *image)["auc"])
    assert alone["checkpoint"] == str(unimodal["image"])


def test_the_cli_fuses_the_checkpoints_it_is_given(unimodal, synth_data):
    result = CliRunner().invoke(main, ["evaluate", str(unimodal["image"]), str(unimodal["text"]),
                                       "--data", str(synth_data.root), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["late_fusion"]) == 2


def test_data_with_other_stages_is_refused(unimodal, synth_data, tmp_path):
    other = tmp_path / "other"
    save_checkpoint(other, build_model(get_preset("tiny", modality="text")), builtin_tokenizer(),
                    ["A", "B", "C", "D"], ["no", "yes"])
    with pytest.raises(InputError, match="differ from the checkpoint's"):
        evaluate_late_fusion([unimodal["text"], other], synth_data.root, "cpu", progress=False)
