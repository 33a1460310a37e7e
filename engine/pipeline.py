"""In-process FILIP: tokenizer + image transform + both towers on one runtime + scoring.

This is what the Triton adapters and the benchmark's in-process side call; it returns the
same typed :class:`Embeddings` as the client library.

    pipe = FilipPipeline.from_repository("triton_models")             # ONNX Runtime
    pipe = FilipPipeline.from_checkpoint("ckpt.pt")                    # PyTorch reference
    img = pipe.embed_images(["cat.jpg", pil_image, uint8_array, jpeg_bytes])
    txt = pipe.embed_texts(["a photo of a cat", "a dog"])
    pipe.score(img, txt)                      # [n_img, n_txt] by the checkpoint's scoring rule
    pipe.score(img, txt, scoring="token", direction="t2i")    # s_T; "i2t" (default): s_I
    pipe.score(img, txt, scoring="global")    # cosine of the pooled embeddings
    pipe.classify(img, ["cat", "dog"])        # zero-shot, prompt ensemble (CLIP's rule when global)

``scoring=None`` uses the checkpoint's rule (``pipe.default_scoring``): "global" for CLIP
checkpoints (OpenAI / OpenCLIP state dicts, Hugging Face directories), "token" for FILIP.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from filip_contract.scoring import check_scoring, class_embeddings, cosine

from .artifacts import default_scoring_of, engine_of, image_transform_of, read_manifest
from .checkpoint import LoadedCheckpoint, load_checkpoint
from .config import FilipConfig
from .errors import InvalidInputError, TokenizerError
from .interaction import DEFAULT_TEMPLATES, alignment_map, build_prompts, late_interaction, zero_shot_scores
from .io_spec import tower_spec
from .preprocess import ImageInput, ImageTransform
from .precision import open_cpu_runtime
from .runtime import Runtime, TorchRuntime
from .tokenizer import ClipTokenizer, find_clip_merges_file


@dataclass(frozen=True)
class Embeddings:
    """tokens float32 [N, T, D] (zero past each row's length), lengths int32 [N],
    pooled float32 [N, E] (L2-normalised projected CLS / EOT)."""
    tokens: np.ndarray
    lengths: np.ndarray
    pooled: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, idx) -> "Embeddings":
        """Rows ``idx`` (an int or a slice), as the client's Embeddings."""
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return Embeddings(self.tokens[idx], self.lengths[idx], self.pooled[idx])


def _concat(parts: list[Embeddings]) -> Embeddings:
    """Concatenate batches whose token axes may differ (texts padded per batch)."""
    t = max(p.tokens.shape[1] for p in parts)
    tokens = np.concatenate([np.pad(p.tokens, ((0, 0), (0, t - p.tokens.shape[1]), (0, 0))) for p in parts])
    return Embeddings(tokens, np.concatenate([p.lengths for p in parts]), np.concatenate([p.pooled for p in parts]))


def load_tokenizer(cfg: FilipConfig, *, vocab: str | Path | None = None, embedded: str | None = None,
                   bundled: str | Path | None = None) -> tuple[ClipTokenizer, str]:
    """The tokenizer for a model: ``vocab`` (a merges file or tokenizer.json) if given, else the
    tokenizer file of a checkpoint directory (``bundled``), else the merges text a native
    checkpoint carries, else the CLIP merges file shipped in installed packages.  Returns it
    with a description of its source; the vocabulary size must match."""
    kw = dict(vocab_size=cfg.text.vocab_size, context_length=cfg.text.context_length)
    if vocab is not None:
        tok, source = ClipTokenizer.from_file(vocab, **kw), str(vocab)
    elif bundled is not None:
        tok, source = ClipTokenizer.from_file(bundled, **kw), str(bundled)
    elif embedded is not None:
        tok, source = ClipTokenizer.from_merges_text(embedded, **kw), "the checkpoint"
    else:
        path = find_clip_merges_file()
        tok, source = ClipTokenizer.from_file(path, **kw), str(path)
    if tok.vocab_size != cfg.text.vocab_size:
        raise TokenizerError(f"the vocabulary from {source} has {tok.vocab_size} entries but the model's "
                             f"token_embedding has {cfg.text.vocab_size}")
    return tok, source


def checkpoint_transform(ckpt: LoadedCheckpoint, **limits) -> ImageTransform:
    """The preprocessing of the checkpoint's own library: transformers' processor settings for
    a Hugging Face directory, an OpenCLIP directory's own normalisation, else OpenCLIP's eval
    transform at the tower's size."""
    if ckpt.preprocess is not None:
        return ImageTransform.from_dict(ckpt.preprocess, **limits)
    if ckpt.image_processor is not None:
        return ImageTransform.from_image_processor(ckpt.image_processor, **limits)
    return ImageTransform(ckpt.config.vision.image_size, **limits)


class FilipPipeline:
    def __init__(self, config: FilipConfig, tokenizer: ClipTokenizer, image_runtime: Runtime,
                 text_runtime: Runtime, *, logit_scale: float = 100.0, transform: ImageTransform | None = None,
                 default_scoring: str = "token"):
        self.config = config
        self.tokenizer = tokenizer
        self.transform = transform or ImageTransform(config.vision.image_size)
        if self.transform.image_size != config.vision.image_size:
            raise InvalidInputError(f"the transform crops to {self.transform.image_size} px; the image tower "
                                    f"takes {config.vision.image_size} px")
        self.image_runtime = image_runtime
        self.text_runtime = text_runtime
        self.logit_scale = logit_scale
        self.default_scoring = self._scoring(default_scoring)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, *, vocab: str | Path | None = None, device: str = "cpu",
                        activation: str | None = None) -> "FilipPipeline":
        ck = load_checkpoint(path, activation=activation)
        cfg = ck.config
        tok, _ = load_tokenizer(cfg, vocab=vocab, embedded=ck.vocab_text, bundled=ck.tokenizer_file)
        scale = ck.model.similarity_scale()
        return cls(cfg, tok, TorchRuntime(ck.model, tower_spec(cfg, "image"), device),
                   TorchRuntime(ck.model, tower_spec(cfg, "text"), device), logit_scale=scale,
                   transform=checkpoint_transform(ck), default_scoring=ck.default_scoring)

    @classmethod
    def from_repository(cls, repo: str | Path, *, intra_op_threads: int | None = None) -> "FilipPipeline":
        """Load the encoders of a model repository written by ``export/to_trt.py``
        (``filip_text/1``: text.onnx, tokenizer.json; ``filip_image/1``: image.onnx), each on
        the CPU engine its manifest records (fp32 ONNX Runtime, OpenVINO bf16, int8)."""
        text_dir, image_dir = Path(repo) / "filip_text" / "1", Path(repo) / "filip_image" / "1"
        cfg, manifest = read_manifest(text_dir)
        tok = ClipTokenizer.from_file(text_dir / "tokenizer.json", vocab_size=cfg.text.vocab_size,
                                      context_length=cfg.text.context_length)
        img = open_cpu_runtime(image_dir, "image", tower_spec(cfg, "image"), engine_of(read_manifest(image_dir)[1]),
                               threads=intra_op_threads)
        txt = open_cpu_runtime(text_dir, "text", tower_spec(cfg, "text"), engine_of(manifest), threads=intra_op_threads)
        return cls(cfg, tok, img, txt, logit_scale=float(manifest["logit_scale"]),
                   transform=image_transform_of(manifest, cfg), default_scoring=default_scoring_of(manifest))

    # --- embedding -----------------------------------------------------------------------
    def embed_images(self, images: Sequence[ImageInput], *, batch_size: int = 16) -> Embeddings:
        if isinstance(images, (str, bytes, np.ndarray)) or not isinstance(images, Sequence) or not images:
            raise InvalidInputError("embed_images expects a non-empty list of images")
        parts = []
        for i in range(0, len(images), batch_size):
            pixels = self.transform.batch(images[i:i + batch_size], start=i)
            out = self.image_runtime.infer({"pixel_values": pixels})
            n, p = out["tokens"].shape[:2]
            parts.append(Embeddings(out["tokens"], np.full(n, p, np.int32), out["pooled"]))
        return _concat(parts)

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> Embeddings:
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise InvalidInputError("embed_texts expects a non-empty list of strings")
        parts = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[i:i + batch_size]), pad_to="longest")
            out = self.text_runtime.infer({"input_ids": batch.ids, "lengths": batch.lengths.astype(np.int64)})
            parts.append(Embeddings(out["tokens"], batch.lengths.astype(np.int32), out["pooled"]))
        return _concat(parts)

    # --- scoring -------------------------------------------------------------------------
    def _scoring(self, scoring: str | None) -> str:
        return check_scoring(self.default_scoring if scoring is None else scoring, InvalidInputError)

    def score(self, images: Embeddings, texts: Embeddings, *, direction: str = "i2t",
              scoring: str | None = None) -> np.ndarray:
        """[n_img, n_txt]. ``scoring="token"``: s_I (``direction="i2t"``, rank texts for an
        image) or s_T ("t2i"); ``"global"``: cosine of the pooled embeddings (symmetric, so
        ``direction`` does not change it). ``None``: the checkpoint's rule."""
        if direction not in ("i2t", "t2i"):
            raise InvalidInputError(f"direction must be 'i2t' or 't2i', got {direction!r}")
        if self._scoring(scoring) == "global":
            return cosine(images.pooled, texts.pooled)
        s = late_interaction(images.tokens, images.lengths, texts.tokens, texts.lengths)
        return s.s_i if direction == "i2t" else s.s_t

    def classify(self, images: Embeddings, labels: Sequence[str], *, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 mode: str = "mean", scoring: str | None = None) -> np.ndarray:
        """Zero-shot scores [n_img, n_labels]. ``scoring="token"`` (FILIP): the mean over
        templates of s_I (``mode="mean"``) or of softmax probabilities ("softmax").
        ``"global"`` (CLIP's rule): per class the mean of the normalised template embeddings,
        renormalised; its cosine with the image embedding (``mode`` must be "mean")."""
        prompts = self.embed_texts(build_prompts(labels, templates))
        if self._scoring(scoring) == "global":
            if mode != "mean":
                raise InvalidInputError(f"mode {mode!r} applies to token scoring; global zero-shot is CLIP's "
                                        "mean of template embeddings (mode='mean')")
            return cosine(images.pooled, class_embeddings(prompts.pooled, len(labels), len(templates)))
        return zero_shot_scores(images.tokens, images.lengths, prompts.tokens, prompts.lengths,
                                n_classes=len(labels), n_templates=len(templates), mode=mode,
                                logit_scale=self.logit_scale)

    def alignment(self, images: Embeddings, texts: Embeddings, i: int = 0, j: int = 0) -> np.ndarray:
        """Word-patch alignment of image i and text j on the patch grid: index of each patch's best token."""
        g = self.config.vision.grid
        return alignment_map(images.tokens[i], int(images.lengths[i]), texts.tokens[j], int(texts.lengths[j]), grid=(g, g))
