"""The tokenizer against CLIP's reference tokenizer (OpenCLIP's copy of OpenAI's
simple_tokenizer, loaded by file path without importing open_clip)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from filip_engine.errors import TextInputError, TokenizerError
from filip_engine.tokenizer import ClipTokenizer, find_clip_merges_file


@pytest.fixture(scope="module")
def merges_path():
    return find_clip_merges_file()


@pytest.fixture(scope="module")
def ref(merges_path):
    spec = importlib.util.spec_from_file_location("clip_reference_tokenizer", str(merges_path.parent / "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(merges_path))


@pytest.fixture(scope="module")
def tok(merges_path):
    return ClipTokenizer.from_file(merges_path)


CORPUS = [
    "a photo of a cat", "A PHOTO OF A CAT", "IT'S a dog's life, isn't it? They're here; we've seen; I'm; you'll; he'd",
    "!!! ??? ... --- ,,, ;;; ((( ))) [[[ ]]] {{{ }}} @#$%^&*", "3.14159 and 1,000,000 and 2024-11-28 and 007",
    "café naïve Ångström façade über résumé", "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39;",
    "cafÃ© mojibake â€œquotesâ€\x9d", "中文 字幕 日本語のテキスト 한국어 문장", "👩‍👩‍👧 family 🇫🇷 flag 🐱🐶 👍🏽",
    "tabs\tand\nnewlines\r\n  runs   of \u00a0 nbsp \u2003 em-space", "control\x1c\x1d\x1e\x1fchars\x00 here",
    "مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดีชาวโลก", "İstanbul ǅungla ß ﬁnance Ǆ", "x", "!", "0",
    "word " * 500, " ".join(f"w{i}" for i in range(75)), "a " * 74 + "b", "a " * 75, "a " * 76,
    "hello<|endoftext|>world", "<start_of_text>",
]


def _ref_ids(ref, texts, ctx=77):
    return ref(texts, context_length=ctx).numpy()


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("abcxyzABCXYZ0123456789 .,!?'’\"-_/\\\t\n\u00a0\u2003中日本語한국ßéñçøåÆ🙂👍🏽🇯🇵‍"
                "<>|&;:#@()[]{}αβγ Ωжёکгדש्क्ष")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_ids_equal_reference_on_corpus(ref, tok):
    texts = [t for t in CORPUS if t not in ("hello<|endoftext|>world", "<start_of_text>")]
    got = tok(texts)
    want = _ref_ids(ref, texts)
    for i, t in enumerate(texts):
        assert np.array_equal(got.ids[i], want[i]), f"text {i} {t[:40]!r}: {got.ids[i][:12]} vs {want[i][:12]}"
        ref_len = int(np.argmax(want[i] == tok.eot_token_id)) + 1   # not count_nonzero: id 0 is "!"
        assert got.lengths[i] == ref_len, (t[:40], got.lengths[i], ref_len)


def test_ids_equal_reference_on_random_strings(ref, tok):
    texts = [t for t in _random_texts(600) if t.strip()]
    texts = [t for t in texts if ref.encode(t)]          # the reference's empty-after-cleaning rows
    got, want = tok(texts), _ref_ids(ref, texts)
    bad = [i for i in range(len(texts)) if not np.array_equal(got.ids[i], want[i])]
    assert not bad, [(texts[i], got.ids[i][:10], want[i][:10]) for i in bad[:3]]
    assert len(texts) > 500


def test_encode_equals_reference(ref, tok):
    for t in CORPUS[:-2] + _random_texts(100, seed=1):
        assert tok.encode(t) == ref.encode(t), t


def test_truncation_keeps_eot_last_and_lengths(tok, ref):
    long = "word " * 500
    b = tok([long, "a cat"])
    assert b.ids.shape == (2, 77) and b.lengths.tolist() == [77, 4]
    assert b.ids[0, -1] == tok.eot_token_id and b.ids[0, 0] == tok.sot_token_id
    assert b.ids[1, 3] == tok.eot_token_id and b.ids[1, 4:].sum() == 0
    with pytest.raises(TextInputError, match="text 0 has 502 tokens"):
        tok([long], truncate=False)
    assert tok(["a " * 75], truncate=False).lengths.tolist() == [77]   # exactly fits


def test_literal_specials_are_plain_text(tok):
    """Captions never produce control tokens (OpenCLIP's behaviour for this spelling)."""
    ids = tok.encode("hello<|endoftext|>world")
    assert tok.eot_token_id not in ids and len(ids) > 3


def test_pad_to_longest_and_batch_invariance(tok):
    b = tok(["a cat", "a much longer caption about a dog"], pad_to="longest")
    assert b.ids.shape[1] == int(b.lengths.max())
    single = tok(["a cat"], pad_to="longest")
    assert np.array_equal(single.ids[0], b.ids[0, :single.ids.shape[1]])


def test_plain_txt_and_gz_and_merges_text(merges_path, tmp_path, tok):
    plain = tmp_path / "bpe.txt"
    plain.write_bytes(gzip.decompress(merges_path.read_bytes()))
    a = ClipTokenizer.from_file(plain)
    b = ClipTokenizer.from_merges_text(tok.merges_text)
    for t in (a, b):
        assert np.array_equal(t(CORPUS[:10]).ids, tok(CORPUS[:10]).ids)


def test_tokenizer_json_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    back = ClipTokenizer.from_file(tmp_path / "tokenizer.json")
    assert back.vocab_size == tok.vocab_size and back.context_length == 77
    texts = CORPUS[:-2] + _random_texts(50, seed=2)
    assert np.array_equal(back(texts, allow_empty=True).ids, tok(texts, allow_empty=True).ids)


def test_foreign_tokenizer_json(tok, tmp_path):
    """A tokenizer.json written by HF tokenizers itself (as transformers' CLIP files are) loads."""
    from tokenizers import Tokenizer, models
    data = json.loads(tok._tok.to_str())
    hf = Tokenizer(models.BPE(vocab=data["model"]["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                                   for m in data["model"]["merges"]],
                              end_of_word_suffix="</w>"))
    hf.save(str(tmp_path / "hf.json"))
    loaded = ClipTokenizer.from_file(tmp_path / "hf.json")
    assert np.array_equal(loaded(CORPUS[:8]).ids, tok(CORPUS[:8]).ids)


def test_declip_variant(merges_path, tok):
    d = ClipTokenizer.from_file(merges_path, vocab_size=49409)
    assert (d.vocab_size, d.sot_token_id, d.eot_token_id) == (49409, 49407, 49408)
    a, b = d(["a photo of a cat"]), tok(["a photo of a cat"])
    n = int(a.lengths[0])
    assert np.array_equal(a.ids[0, 1:n - 1], b.ids[0, 1:n - 1])
    assert a.ids[0, 0] == b.ids[0, 0] + 1 and a.ids[0, n - 1] == b.ids[0, n - 1] + 1


@pytest.mark.parametrize("case, match", [
    ("missing", "not found"),
    ("garbage", "not a BPE merge"),
    ("truncated", "merges, a CLIP merges file has"),
    ("wordpiece", "holds a WordPiece model"),
    ("bad_json", "not a Hugging Face tokenizer.json"),
    ("vocab_size", "vocabulary size 50000 is not supported"),
])
def test_vocabulary_errors(merges_path, tmp_path, case, match):
    path = tmp_path / "v.txt"
    kw = {}
    if case == "garbage":
        path.write_text("#version\nthis line has three words\n")
    elif case == "truncated":
        path.write_text("\n".join(gzip.decompress(merges_path.read_bytes()).decode().split("\n")[:1000]))
    elif case == "wordpiece":
        from tokenizers import Tokenizer, models
        Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))
    elif case == "bad_json":
        path.write_text("{ not json")
    elif case == "vocab_size":
        path = merges_path
        kw = {"vocab_size": 50000}
    with pytest.raises(TokenizerError, match=match) as ei:
        ClipTokenizer.from_file(path if case != "missing" else tmp_path / "nope.txt", **kw)
    if case not in ("vocab_size",):
        assert str(tmp_path) in str(ei.value) or case == "missing"


@pytest.mark.parametrize("texts, match", [
    ("a bare string", "expected a list of str"),
    ([b"bytes"], "text 0 is a bytes"),
    (["ok", None], "text 1 is a NoneType"),
    (["ok", 3], "text 1 is a int"),
    (["fine", ""], "text 1 is empty"),
    (["   \n\t"], "text 0 is empty"),
])
def test_text_errors(tok, texts, match):
    with pytest.raises(TextInputError, match=match):
        tok(texts)


def test_allow_empty(tok):
    b = tok([""], allow_empty=True)
    assert b.lengths.tolist() == [2] and b.ids[0, :2].tolist() == [tok.sot_token_id, tok.eot_token_id]


def test_finding_the_merges_file_imports_nothing():
    code = ("import sys; from filip_engine.tokenizer import find_clip_merges_file; p = find_clip_merges_file(); "
            "assert p.is_file(); assert 'open_clip' not in sys.modules; print(p)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
