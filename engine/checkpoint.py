"""Checkpoint loading (one entry point that detects the layout) and the native format.

Layouts understood by :func:`load_checkpoint`:
- ``native``: ``{"format": "filip-engine", "format_version", "config", "state_dict", "vocab"}``
  written by :func:`save_checkpoint`; the config travels inside.
- ``openclip``: an OpenCLIP / OpenAI CLIP state dict (``visual.conv1.weight``, ...), bare or
  under ``state_dict``/``model``; the architecture is inferred from tensor shapes.  Heads are
  not visible in shapes: ``width // 64`` (OpenAI's rule) unless given.
- ``declip``: DeCLIP's FILIP (``state['model']``, ``module.visual.*``, ``module.encode_text.*``,
  dense ``image_mapping`` / ``text_mapping`` heads with bias, ``logit_scale_dense``).

Loading never executes code from the file: ``torch.load(weights_only=True)`` with an
allow-list of harmless extras (argparse namespaces found in research checkpoints), or
safetensors (any layout; a native one keeps its config and vocabulary in the metadata).

Run ``python -m filip_engine.checkpoint init --preset tiny --out tiny.pt`` to write a random
native checkpoint of any preset.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import PRESETS, FilipConfig, TextConfig, VisionConfig, preset
from .errors import CheckpointError
from .model import FilipModel

NATIVE_FORMAT = "filip-engine"
NATIVE_VERSION = 1
SAFE_GLOBALS = [argparse.Namespace]
# Keys some layouts carry that hold no weights of the encoders we serve.
_IGNORED = {
    "openclip": re.compile(r"^(input_resolution|context_length|vocab_size|attn_mask)$"),
    # DeCLIP: the global logit scale (we keep the token-wise one) and the MLM training head.
    "declip": re.compile(r"^(logit_scale|text_label_predictor\..*)$"),
}


@dataclass
class LoadedCheckpoint:
    model: FilipModel          # eval mode, fp32, CPU
    config: FilipConfig
    layout: str                # "native" | "openclip" | "declip"
    path: Path
    vocab_text: str | None     # CLIP merges text carried by a native checkpoint, else None


# --- reading the file ------------------------------------------------------------------
def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def _read_safetensors(path: Path):
    """Tensors (and, for a native checkpoint, its config and vocabulary from the metadata).
    safetensors holds only tensors and strings: nothing in it can run code."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") == NATIVE_FORMAT:
        try:
            return {"format": NATIVE_FORMAT, "format_version": int(meta.get("format_version", "0")),
                    "config": json.loads(meta["config"]), "state_dict": tensors, "vocab": meta.get("vocab")}
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: native safetensors metadata is incomplete ({e})") from e
    return tensors


def _read(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    if _is_torchscript(path):  # checked first: torch.load would hand these to torch.jit.load
        raise CheckpointError(
            f"{path}: this is a TorchScript archive (like OpenAI's original CLIP .pt files), which is not "
            f"loaded because it carries code; convert it once with "
            f"torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'state_dict.pt')")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e)) or ["an object outside the allow-list"]
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects whose loading would run code "
            f"({', '.join(sorted(set(found)))}); save a plain state dict (tensors, numbers, strings) instead"
        ) from e
    except Exception as e:  # zip/pickle/format errors from torch.load
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _is_torchscript(path: Path) -> bool:
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())
    except (zipfile.BadZipFile, OSError, IndexError):
        return False


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded object: bare, or under state_dict / model / module."""
    if isinstance(obj, Mapping):
        if any(isinstance(v, torch.Tensor) for v in obj.values()) and "visual.conv1.weight" in _strip(obj):
            return dict(obj)
        for key in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                return _find_state_dict(obj[key], path)
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(
        f"{path}: no state dict found (expected tensors at the top level or under "
        f"'state_dict' / 'model'; got {type(obj).__name__} with keys {_preview(obj)})"
    )


def _strip(sd: Mapping) -> dict:
    """Drop DataParallel's 'module.' prefix."""
    return {(k[7:] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in sd.items()}


def _preview(obj, n: int = 8) -> str:
    keys = list(obj.keys()) if isinstance(obj, Mapping) else []
    return str(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# --- layouts --------------------------------------------------------------------------
def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    if "encode_text.token_embedding.weight" in sd and "visual.conv1.weight" in sd:
        return "declip"
    if "token_embedding.weight" in sd and "visual.conv1.weight" in sd:
        return "openclip"
    raise CheckpointError(
        "unknown checkpoint layout: expected OpenCLIP/OpenAI CLIP keys (visual.conv1.weight, "
        "token_embedding.weight) or DeCLIP FILIP keys (module.visual.*, module.encode_text.*); "
        f"found {_preview(sd)}"
    )


def _count_layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not idx:
        raise CheckpointError(f"no transformer blocks found under '{prefix}N.'")
    if idx != set(range(len(idx))):
        raise CheckpointError(f"transformer blocks under '{prefix}' are not numbered 0..N-1: {sorted(idx)}")
    return len(idx)


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    try:
        return tuple(sd[key].shape)
    except KeyError:
        raise CheckpointError(f"missing key '{key}'") from None


def infer_config(sd: Mapping[str, torch.Tensor], layout: str, *, activation: str = "quick_gelu",
                 vision_heads: int | None = None, text_heads: int | None = None) -> FilipConfig:
    """Architecture from tensor shapes (``sd`` already in our key names)."""
    vw, _, patch, _ = _shape(sd, "visual.conv1.weight")
    n_pos = _shape(sd, "visual.positional_embedding")[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise CheckpointError(f"visual.positional_embedding has {n_pos} rows, not 1 + a square number of patches")
    v_layers = _count_layers(sd, "visual.transformer.resblocks.")
    v_hidden = _shape(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    vocab, tw = _shape(sd, "token_embedding.weight")
    ctx = _shape(sd, "positional_embedding")[0]
    t_layers = _count_layers(sd, "transformer.resblocks.")
    t_hidden = _shape(sd, "transformer.resblocks.0.mlp.c_fc.weight")[0]
    embed_dim = _shape(sd, "visual.proj")[1]
    dense = layout == "declip"
    token_dim = _shape(sd, "image_mapping.weight")[0] if dense else embed_dim
    try:
        return FilipConfig(
            vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=vw, layers=v_layers,
                                heads=vision_heads or max(vw // 64, 1), mlp_ratio=v_hidden / vw),
            text=TextConfig(context_length=ctx, vocab_size=vocab, width=tw, layers=t_layers,
                            heads=text_heads or max(tw // 64, 1), mlp_ratio=t_hidden / tw),
            embed_dim=embed_dim, token_dim=token_dim,
            token_head="dense" if dense else "shared",
            activation=activation,
            text_projection_bias="text_projection.bias" in sd,
        )
    except ValueError as e:
        raise CheckpointError(f"inferred architecture is invalid: {e}") from e


def _to_native_keys(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    ignored = _IGNORED.get(layout)
    for k, v in sd.items():
        if layout == "declip":
            if k == "logit_scale_dense":
                k = "logit_scale"
            elif k.startswith("encode_text."):
                k = k[len("encode_text."):]
            elif ignored.match(k):
                continue
        elif ignored is not None and ignored.match(k):
            continue
        out[k] = v
    if "text_projection.weight" in out and "text_projection.bias" not in out:
        out["text_projection"] = out.pop("text_projection.weight").t()  # bias-free nn.Linear form
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def _load_weights(model: FilipModel, sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """Strict load that reports every problem at once: missing, unexpected, mismatched."""
    expected = model.state_dict()
    sd = dict(sd)
    if "logit_scale" not in sd:  # some exports drop it; it only scales probabilities
        sd["logit_scale"] = expected["logit_scale"]
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    not_tensor = [k for k in sd if not isinstance(sd[k], torch.Tensor)]
    problems = []
    if missing:
        problems.append(f"missing keys {_limit(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_limit(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches [{'; '.join(_limit(bad_shape))}]")
    if not_tensor:
        problems.append(f"non-tensor values at {_limit(not_tensor)}")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the model: " + ", ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            t = sd[k]
            if not t.is_floating_point():
                raise CheckpointError(f"{path}: key '{k}' has dtype {t.dtype}, expected a floating-point tensor")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: key '{k}' contains NaN or Inf")
            p.copy_(t.to(torch.float32))


def _limit(items: list[str], n: int = 10) -> list[str]:
    return items[:n] + ([f"... {len(items) - n} more"] if len(items) > n else [])


# --- public API -----------------------------------------------------------------------
def load_checkpoint(path: str | Path, *, activation: str | None = None,
                    vision_heads: int | None = None, text_heads: int | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint into an fp32, eval-mode :class:`FilipModel`.

    ``activation`` ("quick_gelu" | "gelu") is required knowledge for foreign state dicts:
    nothing in them says which; default "quick_gelu" (OpenAI CLIP, DeCLIP).  For a native
    checkpoint the stored config wins, and a conflicting ``activation`` is an error.
    """
    path = Path(path)
    obj = _read(path)
    if isinstance(obj, Mapping) and obj.get("format") == NATIVE_FORMAT:
        return _load_native(obj, path, activation)
    sd = _strip(_find_state_dict(obj, path))
    bad_keys = [k for k in sd if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path}: state dict has non-string keys {bad_keys[:5]}")
    try:
        layout = detect_layout(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    native_sd = _to_native_keys(sd, layout)
    try:
        cfg = infer_config(native_sd, layout, activation=activation or "quick_gelu",
                           vision_heads=vision_heads, text_heads=text_heads)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    model = FilipModel(cfg).eval()
    _load_weights(model, native_sd, path)
    return LoadedCheckpoint(model, cfg, layout, path, None)


def _load_native(obj: Mapping, path: Path, activation: str | None) -> LoadedCheckpoint:
    version = obj.get("format_version")
    if version != NATIVE_VERSION:
        raise CheckpointError(f"{path}: native checkpoint format_version {version!r} is not supported (expected {NATIVE_VERSION})")
    for key in ("config", "state_dict"):
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(f"{path}: native checkpoint lacks '{key}'")
    try:
        cfg = FilipConfig.from_dict(obj["config"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if activation is not None and activation != cfg.activation:
        raise CheckpointError(f"{path}: the checkpoint's config says activation={cfg.activation!r}, but {activation!r} was requested")
    vocab = obj.get("vocab")
    if vocab is not None and not isinstance(vocab, str):
        raise CheckpointError(f"{path}: 'vocab' must be the BPE merges text (str), got {type(vocab).__name__}")
    model = FilipModel(cfg).eval()
    _load_weights(model, obj["state_dict"], path)
    return LoadedCheckpoint(model, cfg, "native", path, vocab)


def save_checkpoint(path: str | Path, model: FilipModel, *, vocab_text: str | None = None) -> Path:
    """Write the native format: config + fp32 state dict (+ the BPE merges text, optional).
    A ``.safetensors`` path writes safetensors, with config and vocabulary in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        meta = {"format": NATIVE_FORMAT, "format_version": str(NATIVE_VERSION), "config": json.dumps(model.config.to_dict())}
        if vocab_text is not None:
            meta["vocab"] = vocab_text
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
        return path
    torch.save({
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "vocab": vocab_text,
    }, path)
    return path


def random_model(cfg: FilipConfig | str, seed: int = 0) -> FilipModel:
    """A randomly initialised model (CLIP's init), deterministic in ``seed``."""
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    model = FilipModel(cfg)
    model.reset_parameters(seed)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m filip_engine.checkpoint",
                                description="Write a random-initialised native FILIP checkpoint.")
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="write a random native checkpoint of a preset")
    init.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    init.add_argument("--out", required=True, type=Path, help="output .pt path")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                      help="override the preset's MLP activation")
    init.add_argument("--vocab", type=Path, default=None,
                      help="CLIP merges file to embed (default: the one shipped in installed packages, if any)")
    init.add_argument("--no-vocab", action="store_true", help="do not embed a vocabulary")
    args = p.parse_args(argv)

    from .tokenizer import ClipTokenizer, find_clip_merges_file
    from .errors import FilipError
    try:
        cfg = preset(args.preset)
        if args.activation:
            cfg = replace(cfg, activation=args.activation)
        vocab_text = None
        if not args.no_vocab:
            vocab_path = args.vocab or find_clip_merges_file()
            vocab_text = ClipTokenizer.from_file(vocab_path, vocab_size=cfg.text.vocab_size).merges_text
        save_checkpoint(args.out, random_model(cfg, args.seed), vocab_text=vocab_text)
    except FilipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (preset {args.preset}, seed {args.seed}, "
          f"vocab {'embedded' if vocab_text else 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
