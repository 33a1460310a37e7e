"""Train a small FILIP on procedurally generated scenes (tools/scenes.py), on the CPU.

    python -m tools.train_filip --out build/trained/filip-scenes.pt [--minutes 25] [--seed 0]

The loss is FILIP's token-wise contrastive loss (Yao et al., 2022) in both directions: for a
batch of B scenes, image-to-text logits ``scale * s_I`` and text-to-image logits
``scale * s_T`` (late interaction over real tokens only: masks from lengths), cross-entropy
against the diagonal, averaged; plus CLIP's loss on the pooled embeddings, so that the
global rule has something to compare with. One learnable temperature (the checkpoint's
``logit_scale``). AdamW, linear warm-up then cosine decay, gradient clipping at 1.

The result is an ordinary native checkpoint (weights stored in fp16, CLIP's BPE merges
embedded). With ``--steps N`` a run is deterministic given ``--seed`` (on one machine and
thread count: scenes, initialisation and batch order all come from the seed); with only
``--minutes`` the number of steps, and the learning-rate schedule fitted to it, depend on
the machine's speed (both are recorded in the ``.json`` written beside the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from filip_engine.checkpoint import random_model, save_checkpoint
from filip_engine.config import FilipConfig, TextConfig, VisionConfig
from filip_engine.preprocess import CLIP_MEAN, CLIP_STD
from filip_engine.tokenizer import ClipTokenizer, find_clip_merges_file
from tools.scenes import SIZE, make_scene

CONFIG = FilipConfig(
    vision=VisionConfig(image_size=SIZE, patch_size=8, width=96, layers=3, heads=3),
    text=TextConfig(context_length=32, width=96, layers=3, heads=3),
    embed_dim=64, token_dim=64,
)
TRAIN_SEED_OFFSET = 1_000_000       # held-out scenes use seeds below this


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, S, S, 3] (already S x S: the eval transform leaves them as they are) -> normalised."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def token_scores(img: torch.Tensor, txt: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s_I, s_T [B_img, B_txt] of normalised tokens (text padding masked by lengths)."""
    sim = torch.einsum("ipd,jld->ijpl", img, txt)                        # [Bi, Bt, P, L]
    valid = torch.arange(txt.shape[1])[None, :] < lengths[:, None]       # [Bt, L]
    s_i = sim.masked_fill(~valid[None, :, None, :], -1e4).amax(dim=3).mean(dim=2)
    s_t = (sim.amax(dim=2) * valid[None]).sum(dim=2) / lengths[None].to(sim.dtype)
    return s_i, s_t


def batch(rng: np.random.Generator, tok: ClipTokenizer, n: int):
    scenes = [make_scene(rng) for _ in range(n)]
    b = tok([s.caption for s in scenes], pad_to="longest")
    return (pixels(np.stack([s.image for s in scenes])), torch.from_numpy(b.ids),
            torch.from_numpy(b.lengths.astype(np.int64)))


def train(out: Path, *, seed: int, minutes: float, steps: int | None, batch_size: int, lr: float,
          threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = ClipTokenizer.from_file(find_clip_merges_file(), context_length=CONFIG.text.context_length)
    model = random_model(CONFIG, seed).train()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    rng = np.random.default_rng(TRAIN_SEED_OFFSET + seed)
    budget = minutes * 60
    total = steps or 10**9
    warmup = 200
    t0, step, log = time.perf_counter(), 0, []
    planned = steps or None

    def lr_at(s: int, horizon: int) -> float:
        if s < warmup:
            return lr * (s + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, horizon - warmup))))

    while step < total:
        elapsed = time.perf_counter() - t0
        if steps is None and elapsed > budget:
            break
        if planned is None and step == 50:      # fix the schedule's horizon from the measured speed
            planned = max(warmup + 50, int(budget / (elapsed / 50)))
        horizon = planned or total
        for g in opt.param_groups:
            g["lr"] = lr_at(step, horizon)
        x, ids, lengths = batch(rng, tok, batch_size)
        img_tok, img_pool = model.encode_image(x)
        txt_tok, txt_pool = model.encode_text(ids, lengths)
        scale = model.logit_scale.exp().clamp(max=100)
        s_i, s_t = token_scores(img_tok, txt_tok, lengths)
        target = torch.arange(len(ids))
        token_loss = (F.cross_entropy(scale * s_i, target) + F.cross_entropy(scale * s_t.T, target)) / 2
        g = img_pool @ txt_pool.T
        global_loss = (F.cross_entropy(scale * g, target) + F.cross_entropy(scale * g.T, target)) / 2
        loss = token_loss + global_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            entry = {"step": step, "s": round(time.perf_counter() - t0, 1), "token_loss": round(token_loss.item(), 4),
                     "global_loss": round(global_loss.item(), 4), "scale": round(scale.item(), 2)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    vocab = ClipTokenizer.from_file(find_clip_merges_file()).merges_text
    half = random_model(CONFIG, seed)
    half.load_state_dict(model.state_dict())
    save_checkpoint(out, half.half(), vocab_text=vocab)
    info = {"command": "python -m tools.train_filip " + " ".join(sys.argv[1:]), "seed": seed, "steps": step,
            "schedule_steps": planned, "threads": torch.get_num_threads(), "batch": batch_size, "lr": lr,
            "seconds": round(time.perf_counter() - t0, 1), "config": CONFIG.to_dict(), "log": log}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_filip", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the native checkpoint to write (.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=25.0, help="time budget (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (deterministic)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = train(args.out, seed=args.seed, minutes=args.minutes, steps=args.steps, batch_size=args.batch,
                 lr=args.lr, threads=args.threads)
    print(f"wrote {args.out}: {info['steps']} steps in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
