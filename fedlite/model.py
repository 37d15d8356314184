"""Fed-MMX: a ViT (or MobileNetV2) image encoder and a BERT note encoder, a fusion layer, two heads.

The image embedding z ([CLS], or MobileNetV2's pooled features) and the note [CLS] embedding h are
fused into r; r feeds a leukemia head (2-way) and a stage head (K-way). The encoders, ``fuse`` and
``classify`` are separate methods because export ships them as separate graphs and the hospital
agent fine-tunes only the head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedlite.errors import InputError
from fedlite.presets import ImageEncoderConfig, ModelConfig, TextEncoderConfig

log = logging.getLogger(__name__)


def build_image_encoder(cfg: ImageEncoderConfig) -> nn.Module:
    if cfg.architecture == "mobilenet_v2":
        from torchvision.models import mobilenet_v2

        encoder = mobilenet_v2(weights=None)
        encoder.classifier = nn.Identity()  # forward: features, global average pool, flatten -> (B, 1280)
        return encoder
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=0, global_pool="token",
    )


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    from transformers import BertConfig, BertModel

    bert_cfg = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
    )
    bert_cfg._attn_implementation = "sdpa"
    return BertModel(bert_cfg, add_pooling_layer=False)


class ConcatFusion(nn.Module):
    """r = ReLU(LayerNorm(W_r [z ‖ h] + b_r)), Xavier-uniform W_r (the paper's fusion layer)."""

    def __init__(self, in_dims: list[int], out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(sum(in_dims), out_dim)
        self.norm = nn.LayerNorm(out_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return F.relu(self.norm(self.proj(torch.cat(parts, dim=-1))))


class GatedFusion(nn.Module):
    """α = σ(W_α [z ‖ h] + b_α), r = α ⊙ z + (1 − α) ⊙ h; z and h are projected to a common width
    first when their sizes differ."""

    def __init__(self, image_dim: int, text_dim: int, out_dim: int) -> None:
        super().__init__()
        same = image_dim == text_dim
        self.out_dim = image_dim if same else out_dim
        self.image_proj = nn.Identity() if same else nn.Linear(image_dim, out_dim)
        self.text_proj = nn.Identity() if same else nn.Linear(text_dim, out_dim)
        self.gate = nn.Linear(image_dim + text_dim, self.out_dim)
        nn.init.xavier_uniform_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        z, h = parts
        alpha = torch.sigmoid(self.gate(torch.cat([z, h], dim=-1)))
        return alpha * self.image_proj(z) + (1 - alpha) * self.text_proj(h)


class NoFusion(nn.Module):
    """r = [z ‖ h]: the embeddings straight into the heads, the ablation without a fusion layer."""

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=-1)


def make_fusion(kind: str, image_dim: int | None, text_dim: int | None, fusion_dim: int) -> tuple[nn.Module, int]:
    """The fusion layer for the embeddings present (None: that modality is absent), and its width."""
    present = [d for d in (image_dim, text_dim) if d is not None]
    if kind == "none":
        return NoFusion(), sum(present)
    if kind == "gated":
        fusion = GatedFusion(image_dim, text_dim, fusion_dim)
        return fusion, fusion.out_dim
    return ConcatFusion(present, fusion_dim), fusion_dim


@dataclass
class FedMMXOutput:
    leukemia_logits: torch.Tensor
    stage_logits: torch.Tensor
    fused: torch.Tensor | None = None  # r, before dropout: what distillation can match


class FedMMX(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_image_encoder(config.image) if config.uses_image else None
        self.text_encoder = build_text_encoder(config.text) if config.uses_text else None
        self.fusion, fused_dim = make_fusion(
            config.fusion, config.image.embed_dim if config.uses_image else None,
            config.text.hidden_size if config.uses_text else None, config.fusion_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.leukemia_head = nn.Linear(fused_dim, 2)
        self.stage_head = nn.Linear(fused_dim, config.num_stages)

    def train(self, mode: bool = True) -> "FedMMX":
        """A MobileNetV2's batch norms keep their statistics (ImageNet's, when pretrained): only
        parameters travel in a federated round, so statistics a site updated would leave its copy
        different from everyone else's, and a site's small batches would make poor estimates."""
        super().train(mode)
        if self.image_encoder is not None and not self.config.image.is_vit:
            for module in self.image_encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixels)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Explicit per-example position ids: BertEmbeddings' shared buffer has batch 1, which breaks
        # Opacus' per-sample gradients.
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq, device=input_ids.device).expand(batch, -1)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, token_type_ids=torch.zeros_like(input_ids))
        return out.last_hidden_state[:, 0]

    def classify(self, z: torch.Tensor | None, h: torch.Tensor | None) -> FedMMXOutput:
        """Fusion and heads on precomputed embeddings (what the exported head graph computes)."""
        r = self.fusion([e for e in (z, h) if e is not None])
        dropped = self.dropout(r)
        return FedMMXOutput(self.leukemia_head(dropped), self.stage_head(dropped), r)

    def forward(self, pixels: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> FedMMXOutput:
        z = self.encode_image(pixels) if self.config.uses_image else None
        h = self.encode_text(input_ids, attention_mask) if self.config.uses_text else None
        return self.classify(z, h)

    def encoders(self) -> list[nn.Module]:
        return [m for m in (self.image_encoder, self.text_encoder) if m is not None]

    def set_encoders_frozen(self, frozen: bool) -> None:
        """Freeze the encoders so only fusion and heads train (the first federated rounds)."""
        for encoder in self.encoders():
            encoder.requires_grad_(not frozen)


class FusionHead(nn.Module):
    """Fed-MMX's fusion layer and heads alone, on precomputed embeddings: what a hospital agent
    fine-tunes. Its parameter names match FedMMX's, so weights move between the two as they are."""

    def __init__(self, fusion: str, image_dim: int, text_dim: int, fusion_dim: int, num_stages: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.fusion, fused_dim = make_fusion(fusion, image_dim, text_dim, fusion_dim)
        self.dropout = nn.Dropout(dropout)
        self.leukemia_head = nn.Linear(fused_dim, 2)
        self.stage_head = nn.Linear(fused_dim, num_stages)

    classify = FedMMX.classify


def multitask_loss(out: FedMMXOutput, leukemia: torch.Tensor, stage: torch.Tensor,
                   gamma: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(leukemia) + γ·CE(stage), the stage term averaged over positives only.

    ``stage`` is -1 for negatives. Masking (not indexing) keeps the shapes static, avoids a host sync
    on GPUs, and still gives the stage head a (zero) gradient on batches without positives.
    """
    ce_leukemia = F.cross_entropy(out.leukemia_logits.float(), leukemia)
    positive = (stage >= 0).to(out.stage_logits.dtype)
    per_case = F.cross_entropy(out.stage_logits.float(), stage.clamp(min=0), reduction="none")
    ce_stage = (per_case * positive).sum() / positive.sum().clamp(min=1.0)
    return ce_leukemia + gamma * ce_stage, {"leukemia": ce_leukemia.detach(), "stage": ce_stage.detach()}


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError("weights file not found", path=path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read weights: {exc}", path=path) from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_image_weights(encoder: nn.Module, path: Path) -> None:
    """Load a timm ViT or torchvision MobileNetV2 checkpoint (the classifier is dropped; everything
    else must match)."""
    state = {k: v for k, v in _load_state_file(path).items() if not k.startswith(("head.", "classifier."))}
    own = encoder.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise InputError(f"weights do not fit the image encoder: {'; '.join(wrong[:3])}", path=path,
                         hint="pick the preset that matches the checkpoint's architecture")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing:
        raise InputError(f"weights lack {len(missing)} tensors of the image encoder, e.g. {missing[0]}",
                         path=path)
    if unexpected:
        log.warning("ignored %d tensors in %s not used by the image encoder", len(unexpected), path)


def text_config_from_pretrained(model_dir: Path, max_length: int) -> TextEncoderConfig:
    from transformers import BertConfig

    try:
        cfg = BertConfig.from_pretrained(str(model_dir))
    except Exception as exc:
        raise InputError(f"not a BERT model directory: {exc}", path=model_dir) from None
    return TextEncoderConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_length=min(max_length, cfg.max_position_embeddings),
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
    )


def load_text_weights(encoder: nn.Module, model_dir: Path) -> None:
    from transformers import BertModel

    pretrained = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False)
    missing, _ = encoder.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        raise InputError(f"pretrained BERT lacks {len(missing)} tensors, e.g. {missing[0]}", path=model_dir)


def build_model(config: ModelConfig, image_weights: str | Path | None = None,
                text_weights: str | Path | None = None) -> FedMMX:
    """Build Fed-MMX from a config, loading encoder weights from local paths when given.

    Where the weights came from is recorded in ``config.init`` (and so in the checkpoint), so a
    randomly initialised model is never mistaken for a pretrained one.
    """
    init = {"image": "random", "text": "random"}
    if text_weights is not None:
        text_weights = Path(text_weights)
        config = replace(config, text=text_config_from_pretrained(text_weights, config.text.max_length))
        init["text"] = f"pretrained:{text_weights.name}"
    if image_weights is not None:
        init["image"] = f"pretrained:{Path(image_weights).name}"
    config = replace(config, init={**init, **config.init} if config.init else init)
    model = FedMMX(config)
    if image_weights is not None and model.image_encoder is not None:
        load_image_weights(model.image_encoder, Path(image_weights))
    if text_weights is not None and model.text_encoder is not None:
        load_text_weights(model.text_encoder, text_weights)
    for part, source in init.items():
        if source == "random":
            log.info("%s encoder: random initialisation (no --%s-weights given)", part, part)
    return model
