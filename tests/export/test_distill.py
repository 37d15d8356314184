"""Distillation: its loss vanishes only at the teacher, and it brings a pruned student back to the
teacher's predictions."""

import pytest
import torch

from fedlite.data.manifest import read_dataset
from fedlite.export.distill import DistillConfig, distillation_loss
from fedlite.export.prune import PruneConfig
from fedlite.model import FedMMXOutput


def test_distillation_loss_vanishes_only_when_the_student_matches_the_teacher():
    torch.manual_seed(0)
    batch = {"leukemia": torch.tensor([0, 1, 1]), "stage": torch.tensor([-1, 0, 3])}
    teacher = FedMMXOutput(torch.randn(3, 2), torch.randn(3, 4), torch.randn(3, 8))
    cfg = DistillConfig(alpha=0.0, feature_weight=1.0)
    same = distillation_loss(teacher, teacher, batch, cfg, projection=torch.nn.Identity())
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    other = FedMMXOutput(torch.randn(3, 2), torch.randn(3, 4), torch.randn(3, 8))
    assert distillation_loss(other, teacher, batch, cfg, projection=torch.nn.Identity()).item() > 0.01


def test_pruned_student_stays_close_to_the_teacher_after_recovery(teacher_run):
    import copy
    from itertools import islice

    from fedlite.checkpoint import load_checkpoint
    from fedlite.data.loader import CaseDataset, make_loader
    from fedlite.export.distill import distill
    from fedlite.export.parity import agreement
    from fedlite.export.prune import prune_model, score_importance
    from fedlite.training import forward_batch, predict

    torch.manual_seed(0)
    checkpoint, split = teacher_run
    ckpt = load_checkpoint(checkpoint)
    teacher = ckpt.model.eval()
    loaders = {name: make_loader(CaseDataset(read_dataset(split / name), ckpt.tokenizer, ckpt.max_length,
                                             train=name == "train"), 16, shuffle=name == "train")
               for name in ("train", "test")}
    cpu = torch.device("cpu")
    reference = predict(teacher, loaders["test"], cpu)
    student = copy.deepcopy(teacher)
    cfg = DistillConfig(epochs=2, lr=1e-3)
    importance = score_importance(
        student, islice(iter(loaders["train"]), 3),
        lambda b: distillation_loss(forward_batch(student, b), forward_batch(teacher, b), b, cfg))
    report = prune_model(student, importance, PruneConfig(fraction=0.5))
    assert report.parameters_after < 0.9 * report.parameters_before
    pruned = agreement(reference, predict(student, loaders["test"], cpu))
    distill(student, teacher, loaders["train"], cfg, cpu, progress=False)
    recovered = agreement(reference, predict(student, loaders["test"], cpu))
    assert recovered["leukemia_agreement"] >= 0.85
    assert recovered["leukemia_agreement"] >= pruned["leukemia_agreement"] - 0.05
