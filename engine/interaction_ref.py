"""The slow, obviously-right NumPy reference of FILIP's late interaction (float64, loops).

``x``: one image's real patch tokens [n1, D]; ``y``: one text's real tokens [n2, D]
(SOT and EOT included, padding already removed).  See FILIP.md.
"""
from __future__ import annotations

import numpy as np


def s_i_ref(x: np.ndarray, y: np.ndarray) -> float:
    """image-to-text: (1/n1) * sum_k max_r <x_k, y_r>."""
    sim = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    return float(sim.max(axis=1).mean())


def s_t_ref(x: np.ndarray, y: np.ndarray) -> float:
    """text-to-image: (1/n2) * sum_r max_k <x_k, y_r>."""
    sim = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    return float(sim.max(axis=0).mean())


def scores_ref(img_tokens, img_lengths, txt_tokens, txt_lengths) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices [N_img, N_txt] by looping over every pair."""
    s_i = np.zeros((len(img_lengths), len(txt_lengths)))
    s_t = np.zeros_like(s_i)
    for i, n1 in enumerate(img_lengths):
        for j, n2 in enumerate(txt_lengths):
            x, y = img_tokens[i, :int(n1)], txt_tokens[j, :int(n2)]
            s_i[i, j], s_t[i, j] = s_i_ref(x, y), s_t_ref(x, y)
    return s_i, s_t


def zero_shot_ref(img_tokens, img_lengths, prompt_tokens, prompt_lengths, n_classes: int, n_templates: int,
                  mode: str = "mean", logit_scale: float = 100.0) -> np.ndarray:
    """Prompts class-major (all templates of class 0, then class 1, ...) -> [N_img, C]."""
    s_i, _ = scores_ref(img_tokens, img_lengths, prompt_tokens, prompt_lengths)
    out = np.zeros((len(img_lengths), n_classes))
    for i in range(len(img_lengths)):
        for c in range(n_classes):
            if mode == "mean":
                out[i, c] = np.mean([s_i[i, c * n_templates + t] for t in range(n_templates)])
            else:
                probs = []
                for t in range(n_templates):
                    logits = np.array([logit_scale * s_i[i, k * n_templates + t] for k in range(n_classes)])
                    e = np.exp(logits - logits.max())
                    probs.append(e[c] / e.sum())
                out[i, c] = np.mean(probs)
    return out


def alignment_ref(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For each real patch, the index of its most similar real text token."""
    sim = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    return np.array([int(np.argmax(row)) for row in sim], dtype=np.int64)
