"""Synthetic galleries with clustered token structure, for search benchmarks and tests.

The model (all vectors in R^D, unit length after each step; ``normalize`` = L2 per token):

- ``topics`` topic centres ``c_t`` and ``words`` visual-word directions ``w_v``, Gaussian.
- Topic t owns ``words_per_topic`` words (drawn without replacement from all words).
- Item i: a topic t_i (uniform), then each of its P patch tokens is
  ``normalize(0.6 * c_t + 1.0 * w_v + 0.5 * e / sqrt(D))`` with v drawn from t's words and
  e standard normal: items of a topic share a direction, and each item has its own mix of
  words (so items of one topic are not interchangeable).
- pooled_i = ``normalize(c_t + 0.3 * e / sqrt(D))`` (stands in for the CLS embedding).
- A query for a target item i has T tokens (uniform in [6, 20]): two shared "SOT/EOT"
  tokens ``normalize(s + 0.1 e)``, and T-2 tokens ``normalize(0.6 * c_t + 1.0 * w_v + 0.7 * e / sqrt(D))``
  with v drawn from the words actually present in item i.  A query therefore prefers its
  target, then other items holding the same words, then its topic.

Everything derives from ``seed``: the same arguments give the same gallery, bit for bit.
Numpy only (the client needs no torch).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from filip_contract.gallery_writer import GalleryWriter

QUERY_FILE = "synthetic-queries.npz"


def _norm(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


class SyntheticSpec:
    def __init__(self, *, dim: int = 256, tokens: int = 49, topics: int = 1000, words: int = 4096,
                 words_per_topic: int = 24, seed: int = 0):
        self.dim, self.tokens, self.seed = dim, tokens, seed
        self.params = {"synthetic": True, "dim": dim, "tokens": tokens, "topics": topics, "words": words,
                       "words_per_topic": words_per_topic, "seed": seed}
        rng = np.random.default_rng(seed)
        self.centres = _norm(rng.standard_normal((topics, dim), dtype=np.float32))
        self.words = _norm(rng.standard_normal((words, dim), dtype=np.float32))
        self.topic_words = np.stack([rng.choice(words, words_per_topic, replace=False) for _ in range(topics)])
        self.special = _norm(rng.standard_normal((2, dim), dtype=np.float32))

    def items(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Items start..start+n -> (topics [n], word ids [n, P], tokens [n, P, D] fp32, pooled [n, D])."""
        rng = np.random.default_rng([self.seed, 1, start])
        topic = rng.integers(0, len(self.centres), n)
        pick = rng.integers(0, self.topic_words.shape[1], (n, self.tokens))
        wid = self.topic_words[topic[:, None], pick]
        noise = rng.standard_normal((n, self.tokens, self.dim), dtype=np.float32)
        noise *= 0.5 / np.sqrt(self.dim)
        noise += self.words[wid]
        noise += 0.6 * self.centres[topic][:, None, :]
        tokens = _norm(noise)
        pooled = _norm(self.centres[topic] + 0.3 / np.sqrt(self.dim) * rng.standard_normal((n, self.dim), dtype=np.float32))
        return topic, wid, tokens, pooled

    def queries(self, targets: np.ndarray, topics: np.ndarray, word_ids: np.ndarray, seed: int = 1):
        """Queries for target items (their topics and word ids) -> (tokens [nq, 20, D] padded, lengths [nq])."""
        rng = np.random.default_rng([self.seed, 2, seed])
        nq, t_max = len(targets), 20
        lengths = rng.integers(6, t_max + 1, nq).astype(np.int32)
        out = np.zeros((nq, t_max, self.dim), np.float32)
        for q in range(nq):
            n = lengths[q]
            out[q, 0] = self.special[0] + 0.1 / np.sqrt(self.dim) * rng.standard_normal(self.dim)
            out[q, n - 1] = self.special[1] + 0.1 / np.sqrt(self.dim) * rng.standard_normal(self.dim)
            v = rng.choice(word_ids[q], n - 2)
            out[q, 1:n - 1] = (0.6 * self.centres[topics[q]] + self.words[v]
                               + 0.7 / np.sqrt(self.dim) * rng.standard_normal((n - 2, self.dim)))
            out[q, :n] = _norm(out[q, :n])
        return out, lengths


def synthesize(path: str | Path, n: int, *, token_dtype: str = "float16", segment: int = 50_000, n_queries: int = 64,
               spec: SyntheticSpec | None = None, progress: bool = False) -> dict:
    """Write an ``n``-item synthetic gallery at ``path`` (ids ``item-<row>``, metadata
    {"topic": t}) plus ``synthetic-queries.npz`` (query tokens, lengths, target ids) beside
    its manifest.  Resumes like any gallery: segments already committed are kept.  Returns
    figures: items written, seconds, items/s of the writer alone."""
    spec = spec or SyntheticSpec()
    path = Path(path)
    qfile = path / QUERY_FILE
    if qfile.exists() and (path / "gallery.json").exists():
        import json
        m = json.loads((path / "gallery.json").read_text())
        z = np.load(qfile)
        if m.get("count") == n and len(z["targets"]) == min(n_queries, n) and m.get("model") == spec.params:
            return {"items": n, "written": 0, "generate_s": 0.0, "write_s": 0.0, "write_items_per_s": None}
    rng = np.random.default_rng([spec.seed, 3])
    targets = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    t_topics, t_words = np.zeros(len(targets), np.int64), np.zeros((len(targets), spec.tokens), np.int64)
    gen_s = write_s = 0.0
    with GalleryWriter(path, token_dtype=token_dtype, model=spec.params) as w:
        done = w.count
        for a in range(0, n, segment):
            b = min(a + segment, n)
            t = time.perf_counter()
            topic, wid, tokens, pooled = spec.items(a, b - a)
            gen_s += time.perf_counter() - t
            mine = (targets >= a) & (targets < b)
            t_topics[mine], t_words[mine] = topic[targets[mine] - a], wid[targets[mine] - a]
            if b <= done:
                continue                       # committed by an earlier run (same seed: same items)
            t = time.perf_counter()
            w.add([f"item-{r}" for r in range(a, b)], tokens, pooled, [{"topic": int(x)} for x in topic])
            write_s += time.perf_counter() - t
            if progress:
                print(f"  {path.name}: {b}/{n} items", flush=True)
    q_tokens, q_lengths = spec.queries(targets, t_topics, t_words)
    np.savez(path / QUERY_FILE, tokens=q_tokens, lengths=q_lengths, targets=np.array([f"item-{r}" for r in targets]))
    written = n - done
    return {"items": n, "written": written, "generate_s": gen_s, "write_s": write_s,
            "write_items_per_s": written / write_s if write_s else None}


def load_queries(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    z = np.load(Path(path) / QUERY_FILE)
    return z["tokens"], z["lengths"], [str(t) for t in z["targets"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gallery_synth", description="Write a synthetic FILIP gallery.")
    p.add_argument("path", type=Path)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--token-dtype", choices=["float16", "int8"], default="float16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(synthesize(args.path, args.items, token_dtype=args.token_dtype, spec=SyntheticSpec(seed=args.seed), progress=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
