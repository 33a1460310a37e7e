"""The manifest written beside exported artifacts, so a server needs nothing else:
the model config, the token-wise temperature, where the weights came from, and versions."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from filip_contract.scoring import check_scoring

from .config import FilipConfig
from .errors import CheckpointError
from .preprocess import ImageTransform

MANIFEST_NAME = "filip_config.json"
MANIFEST_VERSION = 1


def write_manifest(directory: str | Path, config: FilipConfig, *, logit_scale: float, layout: str,
                   source: str, preprocess: dict, default_scoring: str, extra: dict | None = None) -> Path:
    import onnx
    import onnxruntime
    import torch

    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps({
        "manifest_version": MANIFEST_VERSION,
        "model": config.to_dict(),
        "logit_scale": logit_scale,
        "checkpoint_layout": layout,
        "checkpoint": source,                    # the file name only: a repository names no path of this machine
        "preprocess": preprocess,                # ImageTransform.to_dict(): the checkpoint's own recipe
        "default_scoring": check_scoring(default_scoring),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        **(extra or {}),
    }, indent=2, sort_keys=True) + "\n")
    return path


def update_manifest(directory: str | Path, **entries) -> Path:
    """Add or replace top-level entries of a manifest written by :func:`write_manifest`."""
    path = Path(directory) / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(entries)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def engine_of(manifest: dict):
    """The CPU engine a tower's manifest records (:class:`filip_engine.precision.TowerEngine`;
    none recorded: fp32 ONNX Runtime)."""
    from .precision import TowerEngine
    return TowerEngine.from_mapping(manifest.get("engine"))


def read_manifest(directory: str | Path) -> tuple[FilipConfig, dict]:
    """(config, the whole manifest).  A missing or malformed manifest is a CheckpointError."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run `python export/to_trt.py CKPT --out ...` first")
    try:
        data = json.loads(path.read_text())
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"manifest_version {data.get('manifest_version')!r}, expected {MANIFEST_VERSION}")
        return FilipConfig.from_dict(data["model"]), data
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed manifest: {e}") from e


def image_transform_of(manifest: dict, config: FilipConfig, **limits) -> ImageTransform:
    """The preprocessing a repository was exported with (OpenCLIP's at the tower's size for
    a manifest that records none)."""
    recipe = manifest.get("preprocess")
    if recipe is None:
        return ImageTransform(config.vision.image_size, **limits)
    t = ImageTransform.from_dict(recipe, **limits)
    if t.image_size != config.vision.image_size:
        raise CheckpointError(f"the manifest's preprocessing crops to {t.image_size} px but the image tower "
                              f"takes {config.vision.image_size} px")
    return t


def default_scoring_of(manifest: dict) -> str:
    """The scoring rule a repository uses when a request names none ("token" for a manifest
    that records none: FILIP's)."""
    return check_scoring(manifest.get("default_scoring", "token"))
