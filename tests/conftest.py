"""Shared fixtures; GPU-only tests (marker `gpu`) are skipped with a stated reason on CPU machines."""
from __future__ import annotations

import pytest
import torch

from filip_engine.checkpoint import random_model, save_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; this machine has none (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def clip_merges_text() -> str:
    from filip_engine.tokenizer import ClipTokenizer, find_clip_merges_file
    return ClipTokenizer.from_file(find_clip_merges_file()).merges_text


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, clip_merges_text):
    """A random tiny native checkpoint carrying the CLIP vocabulary."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, random_model("tiny", seed=5), vocab_text=clip_merges_text)
    return path
