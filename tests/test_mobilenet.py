"""MobileNetV2 as Fed-MMX's image encoder: pooled features as z, torchvision checkpoints load with
their classifier dropped, batch-norm statistics never move, and export keeps it whole."""

import torch

from fedlite.export.prune import encoder_layers
from fedlite.export.student import default_student, make_student
from fedlite.model import FedMMX, build_model
from fedlite.presets import get_preset


def _mobile(**overrides):
    torch.manual_seed(0)
    return build_model(get_preset("mobile", **overrides))


def test_mobilenet_pools_1280_features_and_loads_a_torchvision_checkpoint(tmp_path):
    from torchvision.models import mobilenet_v2

    model = _mobile(modality="image")
    assert model.encode_image(torch.zeros(2, 3, 224, 224)).shape == (2, 1280)
    torch.manual_seed(1)
    published = mobilenet_v2(weights=None)  # as torchvision saves it: classifier included
    torch.save(published.state_dict(), tmp_path / "mobilenet_v2.pth")
    loaded = build_model(get_preset("mobile", modality="image"), image_weights=tmp_path / "mobilenet_v2.pth")
    own = loaded.image_encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in published.state_dict().items() if not k.startswith("classifier."))
    assert loaded.config.init["image"] == "pretrained:mobilenet_v2.pth"


def test_training_never_moves_the_batch_norm_statistics():
    model = _mobile(modality="image").train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    out = model(pixels=torch.randn(4, 3, 224, 224))
    out.leukemia_logits.sum().backward()
    assert model.training and not any(m.training for m in model.image_encoder.modules()
                                      if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_export_keeps_a_mobilenet_whole_and_distills_into_half_of_its_note_encoder():
    teacher = _mobile()
    assert default_student(teacher.config) == "half"
    assert "image" not in encoder_layers(teacher) and "text" in encoder_layers(teacher)
    student, init = make_student(teacher, "half")
    assert isinstance(student, FedMMX) and student.config.image == teacher.config.image
    assert student.config.text.num_layers == 2
    own = student.image_encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in teacher.image_encoder.state_dict().items())


def test_a_mobilenet_trains_under_dp_with_its_batch_norms_fixed(tmp_path):
    from fedlite.data.loader import CaseDataset, make_loader
    from fedlite.data.synth import synthesize
    from fedlite.federated.privacy import PrivacyConfig, dp_train_local, epsilon
    from fedlite.training import TrainConfig

    data = synthesize(tmp_path / "d", n_cases=16, workers=1, progress=False)
    model = _mobile(modality="image")
    loader = make_loader(CaseDataset(data, None, 16, use_image=True, train=True), 8, shuffle=True, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    _, state = dp_train_local(model, loader, TrainConfig(epochs=1, batch_size=8, lr=1e-2), torch.device("cpu"),
                              1e-2, 1e-2, PrivacyConfig())
    after = model.state_dict()
    in_norms = [k for k in after if k.rsplit(".", 1)[0] in norms]
    assert in_norms and all(torch.equal(after[k], before[k]) for k in in_norms)  # scales, shifts, statistics
    assert not torch.equal(after["image_encoder.features.0.0.weight"], before["image_encoder.features.0.0.weight"])
    assert all(p.requires_grad for p in model.parameters())  # released for the next, non-DP, use
    assert 0 < epsilon(state, 1e-5) < float("inf")


def test_a_vit_teacher_distills_into_a_mobile_student_that_starts_from_its_own_weights(tmp_path):
    import pytest
    from torchvision.models import mobilenet_v2

    from fedlite.errors import InputError

    torch.manual_seed(2)
    published = mobilenet_v2(weights=None)
    torch.save(published.state_dict(), tmp_path / "mobilenet_v2.pth")
    teacher = build_model(get_preset("tiny"))
    student, init = make_student(teacher, "mobile", tmp_path / "mobilenet_v2.pth")
    assert not student.config.image.is_vit and student.config.text.vocab_size == teacher.config.text.vocab_size
    own = student.image_encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in published.state_dict().items() if not k.startswith("classifier."))
    assert init.to_dict()["image_weights"] == "pretrained:mobilenet_v2.pth"
    assert init.copied + init.random + len(own) == len(student.state_dict())
    with pytest.raises(InputError, match="differs from the teacher"):
        make_student(teacher, "half", tmp_path / "mobilenet_v2.pth")
