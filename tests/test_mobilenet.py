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
