"""Structured pruning: whole attention heads, FFN channels and (if asked) whole layers are cut out of
the weight matrices, so the exported graphs do less arithmetic. Masks would not speed up a CPU.

Importance is first-order (Michel et al. 2019): the gradient of the loss with respect to a gate on a
head's output. For a head feeding an output projection W, that gate gradient equals Σ W ⊙ ∂L/∂W over
the head's columns of W, so it is read off the weight gradients without adding gates to the model;
the same holds for an FFN channel and its column of the second FFN matrix. Absolute values are summed
over batches; heads and channels are ranked within their layer, layers by their summed scores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from fedlite.model import FedMMX


@dataclass(frozen=True)
class PruneConfig:
    fraction: float = 0.3  # of each layer's heads and FFN channels
    layers: int = 0  # whole layers removed from each encoder
    batches: int = 8  # batches used to score importance


@dataclass
class LayerView:
    """One transformer layer seen uniformly: its heads' output projection and its FFN pair."""

    module: nn.Module
    num_heads: int
    head_dim: int
    out_proj: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear


def _vit_layers(encoder: nn.Module) -> list[LayerView]:
    return [LayerView(b, b.attn.num_heads, b.attn.head_dim, b.attn.proj, b.mlp.fc1, b.mlp.fc2)
            for b in encoder.blocks]


def _bert_layers(encoder: nn.Module) -> list[LayerView]:
    views = []
    for layer in encoder.encoder.layer:
        attn = layer.attention.self
        views.append(LayerView(layer, attn.num_attention_heads, attn.attention_head_size,
                               layer.attention.output.dense, layer.intermediate.dense, layer.output.dense))
    return views


def encoder_layers(model: FedMMX) -> dict[str, list[LayerView]]:
    out = {}
    if model.image_encoder is not None and model.config.image.is_vit:  # a MobileNetV2 has no heads to cut
        out["image"] = _vit_layers(model.image_encoder)
    if model.text_encoder is not None:
        out["text"] = _bert_layers(model.text_encoder)
    return out


@dataclass
class Importance:
    heads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    channels: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _gate_gradients(view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
    w, g = view.out_proj.weight, view.out_proj.weight.grad
    per_column = (w * g).sum(0)  # one value per input column of the output projection
    heads = per_column.view(view.num_heads, view.head_dim).sum(-1)
    w2, g2 = view.ffn_out.weight, view.ffn_out.weight.grad
    return heads, (w2 * g2).sum(0)


def score_importance(model: FedMMX, batches: Iterable[dict], loss_of: Callable[[dict], torch.Tensor]) -> Importance:
    """Accumulate |∂L/∂gate| per head and per FFN channel over ``batches``."""
    layers = encoder_layers(model)
    imp = Importance(
        heads={k: [torch.zeros(v.num_heads) for v in views] for k, views in layers.items()},
        channels={k: [torch.zeros(v.ffn_out.in_features) for v in views] for k, views in layers.items()},
    )
    model.train()
    for batch in batches:
        model.zero_grad(set_to_none=False)
        loss_of(batch).backward()
        with torch.no_grad():
            for name, views in layers.items():
                for i, view in enumerate(views):
                    heads, channels = _gate_gradients(view)
                    imp.heads[name][i] += heads.abs().float().cpu()
                    imp.channels[name][i] += channels.abs().float().cpu()
    model.zero_grad(set_to_none=True)
    return imp


def _keep_top(scores: torch.Tensor, fraction: float) -> list[int]:
    n = len(scores)
    keep = max(1, n - int(math.floor(n * fraction + 1e-9)))
    return sorted(torch.argsort(scores, descending=True)[:keep].tolist())


def _prune_vit_heads(block: nn.Module, keep: list[int]) -> None:
    attn = block.attn
    hd, dim = attn.head_dim, attn.attn_dim
    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
    rows = torch.cat([cols + s * dim for s in range(3)])
    attn.qkv = prune_linear_layer(attn.qkv, rows, dim=0)
    attn.proj = prune_linear_layer(attn.proj, cols, dim=1)
    attn.num_heads = len(keep)
    attn.attn_dim = len(keep) * hd


def _prune_heads(name: str, view: LayerView, keep: list[int]) -> None:
    if len(keep) == view.num_heads:
        return
    if name == "image":
        _prune_vit_heads(view.module, keep)
    else:
        view.module.attention.prune_heads([h for h in range(view.num_heads) if h not in keep])


def _prune_channels(name: str, view: LayerView, keep: list[int]) -> None:
    if len(keep) == view.ffn_out.in_features:
        return
    index = torch.tensor(keep)
    fc1 = prune_linear_layer(view.ffn_in, index, dim=0)
    fc2 = prune_linear_layer(view.ffn_out, index, dim=1)
    if name == "image":
        view.module.mlp.fc1, view.module.mlp.fc2 = fc1, fc2
    else:
        view.module.intermediate.dense, view.module.output.dense = fc1, fc2


def _drop_layers(model: FedMMX, name: str, keep: list[int]) -> None:
    if name == "image":
        blocks = model.image_encoder.blocks
        model.image_encoder.blocks = nn.Sequential(*[blocks[i] for i in keep])
    else:
        layers = model.text_encoder.encoder.layer
        model.text_encoder.encoder.layer = nn.ModuleList([layers[i] for i in keep])
        model.text_encoder.config.num_hidden_layers = len(keep)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_architecture(model: FedMMX) -> dict:
    """Heads and FFN channels per layer, as they are now (pruned layers are no longer uniform)."""
    return {name: [{"heads": v.num_heads, "ffn": v.ffn_out.in_features} for v in views]
            for name, views in encoder_layers(model).items()}


@dataclass
class PruneReport:
    fraction: float
    layers_removed: dict[str, list[int]]
    parameters_before: int
    parameters_after: int
    before: dict
    after: dict

    def to_dict(self) -> dict:
        return asdict(self)


def prune_model(model: FedMMX, importance: Importance, config: PruneConfig) -> PruneReport:
    """Remove the least important heads and channels of every layer, then whole layers if asked."""
    before, params_before = describe_architecture(model), count_parameters(model)
    removed: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, views in encoder_layers(model).items():
            for i, view in enumerate(views):
                _prune_heads(name, view, _keep_top(importance.heads[name][i], config.fraction))
                _prune_channels(name, view, _keep_top(importance.channels[name][i], config.fraction))
            if config.layers > 0 and len(views) > 1:
                score = torch.tensor([float(importance.heads[name][i].sum() + importance.channels[name][i].sum())
                                      for i in range(len(views))])
                keep = _keep_top(score, min(config.layers, len(views) - 1) / len(views))
                removed[name] = [i for i in range(len(views)) if i not in keep]
                _drop_layers(model, name, keep)
    return PruneReport(config.fraction, removed, params_before, count_parameters(model),
                       before, describe_architecture(model))


def trim_vocabulary(model: FedMMX, tokenizer_size: int) -> dict:
    """Drop word-embedding rows no token id of the tokenizer can reach (ids ≥ its vocabulary size).

    Lossless: every note still maps to the same vectors. It matters when the encoder's table is
    larger than the tokenizer's vocabulary (fedlite's built-in 1490-token vocabulary in a
    28996-row table), where the unused rows would dominate the bundle's size.
    """
    embeddings = model.text_encoder.embeddings.word_embeddings
    rows = embeddings.num_embeddings
    if tokenizer_size >= rows:
        return {"rows_before": rows, "rows_after": rows}
    trimmed = nn.Embedding(tokenizer_size, embeddings.embedding_dim, padding_idx=embeddings.padding_idx
                           if embeddings.padding_idx is not None and embeddings.padding_idx < tokenizer_size else None)
    with torch.no_grad():
        trimmed.weight.copy_(embeddings.weight[:tokenizer_size])
    model.text_encoder.embeddings.word_embeddings = trimmed
    model.text_encoder.config.vocab_size = tokenizer_size
    return {"rows_before": rows, "rows_after": tokenizer_size}


def apply_architecture(model: FedMMX, architecture: dict) -> None:
    """Cut ``model`` to the shapes ``architecture`` (``describe_architecture`` of a pruned model)
    gives, keeping its first layers, heads and channels: a site rebuilds the coordinator's pruned
    student this way and then loads the student's weights into it."""
    with torch.no_grad():
        for name, views in encoder_layers(model).items():
            depth = len(architecture.get(name, []))
            if not 1 <= depth <= len(views):
                raise ValueError(f"{name} encoder: {depth} layers asked, the model has {len(views)}")
            if depth < len(views):
                _drop_layers(model, name, list(range(depth)))
        for name, views in encoder_layers(model).items():
            for view, shape in zip(views, architecture[name]):
                if not (1 <= shape["heads"] <= view.num_heads and 1 <= shape["ffn"] <= view.ffn_out.in_features):
                    raise ValueError(f"{name} encoder: {shape} does not fit a layer of {view.num_heads} heads "
                                     f"and {view.ffn_out.in_features} channels")
                _prune_heads(name, view, list(range(shape["heads"])))
                _prune_channels(name, view, list(range(shape["ffn"])))
