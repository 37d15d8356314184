import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from fedlite.centralized import train_centralized
from fedlite.cli import main
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.evaluate import evaluate_checkpoint
from fedlite.model import FedMMX, build_model
from fedlite.presets import get_preset
from fedlite.run_record import run_record
from fedlite.text import builtin_tokenizer
from fedlite.training import TrainConfig, make_optimizer, parameter_groups, set_linear_lr, train_local

CPU = torch.device("cpu")


def _loader(dataset, modality="both", batch_size=8, train=True):
    config = get_preset("tiny", modality=modality)
    cases = CaseDataset(dataset, builtin_tokenizer() if config.uses_text else None, config.text.max_length,
                        use_image=config.uses_image, train=train)
    return make_loader(cases, batch_size, shuffle=train)


def test_batches_pad_notes_dynamically_and_carry_labels(synth_data):
    batch = next(iter(_loader(synth_data, train=False)))
    assert batch["pixels"].shape == (8, 3, 224, 224)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[1] == int(mask.sum(1).max())  # padded to the longest
    assert ((batch["stage"] >= 0) == (batch["leukemia"] == 1)).all()


def test_local_training_fits_a_small_set(synth_data):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", modality="text"))
    loader = _loader(synth_data, modality="text", batch_size=16)
    config = TrainConfig(epochs=1, lr=3e-3, optimizer="adamw")
    first = train_local(model, loader, config, CPU, 3e-3, 3e-3, progress=False)
    for _ in range(15):
        last = train_local(model, loader, config, CPU, 3e-3, 3e-3, progress=False)
    assert last.mean_loss < first.mean_loss - 0.2
    assert first.samples == len(synth_data) and first.steps == len(loader)


def test_epoch_by_epoch_calls_carry_the_optimizer_and_draw_new_augmentations(synth_data, monkeypatch):
    seen = []
    monkeypatch.setattr(CaseDataset, "set_epoch", lambda self, epoch: seen.append(epoch))
    model = build_model(get_preset("tiny"))
    loader = _loader(synth_data, batch_size=16)
    config = TrainConfig(epochs=1, optimizer="adamw")
    optimizer = make_optimizer(list(model.parameters()), config, 1e-3)
    for epoch in range(2):
        train_local(model, loader, config, CPU, 1e-3, 1e-3, progress=False, optimizer=optimizer,
                    first_epoch=epoch)
    assert seen == [0, 1]
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {2 * len(loader)}


def test_lr_warms_up_then_decays_and_pretrained_encoders_get_their_share():
    config = replace(get_preset("tiny"), init={"image": "random", "text": "pretrained:minilm"})
    model = FedMMX(config)
    groups = parameter_groups(model, TrainConfig(pretrained_lr_scale=0.1))
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert {id(p) for p in groups[1]["params"]} == text_ids
    assert not text_ids & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = make_optimizer(groups, TrainConfig(optimizer="adamw"), 1.0)
    lrs = []
    for step in range(10):
        set_linear_lr(optimizer, 1.0, 0.0, step, 10, warmup_steps=4)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    assert [round(a, 6) for a, _ in lrs[:5]] == [0.25, 0.45, 0.6, 0.7, 0.6]
    assert all(abs(b - 0.1 * a) < 1e-12 for a, b in lrs)


def test_clipping_bounds_each_step(synth_data):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", modality="text"))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    config = TrainConfig(epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad_norm=1e-3)
    train_local(model, _loader(synth_data, "text", batch_size=len(synth_data)), config, CPU, 1.0, 1.0,
                progress=False)
    moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm()
    assert 0 < moved <= 1e-3 * 1.0001


def test_frozen_encoders_do_not_change(synth_data):
    model = build_model(get_preset("tiny"))
    model.set_encoders_frozen(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, _loader(synth_data), TrainConfig(epochs=1), CPU, 1e-2, 1e-2, progress=False)
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fusion", "leukemia_head", "stage_head"}


def test_proximal_term_keeps_weights_near_the_global_model(synth_data):
    def drift(mu):
        torch.manual_seed(0)
        model = build_model(get_preset("tiny", modality="text"))
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
        config = TrainConfig(epochs=1, lr=0.05, proximal_mu=mu)
        train_local(model, _loader(synth_data, "text"), config, CPU, 0.05, 0.05, global_params=anchor,
                    progress=False)
        return sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters()).sqrt().item()

    assert drift(50.0) < 0.5 * drift(0.0)


def test_centralized_run_writes_checkpoints_history_and_curves(tmp_path, synth_split, monkeypatch):
    epochs_seen, optimizers = [], []
    monkeypatch.setattr(CaseDataset, "set_epoch", lambda self, epoch: epochs_seen.append(epoch))
    monkeypatch.setattr("fedlite.centralized.make_optimizer",
                        lambda *args: optimizers.append(make_optimizer(*args)) or optimizers[-1])
    result = train_centralized(synth_split.out_dir, tmp_path / "run", preset="tiny",
                               train_config=TrainConfig(epochs=2, batch_size=16), progress=False)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    history = [json.loads(l) for l in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert epochs_seen == [0, 1] and len(optimizers) == 1  # fresh augmentations, one optimizer throughout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["stage_macro_f1"] == max(h["eval"]["stage_macro_f1"] for h in history)
    again = evaluate_checkpoint(result.best_checkpoint, synth_split.out_dir / "test", progress=False)
    assert again["accuracy"] == pytest.approx(result.best_metrics["accuracy"])
    assert again["stage_confusion"] == result.best_metrics["stage_confusion"]


def test_cli_pipeline_synth_split_check_train_evaluate(tmp_path):
    run = CliRunner().invoke
    data = tmp_path / "data"
    assert run(main, ["data", "synth", str(data), "--cases", "40", "--workers", "1"]).exit_code == 0
    again = run(main, ["data", "synth", str(data), "--cases", "40"])
    assert again.exit_code == 2 and "already exists" in again.output
    split = run(main, ["data", "split", str(data), "--clients", "2"])
    assert split.exit_code == 0 and "site-02" in split.output
    check = run(main, ["data", "check", str(data / "split" / "site-01")])
    assert check.exit_code == 0 and "no problems found" in check.output
    train = run(main, ["train", "--centralized", "--data", str(data / "split"), "--preset", "tiny",
                       "--modality", "text", "--epochs", "1", "--clip-grad-norm", "0.5",
                       "--out", str(tmp_path / "run")])
    assert train.exit_code == 0, train.output
    assert "stage macro-F1" in train.output
    recipe = run_record(json.loads((tmp_path / "run" / "summary.json").read_text()))
    assert (recipe.kind, recipe.step, recipe.data) == ("centralized", 1, str(data / "split" / "train"))
    assert recipe.settings["eval_data"] == str(data / "split" / "test")
    settings = recipe.settings
    assert (settings["warmup_fraction"], settings["clip_grad_norm"], settings["pretrained_lr_scale"]) == (0.05, 0.5, 0.1)
    checkpoint = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["training"]
    assert run_record(checkpoint) == recipe  # the checkpoint and the summary hold one record
    evaluation = run(main, ["evaluate", str(tmp_path / "run" / "best"), "--data", str(data / "split" / "test"),
                            "--json"])
    assert evaluation.exit_code == 0
    metrics = json.loads(evaluation.stdout)
    assert metrics["cases"] == 8 and 0 <= metrics["accuracy"] <= 1
    assert run(main, ["train", "--data", str(data)]).exit_code == 2  # a federated run needs a split
