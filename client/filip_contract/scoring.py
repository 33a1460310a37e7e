"""The two scoring rules, and CLIP's zero-shot classifier, declared once (numpy only).

- ``"token"``: FILIP's late interaction on the token embeddings: s_I (image-to-text: the
  mean over patches of each patch's best text token) and s_T (text-to-image: the mean over
  the text's real tokens of each token's best patch).
- ``"global"``: the cosine of the pooled embeddings (CLIP's rule). Zero-shot by CLIP's own
  recipe (OpenCLIP's ``build_zero_shot_classifier``): per class, every template's text
  embedding L2-normalised, their mean, normalised again; the class score is its cosine
  with the normalised image embedding.

Which rule a repository uses by default follows its checkpoint (recorded at export):
"global" for CLIP checkpoints (OpenAI / OpenCLIP state dicts, Hugging Face CLIPModel
directories), whose patch tokens were never trained to match words, "token" for FILIP ones.
"""
from __future__ import annotations

import numpy as np

SCORINGS = ("token", "global")
DEFAULT_PARAM = "default_scoring"     # the config parameter of filip_score / filip_search


def check_scoring(scoring: str, error: type[Exception] = ValueError, name: str = "scoring") -> str:
    """``scoring`` if it is one of :data:`SCORINGS`; else ``error`` (the caller's own error
    type: each side says whose fault it is) naming ``name`` and the choices."""
    if scoring not in SCORINGS:
        raise error(f"{name} must be one of {SCORINGS}, got {scoring!r}")
    return scoring


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, np.float32(1), n)


def cosine(image_pooled: np.ndarray, text_pooled: np.ndarray) -> np.ndarray:
    """float32 [n_img, n_txt] cosines of the pooled embeddings."""
    return normalise(image_pooled) @ normalise(text_pooled).T


def class_embeddings(prompt_pooled: np.ndarray, n_classes: int, n_templates: int) -> np.ndarray:
    """CLIP's zero-shot classifier from class-major prompt embeddings (prompt ``c * T + t``
    is template t of class c) -> float32 [n_classes, E], rows unit length."""
    e = normalise(prompt_pooled)
    if e.shape[0] != n_classes * n_templates:
        raise ValueError(f"{e.shape[0]} prompt embeddings for {n_classes} classes x {n_templates} templates")
    return normalise(e.reshape(n_classes, n_templates, -1).mean(axis=1))
