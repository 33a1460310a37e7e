"""Checkpoint loading (one entry point that detects the layout) and the native format.

Layouts understood by :func:`load_checkpoint`:
- ``native``: ``{"format": "filip-engine", "format_version", "config", "state_dict", "vocab"}``
  written by :func:`save_checkpoint`; the config travels inside.
- ``openclip``: an OpenCLIP / OpenAI CLIP state dict (``visual.conv1.weight``, ...), bare or
  under ``state_dict``/``model``; the architecture is inferred from tensor shapes.  Heads are
  not visible in shapes: ``width // 64`` (OpenAI's rule) unless given.
- ``declip``: DeCLIP's FILIP (``state['model']``, ``module.visual.*``, ``module.encode_text.*``,
  dense ``image_mapping`` / ``text_mapping`` heads with bias, ``logit_scale_dense``).
- ``hf``: a Hugging Face transformers ``CLIPModel`` directory: ``config.json`` (the
  architecture and activation, read from it, never guessed), ``model.safetensors`` (else
  ``pytorch_model.bin``, else a sharded ``*.index.json``), the tokenizer files
  (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and ``preprocessor_config.json``.
  Passing the weights file inside such a directory loads the directory with that file.
  Only what the engine reproduces exactly is accepted: one activation for both towers
  (``quick_gelu`` or exact ``gelu``), LayerNorm eps 1e-5, CLIP's 49408-token vocabulary with
  transformers' EOS pooling equal to the engine's (``eos_token_id`` 49407, or the legacy 2,
  i.e. argmax of the ids), and ``CLIPImageProcessor`` settings of CLIP's recipe (bicubic
  shortest-edge resize, square centre crop of the model's size, ``/255``).

What a checkpoint says beyond weights travels in :class:`LoadedCheckpoint`: the vocabulary
(``vocab_text`` of a native file, ``tokenizer_file`` of a directory), the preprocessing of a
directory (``image_processor``) and the scoring the model was trained for (``default_scoring``).

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
# CLIP checkpoints were trained on the pooled embedding, FILIP ones on token-wise late interaction.
DEFAULT_SCORING = {"native": "token", "declip": "token", "openclip": "global", "hf": "global"}
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
    layout: str                # "native" | "openclip" | "declip" | "hf"
    path: Path                 # the file, or for "hf" the directory
    vocab_text: str | None     # CLIP merges text carried by a native checkpoint, else None
    # "hf": the directory's tokenizer, for ClipTokenizer.from_file (which then tokenises as
    # transformers does): tokenizer.json, else merges.txt (with vocab.json beside it); None
    # where the directory has neither (or for a file layout).
    tokenizer_file: Path | None = None
    # "hf": preprocessor_config.json, validated and completed with CLIPImageProcessor's defaults
    # (keys: image_processor_type, do_resize, size {"shortest_edge"}, resample (3, bicubic),
    # do_center_crop, crop_size {"height", "width"}, do_rescale, rescale_factor, do_normalize,
    # image_mean, image_std (the identity 0 / 1 where do_normalize is false, so they are always
    # what to apply), do_convert_rgb); None without that file (or for a file layout).
    image_processor: dict | None = None
    # "global" (pooled cosine: CLIP checkpoints, openclip and hf) or "token" (late
    # interaction: FILIP checkpoints, native and declip); filled in from the layout.
    default_scoring: str = ""
    # An OpenCLIP model directory's preprocess_cfg as an ImageTransform recipe
    # (ImageTransform.to_dict() form: OpenCLIP's transform with the directory's mean / std);
    # None where the checkpoint says nothing (OpenCLIP's defaults apply).
    preprocess: dict | None = None

    def __post_init__(self) -> None:
        if not self.default_scoring:
            self.default_scoring = DEFAULT_SCORING[self.layout]
        if self.default_scoring not in ("global", "token"):
            raise ValueError(f"default_scoring must be 'global' or 'token', got {self.default_scoring!r}")


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
    if any(isinstance(k, str) and k.startswith(("vision_model.", "text_model.")) for k in sd):
        raise CheckpointError(
            "this is a Hugging Face transformers CLIP state dict, whose architecture lives in its "
            "config.json: load the directory that holds both (config.json + model.safetensors or pytorch_model.bin)")
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
    problems = _weight_problems(missing=missing, unexpected=unexpected, bad_shape=bad_shape, not_tensor=not_tensor)
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


_PROBLEM = {"missing": "missing keys {}", "unexpected": "unexpected keys {}",
            "bad_shape": "shape mismatches [{}]", "not_tensor": "non-tensor values at {}"}


def _weight_problems(**found: list[str]) -> list[str]:
    """One phrase per non-empty kind of problem, in the order given (at most 10 items each)."""
    return [_PROBLEM[kind].format("; ".join(_limit(items)) if kind == "bad_shape" else _limit(items))
            for kind, items in found.items() if items]


def _limit(items: list[str], n: int = 10) -> list[str]:
    return items[:n] + ([f"... {len(items) - n} more"] if len(items) > n else [])


# --- public API -----------------------------------------------------------------------
def load_checkpoint(path: str | Path, *, activation: str | None = None,
                    vision_heads: int | None = None, text_heads: int | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint into an fp32, eval-mode :class:`FilipModel`.

    ``path`` is a checkpoint file, an OpenCLIP model directory (``open_clip_config.json`` beside
    the weights: layout "openclip" with the activation, head counts and preprocessing it
    states), or a Hugging Face ``CLIPModel`` directory (layout "hf").
    ``activation`` ("quick_gelu" | "gelu") is required knowledge for foreign state dicts:
    nothing in them says which; default "quick_gelu" (OpenAI CLIP, DeCLIP).  For a native
    checkpoint the stored config wins, and for an "hf" directory its config.json (as do its
    head counts): a conflicting ``activation`` (or ``vision_heads`` / ``text_heads``) is an error.
    """
    path = Path(path)
    if path.is_dir() and (path / OPENCLIP_CONFIG).is_file():
        return _load_openclip_dir(path, None, activation, vision_heads, text_heads)
    if path.is_file() and (path.parent / OPENCLIP_CONFIG).is_file():
        return _load_openclip_dir(path.parent, path, activation, vision_heads, text_heads)
    if path.is_dir():
        return _load_hf(path, None, activation, vision_heads, text_heads)
    if path.name in _HF_WEIGHTS + _HF_INDEXES and (path.parent / "config.json").is_file():
        return _load_hf(path.parent, path, activation, vision_heads, text_heads)
    return load_checkpoint_file(path, activation=activation, vision_heads=vision_heads, text_heads=text_heads)


def load_checkpoint_file(path: Path, *, activation: str | None = None, vision_heads: int | None = None,
                         text_heads: int | None = None) -> LoadedCheckpoint:
    """One checkpoint file (native, OpenCLIP / OpenAI CLIP or DeCLIP), whatever lies beside it."""
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


# --- OpenCLIP model directories (open_clip_config.json + weights) ----------------------
OPENCLIP_CONFIG = "open_clip_config.json"
_OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Settings of an OpenCLIP model config that change what the towers compute, with the value
# the engine's towers implement; any other value is refused (a custom text tower, attentional
# pooling, a timm trunk, ...). Keys not named here (dropout, patch dropout, output_tokens,
# head_width, heads, widths, ...) do not change an eval forward pass or are read from shapes.
_OPENCLIP_FIXED = {
    "model_cfg": {"custom_text": False, "cast_dtype": None, "init_logit_bias": None},
    "vision_cfg": {"timm_model_name": None, "attentional_pool": False, "no_ln_pre": False,
                   "final_ln_after_pool": False, "pool_type": "tok", "ls_init_value": None,
                   "input_patchnorm": False, "global_average_pool": False, "act_kwargs": None,
                   "norm_kwargs": None, "pos_embed_type": "learnable"},
    "text_cfg": {"hf_model_name": None, "pool_type": "argmax", "proj_bias": False, "no_causal_mask": False,
                 "embed_cls": False, "ls_init_value": None, "act_kwargs": None, "norm_kwargs": None,
                 "final_ln_after_pool": False, "proj_type": "linear"},
    "preprocess_cfg": {"interpolation": "bicubic", "resize_mode": "shortest"},
}


def _load_openclip_dir(directory: Path, weights: Path | None, activation: str | None,
                       vision_heads: int | None, text_heads: int | None) -> LoadedCheckpoint:
    """An OpenCLIP model directory (what ``open_clip.create_model('local-dir:DIR')`` and
    ``hf-hub:`` load): ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and the
    weights. The config says what a bare state dict cannot: the activation (``quick_gelu``:
    QuickGELU, else OpenCLIP's default exact GELU), the head counts and the normalisation."""
    cfg_path = directory / OPENCLIP_CONFIG
    raw = _read_json(cfg_path)
    model_cfg = raw.get("model_cfg", raw)
    pre = raw.get("preprocess_cfg") or {}
    parts = {"model_cfg": model_cfg, "vision_cfg": model_cfg.get("vision_cfg"), "text_cfg": model_cfg.get("text_cfg"),
             "preprocess_cfg": pre}
    for name, part in parts.items():
        if not isinstance(part, dict):
            raise CheckpointError(f"{cfg_path}: '{name}' must be a JSON object, got {type(part).__name__}")
        for key, fine in _OPENCLIP_FIXED[name].items():
            if part.get(key, fine) != fine:
                raise CheckpointError(f"{cfg_path}: {name}.{key} = {part[key]!r} changes what the towers compute "
                                      f"and the engine implements only {fine!r}")
    vis, txt = parts["vision_cfg"], parts["text_cfg"]
    stated = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    if activation is not None and activation != stated:
        raise CheckpointError(f"{cfg_path}: the config says activation {stated!r} (quick_gelu = "
                              f"{bool(model_cfg.get('quick_gelu', False))}), but {activation!r} was requested")
    heads = {"vision": max(int(vis.get("width", 768)) // int(vis.get("head_width", 64)), 1),
             "text": int(txt.get("heads", 8))}
    for tower, given in (("vision", vision_heads), ("text", text_heads)):
        if given is not None and given != heads[tower]:
            raise CheckpointError(f"{cfg_path}: the config gives the {tower} tower {heads[tower]} heads, "
                                  f"but {given} were requested")
    if weights is None:
        found = [directory / n for n in _OPENCLIP_WEIGHTS if (directory / n).is_file()]
        if not found:
            raise CheckpointError(f"{directory}: an OpenCLIP model directory without weights "
                                  f"(expected {' or '.join(_OPENCLIP_WEIGHTS)} beside {OPENCLIP_CONFIG})")
        weights = found[0]
    ck = load_checkpoint_file(weights, activation=stated, vision_heads=heads["vision"], text_heads=heads["text"])
    if ck.layout != "openclip":
        raise CheckpointError(f"{weights}: {OPENCLIP_CONFIG} beside it, but the weights are in the {ck.layout} layout")
    size = ck.config.vision.image_size
    for key, want in (("image_size", size), ("embed_dim", ck.config.embed_dim)):
        stated_value = (vis if key == "image_size" else model_cfg).get(key)
        if stated_value is not None and stated_value not in (want, [want, want]):
            raise CheckpointError(f"{cfg_path}: {key} {stated_value!r} disagrees with the weights ({want})")
    if pre.get("image_size") not in (None, size, [size, size]):
        raise CheckpointError(f"{cfg_path}: preprocess_cfg.image_size {pre['image_size']!r} is not the tower's {size}")
    mean = list(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = list(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))
    preprocess = {"recipe": "openclip", "image_size": size, "resize_size": size, "mean": mean, "std": std}
    ck.path, ck.preprocess = directory, preprocess
    return ck


# --- Hugging Face transformers CLIPModel directories ----------------------------------
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_PREFERENCE = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (5.x): what transformers
# itself uses where a config.json leaves a key out.
_HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                       "layer_norm_eps": 1e-5}
_HF_PROJECTION_DIM = 512
# hidden_act -> the engine's activation.  transformers' "gelu" is exact (erf) GELU, as is the
# engine's; its tanh approximations ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", ...) are not.
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
_ENGINE_LN_EPS = 1e-5          # nn.LayerNorm's default, used by every LayerNorm of engine/model.py
_CLIP_VOCAB, _CLIP_SOT, _CLIP_EOT = 49408, "<|startoftext|>", "<|endoftext|>"
_CLIP_EOT_ID = _CLIP_VOCAB - 1  # the last id of CLIP's vocabulary (filip_engine.tokenizer's layout)
_HF_LEGACY_EOS_ID = 2           # configs before transformers PR 24773: pooled at argmax(input_ids)
# CLIPImageProcessor's defaults (transformers 5.x), completing a preprocessor_config.json.
_HF_IMAGE_DEFAULTS = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}
_HF_IMAGE_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor")
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _load_hf(directory: Path, weights: Path | None, activation: str | None,
             vision_heads: int | None, text_heads: int | None) -> LoadedCheckpoint:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{directory} is a directory without a config.json, so it is not a Hugging Face CLIPModel directory "
            f"(config.json + model.safetensors or pytorch_model.bin); pass a checkpoint file instead")
    cfg = _hf_config(_read_json(cfg_path), cfg_path, activation, vision_heads, text_heads)
    tokenizer_file = _hf_tokenizer_file(directory)       # the small files first, then the weights
    pp = directory / "preprocessor_config.json"
    image_processor = _hf_image_processor(pp, cfg.vision.image_size) if pp.is_file() else None
    weights, sd = _hf_weights(directory, weights)
    model = FilipModel(cfg).eval()
    _load_weights(model, _hf_to_native(sd, model, weights, cfg_path), weights)
    return LoadedCheckpoint(model, cfg, "hf", directory, None, tokenizer_file=tokenizer_file,
                            image_processor=image_processor)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _hf_config(raw: dict, path: Path, activation: str | None, vision_heads: int | None,
               text_heads: int | None) -> FilipConfig:
    """FilipConfig from a transformers CLIPConfig, refusing what the engine would run differently."""
    model_type = raw.get("model_type")
    if model_type is None and "CLIPModel" in (raw.get("architectures") or []):
        model_type = "clip"
    if model_type != "clip":
        raise CheckpointError(f"{path}: model_type {model_type!r} is not transformers' two-tower CLIPModel ('clip'), "
                              f"the only Hugging Face architecture the engine loads")
    towers = {}
    for name, defaults in (("text", _HF_TEXT_DEFAULTS), ("vision", _HF_VISION_DEFAULTS)):
        sub, legacy = raw.get(f"{name}_config"), raw.get(f"{name}_config_dict")
        for key, value in ((f"{name}_config", sub), (f"{name}_config_dict", legacy)):
            if value is not None and not isinstance(value, dict):
                raise CheckpointError(f"{path}: {key} must be an object, got {type(value).__name__}")
        towers[name] = {**defaults, **(sub or {}), **(legacy or {})}   # *_config_dict wins, as in transformers
    t, v = towers["text"], towers["vision"]

    def integer(tower: str, key: str) -> int:
        value = towers[tower][key]
        if isinstance(value, (list, tuple)) and key in ("image_size", "patch_size"):
            if len(value) != 2 or value[0] != value[1]:
                raise CheckpointError(f"{path}: vision_config.{key} {value!r} is not square, which the engine requires")
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: {tower}_config.{key} must be a positive integer, got {value!r}")
        return value

    acts = {}
    for tower in ("text", "vision"):
        act = towers[tower]["hidden_act"]
        if act not in _HF_ACTIVATIONS:
            raise CheckpointError(
                f"{path}: {tower}_config.hidden_act {act!r} is not an activation the engine implements (it has "
                f"'quick_gelu' and exact 'gelu'), so it would compute different embeddings")
        acts[tower] = _HF_ACTIVATIONS[act]
        eps = towers[tower]["layer_norm_eps"]
        if eps != _ENGINE_LN_EPS:
            raise CheckpointError(f"{path}: {tower}_config.layer_norm_eps is {eps!r}, but the engine's LayerNorms "
                                  f"use {_ENGINE_LN_EPS!r}")
    if acts["text"] != acts["vision"]:
        raise CheckpointError(f"{path}: text_config.hidden_act is {t['hidden_act']!r} but vision_config.hidden_act is "
                              f"{v['hidden_act']!r}, and the engine runs one activation in both towers")
    if activation is not None and activation != acts["text"]:
        raise CheckpointError(f"{path}: config.json says hidden_act={t['hidden_act']!r} (activation "
                              f"{acts['text']!r}), but activation={activation!r} was requested")
    vocab = integer("text", "vocab_size")
    if vocab != _CLIP_VOCAB:
        raise CheckpointError(f"{path}: text_config.vocab_size is {vocab}, but the engine's tokenizer is CLIP's "
                              f"{_CLIP_VOCAB}-token BPE (added tokens are not supported)")
    eos = t["eos_token_id"]
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if eos not in (_CLIP_EOT_ID, _HF_LEGACY_EOS_ID):
        raise CheckpointError(
            f"{path}: text_config.eos_token_id is {eos!r}; transformers pools the text at that id, which agrees "
            f"with the engine's pooling at the last token only for CLIP's {_CLIP_EOT} ({_CLIP_EOT_ID}) or the "
            f"legacy {_HF_LEGACY_EOS_ID} (argmax of the ids)")
    if integer("vision", "num_channels") != 3:
        raise CheckpointError(f"{path}: vision_config.num_channels is {v['num_channels']}, the engine takes RGB (3)")
    heads = {"vision": integer("vision", "num_attention_heads"), "text": integer("text", "num_attention_heads")}
    for tower, given in (("vision", vision_heads), ("text", text_heads)):
        if given is not None and given != heads[tower]:
            raise CheckpointError(f"{path}: {tower}_config.num_attention_heads is {heads[tower]}, but "
                                  f"{tower}_heads={given} was requested")

    def mlp_ratio(tower: str) -> float:
        width, hidden = integer(tower, "hidden_size"), integer(tower, "intermediate_size")
        if int(width * (hidden / width)) != hidden:
            raise CheckpointError(f"{path}: {tower}_config.intermediate_size {hidden} cannot be expressed as the "
                                  f"engine's hidden_size x mlp_ratio ({width} x {hidden / width!r})")
        return hidden / width

    projection = raw.get("projection_dim", _HF_PROJECTION_DIM)
    if not isinstance(projection, int) or isinstance(projection, bool) or projection <= 0:
        raise CheckpointError(f"{path}: projection_dim must be a positive integer, got {projection!r}")
    try:
        return FilipConfig(
            vision=VisionConfig(image_size=integer("vision", "image_size"), patch_size=integer("vision", "patch_size"),
                                width=integer("vision", "hidden_size"), layers=integer("vision", "num_hidden_layers"),
                                heads=heads["vision"], mlp_ratio=mlp_ratio("vision")),
            text=TextConfig(context_length=integer("text", "max_position_embeddings"), vocab_size=vocab,
                            width=integer("text", "hidden_size"), layers=integer("text", "num_hidden_layers"),
                            heads=heads["text"], mlp_ratio=mlp_ratio("text")),
            embed_dim=projection, token_dim=projection, token_head="shared", activation=acts["text"],
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: the architecture it describes is invalid: {e}") from e


def _hf_weights(directory: Path, chosen: Path | None) -> tuple[Path, dict]:
    """(the weights file, its tensors): model.safetensors, else its sharded index, else
    pytorch_model.bin (weights_only), else its index."""
    if chosen is None:
        chosen = next((directory / n for n in _HF_PREFERENCE if (directory / n).is_file()), None)
    if chosen is None:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        hint = (f"; it holds {others}, which transformers would not load as a CLIPModel (an OpenCLIP file "
                f"loads by its own path)") if others else ""
        raise CheckpointError(f"{directory}: no weights (a Hugging Face CLIPModel directory holds model.safetensors, "
                              f"pytorch_model.bin or a sharded model.safetensors.index.json){hint}")
    if not chosen.name.endswith(".index.json"):
        return chosen, _read_tensors(chosen)
    index = _read_json(chosen)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(f, str) for k, f in weight_map.items()):
        raise CheckpointError(f"{chosen}: no 'weight_map' of tensor names to shard files")
    sd: dict = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{chosen}: shard {shard!r} is not a file name inside the directory")
        tensors = _read_tensors(directory / shard)
        lacking = [k for k, f in weight_map.items() if f == shard and k not in tensors]
        if lacking:
            raise CheckpointError(f"{directory / shard}: lacks tensors its index {chosen.name} places there: {_limit(lacking)}")
        sd.update(tensors)
    return chosen, sd


def _read_tensors(path: Path) -> dict:
    obj = _read(path)
    if not isinstance(obj, Mapping) or obj.get("format") == NATIVE_FORMAT:
        raise CheckpointError(f"{path}: not a state dict of transformers' CLIPModel")
    return dict(obj)


def _hf_rules(cfg: FilipConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(native key, transformers keys, how): "copy", "t" (nn.Linear weight -> OpenAI's
    x @ proj matrix), "cat" (q, k, v -> in_proj, in that order), "scalar"."""
    V, T = "vision_model.", "text_model."

    def ln(native: str, hf: str):
        return [(f"{native}.weight", (f"{hf}.weight",), "copy"), (f"{native}.bias", (f"{hf}.bias",), "copy")]

    def blocks(native: str, hf: str, n: int):
        rules = []
        for i in range(n):
            a, b = f"{native}{i}.", f"{hf}{i}."
            for p in ("weight", "bias"):
                rules.append((f"{a}attn.in_proj_{p}", tuple(f"{b}self_attn.{x}_proj.{p}" for x in "qkv"), "cat"))
                rules.append((f"{a}attn.out_proj.{p}", (f"{b}self_attn.out_proj.{p}",), "copy"))
                rules.append((f"{a}mlp.c_fc.{p}", (f"{b}mlp.fc1.{p}",), "copy"))
                rules.append((f"{a}mlp.c_proj.{p}", (f"{b}mlp.fc2.{p}",), "copy"))
            rules += ln(f"{a}ln_1", f"{b}layer_norm1") + ln(f"{a}ln_2", f"{b}layer_norm2")
        return rules

    return [
        ("visual.class_embedding", (V + "embeddings.class_embedding",), "copy"),
        ("visual.conv1.weight", (V + "embeddings.patch_embedding.weight",), "copy"),
        ("visual.positional_embedding", (V + "embeddings.position_embedding.weight",), "copy"),
        *ln("visual.ln_pre", V + "pre_layrnorm"),
        *blocks("visual.transformer.resblocks.", V + "encoder.layers.", cfg.vision.layers),
        *ln("visual.ln_post", V + "post_layernorm"),
        ("visual.proj", ("visual_projection.weight",), "t"),
        ("token_embedding.weight", (T + "embeddings.token_embedding.weight",), "copy"),
        ("positional_embedding", (T + "embeddings.position_embedding.weight",), "copy"),
        *blocks("transformer.resblocks.", T + "encoder.layers.", cfg.text.layers),
        *ln("ln_final", T + "final_layer_norm"),
        ("text_projection", ("text_projection.weight",), "t"),
        ("logit_scale", ("logit_scale",), "scalar"),
    ]


def _hf_to_native(sd: Mapping, model: FilipModel, weights: Path, cfg_path: Path) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel keys -> ours, after checking every tensor's shape against the
    one config.json implies (reported in transformers' names)."""
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    rules = _hf_rules(model.config)
    assert {r[0] for r in rules} == set(expected), "the hf key rules must cover the model exactly"
    missing, bad_shape, not_tensor = [], [], []
    for native, hf_keys, how in rules:
        shape = expected[native]
        want = shape[::-1] if how == "t" else (shape[0] // 3, *shape[1:]) if how == "cat" else shape
        for k in hf_keys:
            if k not in sd:
                missing.append(k)
            elif not isinstance(sd[k], torch.Tensor):
                not_tensor.append(k)
            elif how == "scalar" and sd[k].numel() != 1 or how != "scalar" and tuple(sd[k].shape) != want:
                bad_shape.append(f"{k}: weights {tuple(sd[k].shape)} vs config {want}")
    used = {k for _, keys, _ in rules for k in keys}
    unexpected = [k for k in sd if k not in used and not (isinstance(k, str) and k.endswith("position_ids"))]
    problems = _weight_problems(bad_shape=bad_shape, missing=missing, unexpected=[str(k) for k in unexpected],
                                not_tensor=not_tensor)
    if problems:
        raise CheckpointError(f"{weights}: the weights do not match the CLIPModel that {cfg_path.name} describes: "
                              + ", ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for native, hf_keys, how in rules:
        ts = [sd[k] for k in hf_keys]
        if how == "cat":
            out[native] = torch.cat(ts, dim=0)
        elif how == "t":
            out[native] = ts[0].t()
        elif how == "scalar":
            out[native] = ts[0].reshape(())
        else:
            out[native] = ts[0]
    return out


def _hf_tokenizer_file(directory: Path) -> Path | None:
    """tokenizer.json, else merges.txt (whose vocab.json ClipTokenizer.from_file then checks);
    tokenizer_config.json, where present, must name CLIP's tokenizer and special tokens."""
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        data = _read_json(tc)
        cls = data.get("tokenizer_class")
        if cls is not None and cls not in ("CLIPTokenizer", "CLIPTokenizerFast"):
            raise CheckpointError(f"{tc}: tokenizer_class {cls!r} is not CLIP's BPE tokenizer (CLIPTokenizer), "
                                  f"the only one the engine reproduces")
        for key, want in (("bos_token", _CLIP_SOT), ("eos_token", _CLIP_EOT)):
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and value != want:
                raise CheckpointError(f"{tc}: {key} is {value!r}, but the engine's tokenizer adds CLIP's {want!r}")
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    merges, vocab = directory / "merges.txt", directory / "vocab.json"
    if merges.is_file() and vocab.is_file():
        return merges
    if merges.is_file() or vocab.is_file():
        have, lack = (merges, vocab) if merges.is_file() else (vocab, merges)
        raise CheckpointError(f"{have}: has no {lack.name} beside it (and there is no tokenizer.json), and "
                              f"transformers' CLIP tokenizer needs both")
    return None


def _hf_image_processor(path: Path, image_size: int) -> dict:
    """preprocessor_config.json, completed with CLIPImageProcessor's defaults; settings the
    engine's recipe (bicubic shortest-edge resize, centre crop, /255, mean/std) cannot
    reproduce are refused."""
    raw = _read_json(path)
    kind = raw.get("image_processor_type") or raw.get("feature_extractor_type") or "CLIPImageProcessor"
    if kind not in _HF_IMAGE_TYPES:
        raise CheckpointError(f"{path}: {kind!r} is not CLIP's image processor (CLIPImageProcessor), whose recipe "
                              f"the engine reproduces")
    d = {**_HF_IMAGE_DEFAULTS, **{k: raw[k] for k in _HF_IMAGE_DEFAULTS if k in raw}}

    def refuse(what: str):
        raise CheckpointError(f"{path}: {what}")

    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
        if not isinstance(d[key], bool):
            refuse(f"{key} must be true or false, got {d[key]!r}")
    if not d["do_resize"]:
        refuse("do_resize is false (images would reach the model at the size they come in), but the engine "
               "always resizes the shortest edge")
    size = d["size"]
    if isinstance(size, int) and not isinstance(size, bool) and not raw.get("use_square_size"):
        size = {"shortest_edge": size}   # the legacy form: an int means the shortest edge for CLIP
    if not (isinstance(size, dict) and set(size) - {"longest_edge"} == {"shortest_edge"} and size.get("longest_edge") is None):
        refuse(f"size {d['size']!r} is not {{'shortest_edge': N}}, the only resize the engine reproduces "
               f"(shortest edge to N, aspect ratio kept)")
    edge = size["shortest_edge"]
    if not isinstance(edge, int) or isinstance(edge, bool) or edge <= 0:
        refuse(f"size.shortest_edge must be a positive integer, got {edge!r}")
    if d["resample"] != 3:
        name = _PIL_FILTERS.get(d["resample"], "unknown") if isinstance(d["resample"], int) else "unknown"
        refuse(f"resample {d['resample']!r} ({name}) is not bicubic (3), the only resampling the engine reproduces")
    if not d["do_center_crop"]:
        refuse("do_center_crop is false, so the model would see uncropped, non-square images, which the engine "
               "never produces")
    crop = d["crop_size"]
    if isinstance(crop, int) and not isinstance(crop, bool):
        crop = {"height": crop, "width": crop}
    if not (isinstance(crop, dict) and set(crop) == {"height", "width"}
            and all(isinstance(crop[k], int) and not isinstance(crop[k], bool) for k in crop)):
        refuse(f"crop_size {d['crop_size']!r} is not {{'height': N, 'width': N}}")
    if crop["height"] != image_size or crop["width"] != image_size:
        refuse(f"crop_size {crop['height']}x{crop['width']} is not the model's image size "
               f"{image_size}x{image_size} (config.json vision_config.image_size)")
    factor = d["rescale_factor"]
    if not d["do_rescale"] or not isinstance(factor, (int, float)) or not math.isclose(factor, 1 / 255, rel_tol=1e-9):
        refuse(f"do_rescale={d['do_rescale']!r} with rescale_factor={factor!r} is not the engine's /255 "
               f"(do_rescale true, rescale_factor 1/255)")
    stats = {}
    for key in ("image_mean", "image_std"):
        value = d[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not (isinstance(value, list) and len(value) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)):
            refuse(f"{key} must be 3 finite numbers (one per RGB channel), got {d[key]!r}")
        stats[key] = [float(x) for x in value]
    if any(x <= 0 for x in stats["image_std"]):
        refuse(f"image_std {d['image_std']!r} has a value that is not positive")
    if raw.get("do_pad"):
        refuse("do_pad is true, which CLIP's recipe does not do and the engine does not reproduce")
    if not d["do_normalize"]:   # the mean/std then applied are the identity
        stats = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}
    return {"image_processor_type": kind, "do_resize": True, "size": {"shortest_edge": edge}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": crop["height"], "width": crop["width"]},
            "do_rescale": True, "rescale_factor": float(factor), "do_normalize": d["do_normalize"],
            "image_mean": stats["image_mean"], "image_std": stats["image_std"], "do_convert_rgb": d["do_convert_rgb"]}

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
