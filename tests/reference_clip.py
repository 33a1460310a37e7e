"""Independent test references: CLIP's forward written the way OpenAI's and DeCLIP's code
computes it (sequence-first layout, ``nn.MultiheadAttention`` with an additive -inf causal
mask, ``ln_post`` on CLS, EOT found by ``argmax`` of the ids), sharing no code with
``filip_engine.model``.  Their ``state_dict()`` keys are the real layouts' keys, so tests build
checkpoints in those layouts from them.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width, heads, act, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", RefQuickGELU() if act == "quick_gelu" else nn.GELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x):  # x: [L, N, W]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, act, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads, act, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVisual(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, out_dim, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        g = image_size // patch
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(g * g + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim) * width ** -0.5)

    def trunk(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        return self.transformer(x).permute(1, 0, 2)   # [N, 1+P, W]

    def forward(self, x):
        """OpenAI's encode_image: ln_post(CLS) @ proj."""
        return self.ln_post(self.trunk(x)[:, 0, :]) @ self.proj


def _randomise(module: nn.Module, seed: int) -> None:
    """Non-trivial LayerNorm/bias values so a wrong key mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


class RefCLIP(nn.Module):
    """OpenAI CLIP ViT (and OpenCLIP's CLIP class, which has the same keys)."""

    def __init__(self, image_size=32, patch=8, vision_width=128, vision_layers=2,
                 context_length=77, vocab_size=49408, text_width=128, text_layers=2,
                 embed_dim=64, act="quick_gelu", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.context_length = context_length
        self.visual = RefVisual(image_size, patch, vision_width, vision_layers, vision_width // 64, embed_dim, act)
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.transformer = RefTransformer(text_width, text_layers, text_width // 64, act, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        _randomise(self, seed)

    def text_trunk(self, text):  # text: [N, context_length] ids
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_final(x)

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        x = self.text_trunk(text)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def image_tokens(self, image):
        """FILIP token path for a CLIP checkpoint: ln_post + proj on every patch token."""
        return F.normalize(self.visual.ln_post(self.visual.trunk(image))[:, 1:] @ self.visual.proj, dim=-1)

    def text_tokens(self, text):
        return F.normalize(self.text_trunk(text) @ self.text_projection, dim=-1)


class RefDeclipText(nn.Module):
    def __init__(self, context_length, vocab_size, width, layers, embed_dim):
        super().__init__()
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.transformer = RefTransformer(width, layers, width // 64, "quick_gelu", attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.02)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim)   # with bias, as DeCLIP

    def forward(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return self.text_projection(x[torch.arange(x.shape[0]), text.argmax(dim=-1)]), x


class RefDeclipFilip(nn.Module):
    """DeCLIP's FILIP: global CLIP heads plus dense heads with bias; the image head reads
    pre-ln_post patch tokens, the text head post-ln_final tokens.  Vocab 49,409."""

    def __init__(self, image_size=32, patch=8, vision_width=128, vision_layers=2, context_length=77,
                 vocab_size=49409, text_width=128, text_layers=2, embed_dim=96, dense_dim=48, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = RefVisual(image_size, patch, vision_width, vision_layers, vision_width // 64, embed_dim, "quick_gelu")
        self.encode_text = RefDeclipText(context_length, vocab_size, text_width, text_layers, embed_dim)
        self.image_mapping = nn.Linear(vision_width, dense_dim)
        self.text_mapping = nn.Linear(text_width, dense_dim)
        self.logit_scale = nn.Parameter(torch.ones([1]) * 4.6)
        self.logit_scale_dense = nn.Parameter(torch.tensor(3.3))
        self.text_label_predictor = nn.Linear(embed_dim, vocab_size)  # MLM training head
        _randomise(self, seed)

    def image(self, image):
        x = self.visual.trunk(image)
        pooled = self.visual.ln_post(x[:, 0]) @ self.visual.proj
        return F.normalize(self.image_mapping(x[:, 1:]), dim=-1), F.normalize(pooled, dim=-1)

    def text(self, text):
        pooled, words = self.encode_text(text)
        return F.normalize(self.text_mapping(words), dim=-1), F.normalize(pooled, dim=-1)


def random_token_rows(n: int, context_length: int, sot: int, eot: int, seed: int = 0):
    """[n, context_length] id rows [SOT, w..., EOT, 0...] (ids < sot) and their lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, context_length + 1, (n,), generator=g)
    lengths[0] = context_length
    ids = torch.zeros(n, context_length, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        ids[i, 0] = sot
        ids[i, 1:length - 1] = torch.randint(0, sot, (length - 2,), generator=g)
        ids[i, length - 1] = eot
    return ids, lengths
