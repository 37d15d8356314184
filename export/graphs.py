"""Fed-MMX as three ONNX graphs: image encoder, text encoder, head.

Split so the agent can cache one modality's embedding while it explains the other, and fine-tune
the head on cached embeddings. Batch (and sequence) axes are dynamic. The head graph ends in
softmax: it returns probabilities, which is what predictions and explanations consume.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlite.model import FedMMX

log = logging.getLogger(__name__)
OPSET = 17
IMAGE_GRAPH = "image_encoder.onnx"
TEXT_GRAPH = "text_encoder.onnx"
HEAD_GRAPH = "head.onnx"


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: FedMMX) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class TextEncoderGraph(nn.Module):
    def __init__(self, model: FedMMX) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class HeadGraph(nn.Module):
    def __init__(self, model: FedMMX) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor):
        out = self.model.classify(image_embedding, text_embedding)
        return out.leukemia_logits.softmax(-1), out.stage_logits.softmax(-1)


@dataclass
class GraphSpec:
    """Names and shapes the agent needs to feed a graph, recorded in bundle.json."""

    file: str
    inputs: dict[str, list]
    outputs: dict[str, list]

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": self.inputs, "outputs": self.outputs}


def _export(module: nn.Module, args: tuple, out_dir: Path, spec: GraphSpec) -> None:
    dynamic = {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
               for name, shape in {**spec.inputs, **spec.outputs}.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes used as Python values
        torch.onnx.export(module.eval(), args, str(out_dir / spec.file), input_names=list(spec.inputs),
                          output_names=list(spec.outputs), dynamic_axes=dynamic, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)


def export_graphs(model: FedMMX, out_dir: Path) -> dict[str, GraphSpec]:
    """Write the three graphs of a two-modality model into ``out_dir``; returns their specs."""
    model = model.cpu().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.config.modality != "both":
        raise ValueError("export needs a model that reads both the image and the note")
    cfg = model.config
    size = cfg.image.img_size
    z_dim, h_dim = cfg.image.embed_dim, cfg.text.hidden_size
    specs = {
        "image_encoder": GraphSpec(IMAGE_GRAPH, {"pixels": ["batch", 3, size, size]},
                                   {"image_embedding": ["batch", z_dim]}),
        "text_encoder": GraphSpec(TEXT_GRAPH, {"input_ids": ["batch", "sequence"],
                                               "attention_mask": ["batch", "sequence"]},
                                  {"text_embedding": ["batch", h_dim]}),
        "head": GraphSpec(HEAD_GRAPH, {"image_embedding": ["batch", z_dim], "text_embedding": ["batch", h_dim]},
                          {"leukemia_prob": ["batch", 2], "stage_prob": ["batch", cfg.num_stages]}),
    }
    ids = torch.full((2, 16), 5, dtype=torch.long)
    mask = torch.ones((2, 16), dtype=torch.long)
    mask[1, 10:] = 0  # a padded row, so the mask path is traced, not constant-folded
    with torch.no_grad():
        _export(ImageEncoderGraph(model), (torch.zeros(2, 3, size, size),), out_dir, specs["image_encoder"])
        _export(TextEncoderGraph(model), (ids, mask), out_dir, specs["text_encoder"])
        _export(HeadGraph(model), (torch.zeros(2, z_dim), torch.zeros(2, h_dim)), out_dir, specs["head"])
    return specs
