"""The slow, obviously-right NumPy reference of FILIP's late interaction (float64, loops).

This is the specification :mod:`filip_engine.interaction` is tested against; it is written for
reading, not for speed.  ``x`` is one image's real patch tokens [n1, D] and ``y`` one text's
real tokens [n2, D] (SOT and EOT included, padding already cut off); docs/ARCHITECTURE.md, "Late interaction".
"""
from __future__ import annotations

import numpy as np


def _sim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n1, n2] token-pair dot products <x_k, y_r> in float64."""
    return np.asarray(x, np.float64) @ np.asarray(y, np.float64).T


def s_i_ref(x: np.ndarray, y: np.ndarray) -> float:
    """image-to-text: (1/n1) * sum_k max_r <x_k, y_r>  (the best word for each patch)."""
    sim = _sim(x, y)
    return sum(max(sim[k]) for k in range(sim.shape[0])) / sim.shape[0]


def s_t_ref(x: np.ndarray, y: np.ndarray) -> float:
    """text-to-image: (1/n2) * sum_r max_k <x_k, y_r>  (the best patch for each word)."""
    sim = _sim(x, y)
    return sum(max(sim[:, r]) for r in range(sim.shape[1])) / sim.shape[1]


def scores_ref(img_tokens, img_lengths, txt_tokens, txt_lengths) -> tuple[np.ndarray, np.ndarray]:
    """(s_I, s_T), each [N_img, N_txt] float64, by looping over every (image, text) pair and
    cutting each item to its length."""
    s_i = np.zeros((len(img_lengths), len(txt_lengths)))
    s_t = np.zeros_like(s_i)
    for i, n1 in enumerate(img_lengths):
        for j, n2 in enumerate(txt_lengths):
            x, y = img_tokens[i][:int(n1)], txt_tokens[j][:int(n2)]
            s_i[i, j], s_t[i, j] = s_i_ref(x, y), s_t_ref(x, y)
    return s_i, s_t


def zero_shot_ref(img_tokens, img_lengths, prompt_tokens, prompt_lengths, n_classes: int, n_templates: int,
                  mode: str = "mean", logit_scale: float = 100.0) -> np.ndarray:
    """[N_img, C] float64.  Prompts are class-major: prompt ``c * n_templates + t`` is
    template t of class c.  "mean": mean over t of s_I(img, prompt(c, t));
    "softmax": mean over t of softmax over classes of ``logit_scale * s_I``."""
    s_i, _ = scores_ref(img_tokens, img_lengths, prompt_tokens, prompt_lengths)
    out = np.zeros((len(img_lengths), n_classes))
    for i in range(len(img_lengths)):
        for c in range(n_classes):
            per_template = []
            for t in range(n_templates):
                if mode == "mean":
                    per_template.append(s_i[i, c * n_templates + t])
                else:
                    logits = [logit_scale * s_i[i, k * n_templates + t] for k in range(n_classes)]
                    top = max(logits)
                    per_template.append(np.exp(logits[c] - top) / sum(np.exp(v - top) for v in logits))
            out[i, c] = sum(per_template) / n_templates
    return out


def alignment_ref(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """int64 [n1]: for each real patch, the index of its most similar real text token
    (0 = SOT; the first index on a tie)."""
    sim = _sim(x, y)
    return np.array([int(np.argmax(sim[k])) for k in range(sim.shape[0])], dtype=np.int64)
