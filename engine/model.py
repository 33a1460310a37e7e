"""The FILIP dual encoder in PyTorch: the reference every runtime is checked against.

Parameter names follow OpenAI CLIP / OpenCLIP (``visual.conv1``, ``transformer.resblocks.N``,
``ln_final``, ``text_projection``, ...) so their state dicts load without renaming; DeCLIP's
dense heads are ``image_mapping`` / ``text_mapping``.

Both towers return ``(tokens, pooled)``, L2-normalised on the last axis:
- image: tokens [B, n_patches, token_dim] (CLS excluded), pooled [B, embed_dim] (projected CLS)
- text:  tokens [B, L, token_dim] (SOT..EOT, zero past each row's length), pooled
         [B, embed_dim] (the EOT token at ``lengths - 1``)

Attention is written out (matmul, masked softmax, matmul) rather than calling
``nn.MultiheadAttention`` so the ONNX graph is plain ops that ONNX Runtime and TensorRT
fuse, with a causal mask built from the dynamic sequence length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FilipConfig, TextConfig, VisionConfig


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout
    (``in_proj_weight`` [3W, W], ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape
        hd = w // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)            # [B, N, 3W]
        qkv = qkv.reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)     # [3, B, H, N, hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)             # [B, H, N, N]
        if causal:
            idx = torch.arange(n, device=x.device)
            future = idx[None, :] > idx[:, None]                              # [N, N]
            attn = attn.masked_fill(future, float("-inf"))
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, w)                    # [B, N, W]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (CLIP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if activation == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, activation) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.zeros(w, embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Transformer output before ``ln_post``: [B, 1 + n_patches, width] (CLS first)."""
        x = self.conv1(pixels)                                   # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)                         # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))


class FilipModel(nn.Module):
    def __init__(self, cfg: FilipConfig):
        super().__init__()
        self.config = cfg
        t: TextConfig = cfg.text
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.activation)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.activation)
        self.ln_final = nn.LayerNorm(t.width)
        if cfg.text_projection_bias:
            self.text_projection = nn.Linear(t.width, cfg.embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))
        if cfg.token_head == "dense":
            self.image_mapping = nn.Linear(cfg.vision.width, cfg.token_dim)
            self.text_mapping = nn.Linear(t.width, cfg.token_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """CLIP's initialisation (std values of OpenAI's code); deterministic given a seed."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def normal_(p: torch.Tensor, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=gen) * std)

        for m in self.modules():  # everything not drawn below starts from a fixed value
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention):
                nn.init.zeros_(m.in_proj_bias)
        v, t = self.visual, self.config.text
        vw = self.config.vision.width
        normal_(v.conv1.weight, (3 * self.config.vision.patch_size ** 2) ** -0.5)
        normal_(v.class_embedding, vw ** -0.5)
        normal_(v.positional_embedding, vw ** -0.5)
        normal_(v.proj, vw ** -0.5)
        normal_(self.token_embedding.weight, 0.02)
        normal_(self.positional_embedding, 0.01)
        for tr in (v.transformer, self.transformer):
            proj_std = tr.width ** -0.5 * (2 * tr.layers) ** -0.5
            for blk in tr.resblocks:
                normal_(blk.attn.in_proj_weight, tr.width ** -0.5)
                normal_(blk.attn.out_proj.weight, proj_std)
                normal_(blk.mlp.c_fc.weight, (2 * tr.width) ** -0.5)
                normal_(blk.mlp.c_proj.weight, proj_std)
        tp = self.text_projection
        normal_(tp.weight if isinstance(tp, nn.Linear) else tp, t.width ** -0.5)
        if self.config.token_head == "dense":
            normal_(self.image_mapping.weight, vw ** -0.5)
            normal_(self.text_mapping.weight, t.width ** -0.5)

    def similarity_scale(self) -> float:
        """exp(logit_scale), capped at 100 as CLIP does: multiplies similarities before a softmax."""
        return float(self.logit_scale.detach().exp().clamp(max=100).item())

    # --- image tower --------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, S, S] float -> (tokens [B, n_patches, token_dim], pooled [B, embed_dim])."""
        x = self.visual(pixels)                                  # [B, 1+n, W], pre-ln_post
        if self.config.token_head == "dense":
            pooled = self.visual.ln_post(x[:, 0]) @ self.visual.proj
            tokens = self.image_mapping(x[:, 1:])
        else:
            y = self.visual.ln_post(x) @ self.visual.proj        # [B, 1+n, D]
            pooled, tokens = y[:, 0], y[:, 1:]
        return F.normalize(tokens, dim=-1), F.normalize(pooled, dim=-1)

    # --- text tower ---------------------------------------------------------------------
    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.text_projection
        return tp(x) if isinstance(tp, nn.Linear) else x @ tp

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] int64 (L <= context_length), lengths [B] (SOT..EOT inclusive)
        -> (tokens [B, L, token_dim] zero past each length, pooled [B, embed_dim] at EOT)."""
        b, n = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, causal=True))      # [B, L, W]
        eot = (lengths.to(torch.int64) - 1).reshape(b, 1, 1).expand(b, 1, x.shape[-1])
        x_eot = torch.gather(x, 1, eot).squeeze(1)               # [B, W]
        pooled = self._project_text(x_eot)
        tokens = self.text_mapping(x) if self.config.token_head == "dense" else self._project_text(x)
        valid = torch.arange(n, device=ids.device)[None, :] < lengths.to(torch.int64)[:, None]  # [B, L]
        tokens = F.normalize(tokens, dim=-1) * valid.unsqueeze(-1).to(tokens.dtype)
        return tokens, F.normalize(pooled, dim=-1)


class ImageTower(nn.Module):
    """The image half as its own module (what gets exported)."""

    def __init__(self, model: FilipModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        return self.model.encode_image(pixel_values)


class TextTower(nn.Module):
    """The text half as its own module (what gets exported)."""

    def __init__(self, model: FilipModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        return self.model.encode_text(input_ids, lengths)
