"""CLIP's lower-cased byte-level BPE on Hugging Face ``tokenizers``, id-for-id equal to CLIP's
reference tokenizer (OpenAI's ``simple_tokenizer``, copied by OpenCLIP and DeCLIP).

Pipeline, as the reference does it:
1. clean in Python: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse ``\\s+`` to
   one space, strip, lower-case.  This stays in Python on purpose: Rust's normalisers do
   not have ftfy, and Python's ``\\s`` / ``str.lower`` differ from Rust's Unicode tables on
   a few code points (e.g. U+001C..U+001F are whitespace to Python), so doing it here is
   what makes the ids exact;
2. split with CLIP's regex (``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``,
   matches kept, the rest dropped), map bytes to CLIP's unicode alphabet (ByteLevel);
3. BPE with the ``</w>`` end-of-word suffix and CLIP's merge ranks (``tokenizers.models.BPE``);
4. ``[SOT] + ids + [EOT]``, truncated to the context with EOT kept last.

Text never produces control tokens: a literal ``<|endoftext|>`` in a caption is tokenised
as the characters it is made of, as OpenCLIP's tokenizer does (OpenAI's original mapped it
to EOT; OpenCLIP instead maps its own spelling ``<end_of_text>``, which we also leave as
text).  Only the SOT/EOT the tokenizer adds are special.  Vocabulary sources: a CLIP merges file (``bpe_simple_vocab_16e6.txt`` or
``.txt.gz``), a Hugging Face ``tokenizer.json`` holding a CLIP BPE, a Hugging Face
``merges.txt`` with its ``vocab.json`` beside it, or the merges text a native checkpoint
carries.  ``vocab_size=49409`` selects DeCLIP's variant (``<|mask|>`` inserted before SOT,
so SOT/EOT ids shift by +1).

Text cleaning (``cleaning=``) comes in two kinds, because transformers' ``CLIPTokenizer``
does not clean text the way CLIP's reference does:

- ``"openai"`` (the reference, step 1 above): ftfy, HTML unescaping, whitespace, lower case.
- ``"hf"`` (transformers' ``CLIPTokenizer``, the only CLIP tokenizer of transformers 5, and
  v4's ``CLIPTokenizerFast``): Unicode NFC, ``\\s+`` -> one space, lower case, done by the
  same Rust normalisers transformers uses.  No ftfy and no HTML unescaping, so ``&amp;``,
  curly quotes (``don’t``), ligatures (``ﬁ``), full-width letters and mojibake give other
  ids than the reference.  The split, the BPE and the truncation are the same as in
  ``"openai"``.  One difference from transformers is kept on purpose: a literal
  ``<|endoftext|>`` / ``<|startoftext|>`` in a caption stays text here, while transformers
  maps it to the special id (and its CLIP then pools the text at that first EOS).

:meth:`ClipTokenizer.from_file` picks the kind from the file unless told: ``"hf"`` for a
``tokenizer.json`` carrying transformers' CLIP normaliser and for a ``merges.txt`` with a
``vocab.json`` beside it (the files transformers reads), ``"openai"`` for a CLIP merges file,
a ``tokenizer.json`` without a normaliser, and the merges text of a native checkpoint; a
tokenizer.json this module wrote records its kind.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import TextInputError, TokenizerError

DEFAULT_CONTEXT_LENGTH = 77
SOT, EOT, MASK = "<|startoftext|>", "<|endoftext|>", "<|mask|>"
CLIP_VOCAB_SIZE = 49408
DECLIP_VOCAB_SIZE = 49409
_N_MERGES = 49152 - 256 - 2          # merges CLIP keeps (lines 1.. of the merges file)
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_MERGES_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# Packages known to ship CLIP's merges file next to their code.
_PACKAGES_WITH_MERGES = ("open_clip", "clip", "declip", "sentence_transformers")
CLEANINGS = ("openai", "hf")
# transformers' CLIPTokenizer normaliser (tokenization_clip.py), as serialised in its tokenizer.json.
_HF_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]}
_CLEANING_NOTE = {
    "openai": "ftfy + html.unescape x2 + whitespace collapse + lower (done in Python)",
    "hf": "transformers' CLIPTokenizer: NFC + \\s+ -> ' ' + Lowercase (the Rust normalizer of this file)",
}


def _hf_normalizer():
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) byte -> printable-unicode table.  Mirrors the reference exactly
    because the vocabulary's first 256 entries are listed in this table's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    """CLIP's ``basic_clean`` + ``whitespace_clean`` + ``lower``.  ftfy (a dependency of the
    engine) is imported here, on first use, so that tools which never tokenise (the GPU check
    on a bare torch + CUDA machine) import the engine without it."""
    import ftfy
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def find_clip_merges_file() -> Path:
    """CLIP's ``bpe_simple_vocab_16e6.txt.gz`` as shipped inside an installed package, found
    without importing the package."""
    for name in _PACKAGES_WITH_MERGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            for candidate in (Path(loc) / _MERGES_FILENAME, Path(loc) / "bpe_simple_vocab_16e6.txt"):
                if candidate.is_file():
                    return candidate
    raise TokenizerError(
        f"no CLIP BPE merges file ({_MERGES_FILENAME}) found in installed packages "
        f"({', '.join(_PACKAGES_WITH_MERGES)}); pass one with --vocab FILE "
        "(or `pip install --no-deps open_clip_torch`, which ships it)"
    )


def _cleaning_of(normalizer, path: Path) -> str:
    """The cleaning a foreign tokenizer.json asks for: none (a bare BPE) or transformers' CLIP one."""
    if normalizer is None:
        return "openai"
    if normalizer == _HF_NORMALIZER:
        return "hf"
    raise TokenizerError(f"{path}: its normalizer {json.dumps(normalizer)[:200]} is neither none nor transformers' "
                         f"CLIP normalizer (NFC, \\s+ -> ' ', Lowercase), so its ids cannot be reproduced")


@dataclass(frozen=True)
class TokenBatch:
    ids: np.ndarray        # int64 [N, L], zero-padded
    lengths: np.ndarray    # int32 [N], SOT..EOT inclusive


def _special_tokens(vocab_size: int) -> list[str]:
    if vocab_size == CLIP_VOCAB_SIZE:
        return [SOT, EOT]
    if vocab_size == DECLIP_VOCAB_SIZE:
        return [MASK, SOT, EOT]
    raise TokenizerError(f"vocabulary size {vocab_size} is not supported: {CLIP_VOCAB_SIZE} (CLIP) "
                         f"or {DECLIP_VOCAB_SIZE} (DeCLIP, CLIP + <|mask|>)")


def _parse_merges(text: str, source: str) -> list[tuple[str, str]]:
    lines = text.split("\n")
    merges = lines[1:_N_MERGES + 1]
    parsed = []
    for i, line in enumerate(merges, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{source}: line {i} is not a BPE merge ('a b'): {line[:60]!r}")
        parsed.append((parts[0], parts[1]))
    if len(parsed) != _N_MERGES:
        raise TokenizerError(f"{source}: {len(parsed)} merges, a CLIP merges file has at least {_N_MERGES}")
    return parsed


class ClipTokenizer:
    def __init__(self, merges: list[tuple[str, str]], *, vocab_size: int | None = None,
                 context_length: int = DEFAULT_CONTEXT_LENGTH, source: str = "<merges>",
                 cleaning: str = "openai"):
        vocab_size = vocab_size or CLIP_VOCAB_SIZE
        specials = _special_tokens(vocab_size)
        if context_length < 2:
            raise TokenizerError(f"context_length must be at least 2, got {context_length}")
        if cleaning not in CLEANINGS:
            raise TokenizerError(f"cleaning must be one of {CLEANINGS}, got {cleaning!r}")
        base = list(bytes_to_unicode().values())
        vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + specials
        vocab = {tok: i for i, tok in enumerate(vocab_list)}
        if len(vocab) != len(vocab_list):
            raise TokenizerError(f"{source}: the merges produce duplicate vocabulary entries")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        if cleaning == "hf":
            tok.normalizer = _hf_normalizer()
        self._tok = tok
        self._merges = merges
        self.cleaning = cleaning
        self.vocab_size = len(vocab_list)
        self.sot_token_id = vocab[SOT]
        self.eot_token_id = vocab[EOT]
        self.context_length = context_length
        self.source = source

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_merges_text(cls, text: str, *, vocab_size: int | None = None,
                         context_length: int = DEFAULT_CONTEXT_LENGTH, source: str = "merges text",
                         cleaning: str = "openai") -> "ClipTokenizer":
        if not isinstance(text, str):
            raise TokenizerError(f"{source}: expected the merges file's text, got {type(text).__name__}")
        return cls(_parse_merges(text, source), vocab_size=vocab_size, context_length=context_length, source=source,
                   cleaning=cleaning)

    @classmethod
    def from_file(cls, path: str | Path, *, vocab_size: int | None = None,
                  context_length: int = DEFAULT_CONTEXT_LENGTH, cleaning: str | None = None) -> "ClipTokenizer":
        """A merges file (``.txt`` / ``.txt.gz``; a ``merges.txt`` with a ``vocab.json`` beside it
        is transformers' pair, checked against that vocab.json) or a ``tokenizer.json``.
        ``cleaning`` None picks the kind from the file (see the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"vocabulary file not found: {path}")
        if cleaning is not None and cleaning not in CLEANINGS:
            raise TokenizerError(f"cleaning must be one of {CLEANINGS}, got {cleaning!r}")
        try:
            raw = path.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
            raise TokenizerError(f"{path}: cannot read the vocabulary ({e})") from e
        if text.lstrip().startswith("{"):
            return cls._from_tokenizer_json(text, path, vocab_size, context_length, cleaning)
        vocab_json = path.with_name("vocab.json") if path.name == "merges.txt" else None
        if vocab_json is not None and vocab_json.is_file():
            return cls._from_hf_pair(text, path, vocab_json, vocab_size, context_length, cleaning or "hf")
        return cls.from_merges_text(text, vocab_size=vocab_size, context_length=context_length, source=str(path),
                                    cleaning=cleaning or "openai")

    @classmethod
    def _from_hf_pair(cls, text: str, merges_path: Path, vocab_path: Path, vocab_size: int | None,
                      context_length: int, cleaning: str) -> "ClipTokenizer":
        """transformers' ``vocab.json`` + ``merges.txt``: transformers uses every merge in the file
        and the ids of vocab.json, so both must be exactly CLIP's."""
        n = sum(1 for line in text.split("\n")[1:] if line.strip())
        if n != _N_MERGES:
            raise TokenizerError(f"{merges_path}: {n} merges, but a CLIP merges.txt beside a vocab.json holds exactly "
                                 f"{_N_MERGES} (transformers would use all of them)")
        tok = cls.from_merges_text(text, vocab_size=vocab_size, context_length=context_length, source=str(merges_path),
                                   cleaning=cleaning)
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            if not isinstance(vocab, dict):
                raise TypeError(f"a {type(vocab).__name__}, not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise TokenizerError(f"{vocab_path}: not a readable vocab.json ({e})") from e
        tok._check_vocab(vocab, f"{vocab_path} (beside {merges_path.name})")
        return tok

    def _check_vocab(self, vocab: dict, source: str) -> None:
        """The file's token -> id table must be exactly the one CLIP's merges imply."""
        if len(vocab) != self.vocab_size:
            raise TokenizerError(f"{source}: {len(vocab)} tokens, but the merges imply CLIP's {self.vocab_size}")
        for t, i in vocab.items():
            if self._tok.token_to_id(t) != i:
                raise TokenizerError(f"{source}: token {t!r} has id {i} in the file but "
                                     f"{self._tok.token_to_id(t)} in CLIP's layout")

    @classmethod
    def _from_tokenizer_json(cls, text: str, path: Path, vocab_size: int | None, context_length: int,
                             cleaning: str | None = None) -> "ClipTokenizer":
        try:
            data = json.loads(text)
            model = data["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        if model.get("type") != "BPE":
            raise TokenizerError(f"{path}: holds a {model.get('type')} model; a CLIP byte-level BPE is required")
        vocab, merges = model.get("vocab") or {}, model.get("merges") or []
        if SOT not in vocab or EOT not in vocab:
            raise TokenizerError(f"{path}: the vocabulary lacks CLIP's {SOT} / {EOT} tokens")
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        if len(pairs) < _N_MERGES or any(len(p) != 2 for p in pairs):
            raise TokenizerError(f"{path}: {len(pairs)} merges, a CLIP BPE has {_N_MERGES}")
        meta = data.get("filip") or {}
        size = vocab_size or meta.get("vocab_size") or len(vocab)
        ctx = meta.get("context_length", context_length) if context_length == DEFAULT_CONTEXT_LENGTH else context_length
        if cleaning is None:
            cleaning = meta.get("text_cleaning") or _cleaning_of(data.get("normalizer"), path)
            if cleaning not in CLEANINGS:
                raise TokenizerError(f"{path}: filip.text_cleaning {cleaning!r} is not one of {CLEANINGS}")
        tok = cls(list(pairs[:_N_MERGES]), vocab_size=size, context_length=ctx, source=str(path), cleaning=cleaning)
        for t, i in vocab.items():   # the file's ids must be CLIP's ids
            if tok._tok.token_to_id(t) != i:
                raise TokenizerError(f"{path}: token {t!r} has id {i} in the file but {tok._tok.token_to_id(t)} in CLIP's layout")
        specials = set(_special_tokens(tok.vocab_size))
        for added in data.get("added_tokens") or []:   # transformers' special tokens: only CLIP's own, at CLIP's ids
            content, i = added.get("content"), added.get("id")
            if content not in specials or tok._tok.token_to_id(content) != i:
                raise TokenizerError(f"{path}: added token {content!r} (id {i}) is not one of CLIP's special tokens "
                                     f"at CLIP's id; the engine's tokenizer cannot produce it")
        return tok

    @property
    def merges_text(self) -> str:
        """The merges file text this tokenizer is built from (header + one merge a line)."""
        return "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in self._merges) + "\n"

    def save(self, path: str | Path) -> None:
        """A Hugging Face tokenizer.json that :meth:`from_file` reads back identically (the
        variant and context length ride along under the extra key ``filip``)."""
        data = json.loads(self._tok.to_str())
        data["filip"] = {"vocab_size": self.vocab_size, "context_length": self.context_length,
                         "text_cleaning": self.cleaning, "cleaning": _CLEANING_NOTE[self.cleaning]}
        Path(path).write_text(json.dumps(data, ensure_ascii=False))

    # --- tokenising ----------------------------------------------------------------------
    def _clean(self, text: str) -> str:
        """Step 1 in Python for "openai"; for "hf" the Rust normaliser does it inside encode."""
        return clean_text(text) if self.cleaning == "openai" else text

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        if not isinstance(text, str):
            raise TextInputError(f"expected a str, got {type(text).__name__}")
        return self._tok.encode(self._clean(text), add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str], *, context_length: int | None = None, pad_to: str = "context",
                 truncate: bool = True, allow_empty: bool = False) -> TokenBatch:
        ctx = context_length or self.context_length
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TextInputError(f"expected a list of str, got {type(texts).__name__}")
        if pad_to not in ("context", "longest"):
            raise ValueError(f"pad_to must be 'context' or 'longest', got {pad_to!r}")
        cleaned = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TextInputError(f"text {i} is a {type(t).__name__}, expected str")
            c = self._clean(t)
            if not c and not allow_empty:
                raise TextInputError(f"text {i} is empty")
            cleaned.append(c)
        rows = []
        for i, enc in enumerate(self._tok.encode_batch(cleaned, add_special_tokens=False)):
            if not enc.ids and not allow_empty and self.cleaning == "hf":   # e.g. whitespace only
                raise TextInputError(f"text {i} is empty")
            row = [self.sot_token_id, *enc.ids, self.eot_token_id]
            if len(row) > ctx:
                if not truncate:
                    raise TextInputError(f"text {i} has {len(row)} tokens with SOT/EOT; the context is {ctx}")
                row = row[:ctx]
                row[-1] = self.eot_token_id
            rows.append(row)
        width = ctx if pad_to == "context" else max((len(r) for r in rows), default=2)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            lengths[i] = len(r)
        return TokenBatch(ids, lengths)
