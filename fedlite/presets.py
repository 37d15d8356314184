"""Model presets by name, in one place: the paper's teacher, the deployable student, a test size.

A preset is plain data; ``fedlite.model.build_model`` turns a ``ModelConfig`` into modules, and the
config is stored in every checkpoint so a model can be rebuilt without knowing which preset made it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from fedlite.errors import InputError

FUSIONS = ("concat", "gated", "none")  # none: [z ‖ h] straight into the heads (the paper's ablation)
MODALITIES = ("both", "image", "text")
IMAGE_ARCHITECTURES = ("vit", "mobilenet_v2")


@dataclass(frozen=True)
class ImageEncoderConfig:
    """A timm VisionTransformer (``timm_name`` says which published one it matches), or
    torchvision's MobileNetV2, whose pooled 1280 features are z: the CPU model of the seed
    literature, with ImageNet weights that install offline. For MobileNetV2 ``patch_size`` is the
    explanation grid's cell, the 32-pixel stride of its last feature map."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224
    timm_name: str | None = None
    architecture: str = "vit"

    def __post_init__(self) -> None:
        if self.architecture not in IMAGE_ARCHITECTURES:
            raise InputError(f"unknown image architecture {self.architecture!r}",
                             hint=f"choose one of {', '.join(IMAGE_ARCHITECTURES)}")

    @property
    def is_vit(self) -> bool:
        return self.architecture == "vit"


@dataclass(frozen=True)
class TextEncoderConfig:
    """A BERT encoder (transformers' BertModel); ``max_length`` is the tokenization window."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_length: int = 512
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild Fed-MMX: encoders, fusion, heads, which modalities it reads."""

    preset: str
    image: ImageEncoderConfig
    text: TextEncoderConfig
    fusion: str = "concat"
    fusion_dim: int = 768
    num_stages: int = 4
    modality: str = "both"
    dropout: float = 0.1
    init: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise InputError(f"unknown fusion {self.fusion!r}", hint=f"choose one of {', '.join(FUSIONS)}")
        if self.modality not in MODALITIES:
            raise InputError(f"unknown modality {self.modality!r}", hint=f"choose one of {', '.join(MODALITIES)}")
        if self.fusion == "gated" and self.modality != "both":
            raise InputError("gated fusion mixes two modalities", hint="use --fusion concat for unimodal models")
        if self.num_stages < 2:
            raise InputError(f"need at least 2 stages, got {self.num_stages}")

    @property
    def uses_image(self) -> bool:
        return self.modality in ("both", "image")

    @property
    def uses_text(self) -> bool:
        return self.modality in ("both", "text")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        raw = dict(raw)
        raw["image"] = ImageEncoderConfig(**raw["image"])
        raw["text"] = TextEncoderConfig(**raw["text"])
        return cls(**raw)


PRESETS: dict[str, ModelConfig] = {
    # ViT-B/16 + BERT-base with the ClinicalBERT cased vocabulary size (28996), 512 tokens.
    "paper": ModelConfig(
        preset="paper",
        image=ImageEncoderConfig(768, 12, 12, timm_name="vit_base_patch16_224"),
        text=TextEncoderConfig(28996, 768, 12, 12, 3072, max_length=512),
        fusion_dim=768,
    ),
    # The student: ViT-S/16 + a 4-layer, 384-wide BERT sharing the teacher's vocabulary size.
    "small": ModelConfig(
        preset="small",
        image=ImageEncoderConfig(384, 12, 6, timm_name="vit_small_patch16_224"),
        text=TextEncoderConfig(28996, 384, 4, 6, 1536, max_length=512),
        fusion_dim=384,
    ),
    # MobileNetV2 (ImageNet weights: --image-weights, see README) + the small note encoder: a CPU model.
    "mobile": ModelConfig(
        preset="mobile",
        image=ImageEncoderConfig(1280, 0, 0, patch_size=32, architecture="mobilenet_v2"),
        text=TextEncoderConfig(28996, 384, 4, 6, 1536, max_length=512),
        fusion_dim=384,
    ),
    # For tests and the quickstart: a fraction of a second per training step on 2 cores.
    "tiny": ModelConfig(
        preset="tiny",
        image=ImageEncoderConfig(64, 2, 2),
        text=TextEncoderConfig(8192, 64, 2, 2, 128, max_length=128, max_position_embeddings=128),
        fusion_dim=64,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset with top-level fields (fusion, modality, num_stages, ...) replaced."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}", hint=f"choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **overrides)
