"""The manifest written beside exported artifacts, so a server needs nothing else:
the model config, the token-wise temperature, where the weights came from, and versions."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from .config import FilipConfig
from .errors import CheckpointError

MANIFEST_NAME = "filip_config.json"
MANIFEST_VERSION = 1


def write_manifest(directory: str | Path, config: FilipConfig, *, logit_scale: float, layout: str,
                   source: str, extra: dict | None = None) -> Path:
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
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        **(extra or {}),
    }, indent=2, sort_keys=True) + "\n")
    return path


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
