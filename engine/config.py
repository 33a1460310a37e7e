"""Architecture configs: small, commented dataclasses that travel inside every checkpoint
and beside every exported artifact, and are rebuilt only from there.

``FilipConfig.to_dict()`` / ``FilipConfig.from_dict()`` are the only (de)serialisers;
``from_dict`` rejects unknown keys so a typo in a stored config is an error, not a default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import CheckpointError

ACTIVATIONS = ("quick_gelu", "gelu")
TOKEN_HEADS = ("shared", "dense")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224       # input resolution (square), pixels
    patch_size: int = 32        # conv1 kernel = stride
    width: int = 768            # transformer width
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0      # hidden = width * mlp_ratio

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "width", "layers", "heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        """Patches per side (7 for B/32 at 224 px)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image, CLS excluded (49 for B/32)."""
        return self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408     # CLIP BPE; 49409 for DeCLIP (+ <|mask|>)
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _positive(self, "context_length", "vocab_size", "width", "layers", "heads")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if self.context_length < 2:
            raise ValueError("context_length must hold at least SOT and EOT")


@dataclass(frozen=True)
class FilipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256        # D of the pooled (global) embedding
    # Token-wise head.  "shared": FILIP paper / CLIP: every token goes through the same
    # LayerNorm and bias-free projection as the pooled token, so token_dim == embed_dim.
    # "dense": DeCLIP's FILIP: separate nn.Linear heads *with bias* (image_mapping on the
    # pre-ln_post patch tokens, text_mapping on the post-ln_final tokens) to token_dim.
    token_head: str = "shared"
    token_dim: int = 256        # D of the token embeddings
    # MLP activation.  Nothing in a state dict says which: OpenAI CLIP and DeCLIP use
    # QuickGELU (x * sigmoid(1.702 x)); OpenCLIP's own LAION models use exact GELU.
    activation: str = "quick_gelu"
    text_projection_bias: bool = False  # DeCLIP's text_projection is an nn.Linear with bias
    init_logit_scale: float = 4.605170185988092  # log(100); only used if a checkpoint has none

    def __post_init__(self) -> None:
        _positive(self, "embed_dim", "token_dim")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.token_head not in TOKEN_HEADS:
            raise ValueError(f"token_head must be one of {TOKEN_HEADS}, got {self.token_head!r}")
        if self.token_head == "shared" and self.token_dim != self.embed_dim:
            raise ValueError(f"a shared token head needs token_dim == embed_dim, got {self.token_dim} != {self.embed_dim}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FilipConfig":
        try:
            d = dict(d)
            vision = _build(VisionConfig, d.pop("vision"))
            text = _build(TextConfig, d.pop("text"))
            return _build(cls, d, vision=vision, text=text)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"invalid model config: {e}") from e


def _build(klass, d: dict[str, Any], **extra):
    known = {f.name for f in fields(klass)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {klass.__name__} keys {unknown}")
    return klass(**d, **extra)


def _positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive int, got {v!r}")


# Presets.  "tiny" exists for tests (a forward pass in milliseconds); the others are the
# paper's sizes with D = 256 (Yao et al., FILIP, arXiv 2111.07783).
PRESETS: dict[str, FilipConfig] = {
    "tiny": FilipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
        text=TextConfig(context_length=77, width=64, layers=2, heads=2),
        embed_dim=32, token_dim=32,
    ),
    "ViT-B-32": FilipConfig(
        vision=VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12),
        text=TextConfig(context_length=77, width=512, layers=12, heads=8),
        embed_dim=256, token_dim=256,
    ),
    "ViT-L-14": FilipConfig(
        vision=VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
        text=TextConfig(context_length=77, width=768, layers=12, heads=12),
        embed_dim=256, token_dim=256,
    ),
}


def preset(name: str) -> FilipConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
