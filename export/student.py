"""The student a teacher is distilled into, and where its first weights come from.

``half`` keeps the teacher's widths and takes every other layer of each encoder (evenly spaced,
first and last kept), so every student tensor starts as a copy of a teacher tensor. A named preset
(``small`` for the ``paper`` teacher) keeps the teacher's vocabulary and window; tensors whose shapes
match the teacher's are copied, the rest start random, and the report says which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedlite.errors import InputError
from fedlite.model import FedMMX, load_image_weights
from fedlite.presets import PRESETS, ModelConfig, get_preset

log = logging.getLogger(__name__)
HALF = "half"


def default_student(teacher: ModelConfig) -> str:
    """``small`` for teachers wider than it (the paper's ViT-B + BERT-base), else ``half``."""
    small = PRESETS["small"]
    wider = ((teacher.image.is_vit and teacher.image.embed_dim > small.image.embed_dim)
             or teacher.text.hidden_size > small.text.hidden_size)
    return "small" if wider else HALF


def kept_layers(depth: int, keep: int) -> list[int]:
    """Evenly spaced teacher layers for a student of ``keep`` layers, first and last included."""
    if keep >= depth:
        return list(range(depth))
    if keep == 1:
        return [depth - 1]
    return sorted({int(round(i)) for i in np.linspace(0, depth - 1, keep)})


def student_config(teacher: ModelConfig, student: str) -> ModelConfig:
    if student == HALF:  # a MobileNetV2 image encoder is kept whole: it has no layer stack to halve
        image = replace(teacher.image, depth=max(1, (teacher.image.depth + 1) // 2)) if teacher.image.is_vit \
            else teacher.image
        text = replace(teacher.text, num_layers=max(1, (teacher.text.num_layers + 1) // 2))
        return replace(teacher, preset=f"{teacher.preset}-half", image=image, text=text, init={})
    if student not in PRESETS:
        raise InputError(f"unknown student {student!r}", hint=f"choose {HALF} or one of {', '.join(PRESETS)}")
    base = get_preset(student)
    # The student reads the teacher's tokens: same vocabulary, window and position table.
    text = replace(base.text, vocab_size=teacher.text.vocab_size, max_length=teacher.text.max_length,
                   max_position_embeddings=teacher.text.max_position_embeddings,
                   type_vocab_size=teacher.text.type_vocab_size)
    return replace(base, text=text, fusion=teacher.fusion, num_stages=teacher.num_stages,
                   modality=teacher.modality, dropout=teacher.dropout, init={})


@dataclass
class StudentInit:
    copied: int
    random: int
    image_layers: list[int]
    text_layers: list[int]
    image_weights: str | None = None  # the student's own image-encoder checkpoint, when it has one

    def to_dict(self) -> dict:
        own = {"image_weights": self.image_weights} if self.image_weights else {}
        return {"copied_tensors": self.copied, "random_tensors": self.random,
                "image_layers_from_teacher": self.image_layers, "text_layers_from_teacher": self.text_layers,
                **own}


def _teacher_key(key: str, image_map: dict[int, int], text_map: dict[int, int]) -> str:
    parts = key.split(".")
    if key.startswith("image_encoder.blocks."):
        parts[2] = str(image_map.get(int(parts[2]), -1))
    elif key.startswith("text_encoder.encoder.layer."):
        parts[3] = str(text_map.get(int(parts[3]), -1))
    return ".".join(parts)


def make_student(teacher: FedMMX, student: str,
                 image_weights: str | Path | None = None) -> tuple[FedMMX, StudentInit]:
    """The student, its tensors copied from the teacher where the shapes match; an image encoder
    unlike the teacher's (a MobileNetV2 student of a ViT teacher, a ViT-S of a ViT-B) starts from
    ``image_weights``."""
    config = student_config(teacher.config, student)
    model = FedMMX(config)
    if image_weights is not None:
        if student == HALF:
            raise InputError("--student-image-weights is for a student whose image encoder differs from the "
                             "teacher's", hint=f"a {HALF} student copies the teacher's image layers; drop it")
        load_image_weights(model.image_encoder, Path(image_weights))
    image_layers = kept_layers(teacher.config.image.depth, config.image.depth)
    text_layers = kept_layers(teacher.config.text.num_layers, config.text.num_layers)
    image_map = dict(enumerate(image_layers))
    text_map = dict(enumerate(text_layers))
    source = teacher.state_dict()
    state = model.state_dict()
    copied = 0
    with torch.no_grad():  # state_dict() tensors share the model's storage: copying into them loads them
        for key, tensor in state.items():
            if image_weights is not None and key.startswith("image_encoder."):
                continue  # the student's own pretrained image encoder
            origin = source.get(_teacher_key(key, image_map, text_map))
            if origin is not None and origin.shape == tensor.shape:
                tensor.copy_(origin)
                copied += 1
    pretrained = sum(k.startswith("image_encoder.") for k in state) if image_weights is not None else 0
    init = StudentInit(copied, len(state) - copied - pretrained, image_layers, text_layers,
                       f"pretrained:{Path(image_weights).name}" if image_weights is not None else None)
    model.config = replace(config, init={"student_of": teacher.config.preset, **init.to_dict()})
    if init.random:
        log.info("student %s: %d tensors copied from the teacher, %d random (shapes differ)",
                 config.preset, init.copied, init.random)
    return model, init
