"""The Hugging Face ``CLIPModel`` directory layout ("hf") against transformers itself.

A small random ``transformers.CLIPModel`` (LayerNorms, positional embeddings and biases moved
off their init, a non-default logit scale) is saved with ``save_pretrained`` next to a
``CLIPTokenizer`` built from CLIP's BPE (vocab.json + merges.txt, made the way OpenAI CLIP
makes its vocabulary) and a ``CLIPImageProcessor``; ``load_checkpoint(dir)`` must give the
same normalised embeddings as ``get_image_features`` / ``get_text_features`` and a tokenizer
with transformers' ids, and bad directories must be refused with one sentence.
"""
from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from filip_engine.checkpoint import load_checkpoint
from filip_engine.errors import CheckpointError, TextInputError, TokenizerError
from filip_engine.io_spec import tower_spec
from filip_engine.model import FilipModel
from filip_engine.runtime import TorchRuntime
from filip_engine.tokenizer import ClipTokenizer, bytes_to_unicode, find_clip_merges_file

TOL = 1e-5          # max |d| of normalised fp32 embeddings
LOGIT_SCALE = 3.1   # transformers' default is 2.6592, the engine's log(100)
CAPTIONS = [
    "a photo of a cat",
    "A PHOTO OF A DOG, isn't it? They're here; we've seen; I'm; you'll; he'd",
    "café naïve Ångström façade über résumé İstanbul ß",            # unicode, NFC
    "cafe\u0301 (decomposed accent) and 中文 字幕 日本語 한국어",
    "👩‍👩‍👧 family 🇫🇷 flag 🐱🐶 👍🏽",                                      # emoji, ZWJ, flags, skin tones
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39;",   # HTML entities (kept as text by transformers)
    "don’t “curly” ﬁnance ＦＵＬＬＷＩＤＴＨ cafÃ© mojibake",           # what ftfy would change
    "tabs\tand\nnewlines\r\n  runs   of \u00a0 nbsp \u2003 em-space",
    "3.14159 and 1,000,000 and 2024-11-28",
    "word " * 120,                                                     # > 77 tokens: truncated
    " ".join(f"w{i}" for i in range(40)),                              # digits split one by one: > 77
    "a " * 75,                                                         # exactly 77 with SOT/EOT
]
SPECIALS = ["hello<|endoftext|>world", "<|startoftext|>a cat"]        # literal special tokens


# --- building transformers' directories ---------------------------------------------------
@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    """vocab.json + merges.txt as OpenAI CLIP builds its vocabulary: 256 byte symbols, the same
    with </w>, one token per merge (the first 48,894 merges), then SOT and EOT."""
    d = tmp_path_factory.mktemp("clip_vocab")
    lines = gzip.decompress(find_clip_merges_file().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_files):
    return CLIPTokenizer(str(vocab_files / "vocab.json"), str(vocab_files / "merges.txt"), model_max_length=77)


def _clip_config(act: str, text_act: str | None = None) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77, hidden_act=text_act or act),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, hidden_act=act),
        projection_dim=32)


def _random_clip(act: str, seed: int) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(_clip_config(act)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
        for emb in (model.vision_model.embeddings.position_embedding, model.text_model.embeddings.position_embedding):
            emb.weight.add_(0.1 * torch.randn(emb.weight.shape, generator=g))
        model.logit_scale.fill_(LOGIT_SCALE)
    return model


def _save_dir(path, model: CLIPModel, tokenizer: CLIPTokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_dir(request, tmp_path_factory, hf_tokenizer):
    act = request.param
    model = _random_clip(act, seed=1 if act == "quick_gelu" else 2)
    return act, model, _save_dir(tmp_path_factory.mktemp(f"hf_{act}"), model, hf_tokenizer)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, hf_tokenizer):
    """A quick_gelu directory that the refusal tests copy and break."""
    return _save_dir(tmp_path_factory.mktemp("hf_base"), _random_clip("quick_gelu", seed=3), hf_tokenizer)


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a BaseModelOutputWithPooling
    (projected features in pooler_output) in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _norm(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x, dim=-1).numpy()


def _compare(model: CLIPModel, ck, tok: ClipTokenizer, label: str) -> dict[str, float]:
    """Engine (TorchRuntime, as served) vs transformers on images and CAPTIONS."""
    cfg = ck.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 224, 224, generator=g)
    hf_tok = CLIPTokenizer.from_pretrained(ck.path) if ck.tokenizer_file else None
    with torch.no_grad():
        hf_img = _norm(_features(model.get_image_features(pixel_values=pixels)))
        vis = model.vision_model(pixel_values=pixels).last_hidden_state
        hf_img_tok = _norm(model.visual_projection(model.vision_model.post_layernorm(vis[:, 1:])))
        enc = hf_tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        hf_txt = _norm(_features(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)))
        last = model.text_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        hf_txt_tok = _norm(model.text_projection(last))
    batch = tok(CAPTIONS)
    mask = enc.attention_mask.numpy().astype(bool)
    assert np.array_equal(batch.lengths, mask.sum(1)), "the engine's lengths are transformers' attention mask"
    assert np.array_equal(np.where(mask, batch.ids, 0), np.where(mask, enc.input_ids.numpy(), 0))
    with TorchRuntime(ck.model, tower_spec(cfg, "image")) as rt:
        img = rt.infer({"pixel_values": pixels.numpy()})
    with TorchRuntime(ck.model, tower_spec(cfg, "text")) as rt:
        txt = rt.infer({"input_ids": batch.ids, "lengths": batch.lengths.astype(np.int64)})
    d = {"image pooled": np.abs(img["pooled"] - hf_img).max(),
         "image tokens": np.abs(img["tokens"] - hf_img_tok).max(),
         "text pooled": np.abs(txt["pooled"] - hf_txt).max(),
         "text tokens": max(np.abs(txt["tokens"][i, :n] - hf_txt_tok[i, :n]).max() for i, n in enumerate(batch.lengths))}
    print(f"\n[{label}] max |d| vs transformers {transformers.__version__}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    assert all(v <= TOL for v in d.values()), d
    return d


# --- equivalence ----------------------------------------------------------------------------
def test_hf_directory_matches_transformers(hf_dir):
    act, model, path = hf_dir
    ck = load_checkpoint(path)
    assert (ck.layout, ck.path, ck.default_scoring, ck.vocab_text) == ("hf", path, "global", None)
    assert ck.config.activation == act and ck.config.token_head == "shared"
    v, t = ck.config.vision, ck.config.text
    assert (v.width, v.layers, v.heads, v.image_size, v.patch_size, v.mlp_ratio) == (64, 2, 2, 224, 32, 2.0)
    assert (t.width, t.layers, t.heads, t.context_length, t.vocab_size) == (32, 2, 2, 77, 49408)
    assert ck.config.embed_dim == ck.config.token_dim == 32
    assert ck.model.logit_scale.item() == pytest.approx(LOGIT_SCALE)
    assert ck.model.similarity_scale() == pytest.approx(np.exp(LOGIT_SCALE), rel=1e-6)
    assert ck.tokenizer_file == path / "tokenizer.json"
    assert ck.image_processor == {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": pytest.approx(1 / 255), "do_normalize": True,
        "image_mean": pytest.approx([0.48145466, 0.4578275, 0.40821073]),
        "image_std": pytest.approx([0.26862954, 0.26130258, 0.27577711]), "do_convert_rgb": True}
    tok = ClipTokenizer.from_file(ck.tokenizer_file, vocab_size=t.vocab_size, context_length=t.context_length)
    assert tok.cleaning == "hf"
    _compare(model, ck, tok, act)
    # the comparison can tell the activations apart: the other one is far off
    other = FilipModel(replace(ck.config, activation="gelu" if act == "quick_gelu" else "quick_gelu")).eval()
    other.load_state_dict(ck.model.state_dict())
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        off = np.abs(other.encode_image(pixels)[1].numpy() - _norm(_features(model.get_image_features(pixel_values=pixels)))).max()
    print(f"[{act}] the engine with the other activation: image pooled max |d| {off:.2e}")
    assert off > 1e-3, off
    assert load_checkpoint(path, activation=act).config == ck.config       # agreeing is fine
    assert load_checkpoint(path / "model.safetensors").config == ck.config  # the weights file inside the directory


def test_pytorch_model_bin_and_shards(base_dir, tmp_path):
    """pytorch_model.bin (transformers 4's torch.save of the state dict, with the position_ids
    buffers old versions kept), and a sharded safetensors checkpoint, load to the same weights."""
    want = load_checkpoint(base_dir).model.state_dict()
    model = CLIPModel.from_pretrained(base_dir).eval()
    b = tmp_path / "bin"
    shutil.copytree(base_dir, b)
    (b / "model.safetensors").unlink()
    sd = dict(model.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    torch.save(sd, b / "pytorch_model.bin")
    s = tmp_path / "sharded"
    model.save_pretrained(s, max_shard_size="2MB")
    assert (s / "model.safetensors.index.json").is_file() and not (s / "model.safetensors").exists()
    for path in (b, s):
        ck = load_checkpoint(path)
        assert ck.layout == "hf" and all(torch.equal(ck.model.state_dict()[k], want[k]) for k in want), path
        assert ck.tokenizer_file == (b / "tokenizer.json" if path == b else None)
        assert ck.image_processor is None or path == b


def test_legacy_eos_token_id_2(base_dir, tmp_path):
    """Configs from before transformers PR 24773 say eos_token_id 2, and transformers then pools
    at argmax(input_ids): CLIP's EOT is the largest id, so that is the engine's lengths - 1 too."""
    d = tmp_path / "legacy"
    shutil.copytree(base_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"].update(eos_token_id=2, bos_token_id=0)
    (d / "config.json").write_text(json.dumps(cfg))
    model = CLIPModel.from_pretrained(d).eval()
    assert model.text_model.eos_token_id == 2
    ck = load_checkpoint(d)
    _compare(model, ck, ClipTokenizer.from_file(ck.tokenizer_file), "eos_token_id=2")


# --- the tokenizer --------------------------------------------------------------------------
def test_tokenizer_ids_equal_transformers(base_dir, vocab_files, tmp_path, hf_tokenizer):
    """From tokenizer.json and from vocab.json + merges.txt, on tricky captions, padded and
    truncated as transformers does with truncation=True, max_length=77."""
    pair = tmp_path / "pair"
    shutil.copytree(base_dir, pair)
    (pair / "tokenizer.json").unlink()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_files / f, pair / f)
    assert load_checkpoint(pair).tokenizer_file == pair / "merges.txt"
    for d, tokenizer_file in ((base_dir, base_dir / "tokenizer.json"), (pair, pair / "merges.txt")):
        hf = CLIPTokenizer.from_pretrained(d)
        tok = ClipTokenizer.from_file(tokenizer_file)
        assert tok.cleaning == "hf" and (tok.sot_token_id, tok.eot_token_id) == (hf.bos_token_id, hf.eos_token_id)
        for text in CAPTIONS:
            want = hf(text, truncation=True, max_length=77).input_ids
            b = tok([text])
            assert b.ids[0, :b.lengths[0]].tolist() == want, (d.name, text[:40])
            assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids, text[:40]
        # truncation: both keep SOT + the first 75 tokens + EOT; without truncation transformers
        # returns the whole sequence (too long for the model), the engine refuses it
        long = CAPTIONS[9]
        full = hf(long).input_ids
        assert len(full) == 122 and hf(long, truncation=True, max_length=77).input_ids == full[:76] + [full[-1]]
        with pytest.raises(TextInputError, match="122 tokens"):
            tok([long], truncate=False)
        # padding: transformers pads with its pad token (<|endoftext|>) and masks; the engine pads
        # with 0 and passes lengths: the first EOS (what transformers pools) is at lengths - 1
        enc = hf(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        assert hf.pad_token_id == hf.eos_token_id
        assert np.array_equal((enc.input_ids == hf.eos_token_id).argmax(1), tok(CAPTIONS).lengths - 1)


def test_literal_special_tokens_stay_text(base_dir):
    """The one deliberate difference: transformers maps a literal <|endoftext|> in a caption to
    EOS (and its CLIP then pools the text at that first EOS); the engine keeps it as text, so
    its only EOT is the one it adds, at lengths - 1."""
    hf = CLIPTokenizer.from_pretrained(base_dir)
    tok = ClipTokenizer.from_file(base_dir / "tokenizer.json")
    for text in SPECIALS:
        want = hf(text).input_ids
        assert want[1:-1] != tok.encode(text)
        assert any(i in (hf.bos_token_id, hf.eos_token_id) for i in want[1:-1])
        b = tok([text])
        row = b.ids[0, :b.lengths[0]].tolist()
        assert row.count(tok.eot_token_id) == 1 and row[-1] == tok.eot_token_id and row.count(tok.sot_token_id) == 1


def test_openai_cleaning_on_request(base_dir):
    """transformers does not run ftfy or unescape HTML as CLIP's reference does: the same file
    read with cleaning="openai" gives the reference ids, which differ on such captions."""
    ref = ClipTokenizer.from_file(find_clip_merges_file())
    openai = ClipTokenizer.from_file(base_dir / "tokenizer.json", cleaning="openai")
    hf = ClipTokenizer.from_file(base_dir / "tokenizer.json")
    assert np.array_equal(openai(CAPTIONS).ids, ref(CAPTIONS).ids)
    assert ref.encode(CAPTIONS[5]) != hf.encode(CAPTIONS[5])   # &amp; -> & only in the reference
    assert ref.encode(CAPTIONS[6]) != hf.encode(CAPTIONS[6])   # ’ ﬁ Ｆ Ã© fixed only by ftfy
    assert ref.encode(CAPTIONS[0]) == hf.encode(CAPTIONS[0])


def test_tokenizer_saved_by_the_engine_keeps_its_cleaning(base_dir, tmp_path):
    tok = ClipTokenizer.from_file(base_dir / "tokenizer.json")
    tok.save(tmp_path / "tokenizer.json")
    back = ClipTokenizer.from_file(tmp_path / "tokenizer.json")
    assert back.cleaning == "hf" and np.array_equal(back(CAPTIONS).ids, tok(CAPTIONS).ids)


@pytest.mark.parametrize("case, match", [
    ("vocab_ids", "token '!' has id 64 in the file but 0 in CLIP's layout"),
    ("vocab_size", "49407 tokens, but the merges imply CLIP's 49408"),
    ("merges_count", "48893 merges, but a CLIP merges.txt beside a vocab.json holds exactly 48894"),
    ("normalizer", "normalizer .* is neither none nor transformers' CLIP normalizer"),
    ("added_token", "added token '<|mask|>' .* is not one of CLIP's special tokens"),
])
def test_tokenizer_file_mismatches(vocab_files, base_dir, tmp_path, case, match):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_files / f, tmp_path / f)
    path = tmp_path / "merges.txt"
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    if case == "vocab_ids":
        vocab["!"], vocab["a"] = vocab["a"], vocab["!"]
        (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    elif case == "vocab_size":
        del vocab["<|endoftext|>"]
        (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    elif case == "merges_count":
        path.write_text("\n".join(path.read_text(encoding="utf-8").rstrip("\n").split("\n")[:-1]) + "\n", encoding="utf-8")
    else:
        data = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
        if case == "normalizer":
            data["normalizer"] = {"type": "NFKC"}
        else:
            data["added_tokens"].append({**data["added_tokens"][-1], "id": 49408, "content": "<|mask|>"})
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(TokenizerError, match=match) as ei:
        ClipTokenizer.from_file(path)
    assert str(tmp_path) in str(ei.value)


# --- refusals -------------------------------------------------------------------------------
def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


BAD = {
    "no_config": (lambda d: (d / "config.json").unlink(), "is a directory without a config.json"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    "shapes": (lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(intermediate_size=96)),
               r"the weights do not match the CLIPModel that config.json describes: shape mismatches "
               r"\[text_model.encoder.layers.0.mlp.fc1.weight: weights \(64, 32\) vs config \(96, 32\)"),
    "patch": (lambda d: _edit_json(d / "config.json", lambda c: c["vision_config"].update(patch_size=16)),
              r"vision_model.embeddings.patch_embedding.weight: weights \(64, 3, 32, 32\) vs config \(64, 3, 16, 16\); "
              r"vision_model.embeddings.position_embedding.weight: weights \(50, 64\) vs config \(197, 64\)"),
    "tanh_gelu": (lambda d: _edit_json(d / "config.json", lambda c: [c[k].update(hidden_act="gelu_pytorch_tanh")
                                                                      for k in ("text_config", "vision_config")]),
                  "text_config.hidden_act 'gelu_pytorch_tanh' is not an activation the engine implements"),
    "gelu_new": (lambda d: _edit_json(d / "config.json", lambda c: c["vision_config"].update(hidden_act="gelu_new")),
                 "vision_config.hidden_act 'gelu_new' is not an activation the engine implements"),
    "towers": (lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(hidden_act="gelu")),
               "text_config.hidden_act is 'gelu' but vision_config.hidden_act is 'quick_gelu', and the engine runs "
               "one activation in both towers"),
    "eps": (lambda d: _edit_json(d / "config.json", lambda c: c["vision_config"].update(layer_norm_eps=1e-6)),
            "vision_config.layer_norm_eps is 1e-06, but the engine's LayerNorms use 1e-05"),
    "eos": (lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(eos_token_id=49406)),
            "text_config.eos_token_id is 49406"),
    "vocab": (lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(vocab_size=49409)),
              "text_config.vocab_size is 49409, but the engine's tokenizer is CLIP's 49408-token BPE"),
    "model_type": (lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type="siglip")),
                   "model_type 'siglip' is not transformers' two-tower CLIPModel"),
    "bad_json": (lambda d: (d / "config.json").write_text("{ nope"), "config.json: not a readable JSON file"),
    "resample": (lambda d: _edit_json(d / "preprocessor_config.json", lambda c: c.update(resample=2)),
                 r"resample 2 \(bilinear\) is not bicubic \(3\)"),
    "crop": (lambda d: _edit_json(d / "preprocessor_config.json", lambda c: c.update(crop_size={"height": 256, "width": 256})),
             "crop_size 256x256 is not the model's image size 224x224"),
    "squash": (lambda d: _edit_json(d / "preprocessor_config.json", lambda c: c.update(size={"height": 224, "width": 224})),
               "is not {'shortest_edge': N}, the only resize the engine reproduces"),
    "rescale": (lambda d: _edit_json(d / "preprocessor_config.json", lambda c: c.update(do_rescale=False)),
                "do_rescale=False with rescale_factor=.* is not the engine's /255"),
    "merges_alone": (lambda d: ((d / "tokenizer.json").unlink(), (d / "merges.txt").write_text("#version: 0.2\n")),
                     "merges.txt: has no vocab.json beside it"),
    "tokenizer_class": (lambda d: _edit_json(d / "tokenizer_config.json", lambda c: c.update(tokenizer_class="T5Tokenizer")),
                        "tokenizer_class 'T5Tokenizer' is not CLIP's BPE tokenizer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_directories(base_dir, tmp_path, case):
    d = tmp_path / "d"
    shutil.copytree(base_dir, d)
    breaker, match = BAD[case]
    breaker(d)
    with pytest.raises(CheckpointError, match=match) as ei:
        load_checkpoint(d)
    msg = str(ei.value)
    assert str(d) in msg and "\n" not in msg, msg


def test_requested_settings_that_disagree_with_config(base_dir):
    with pytest.raises(CheckpointError, match=r"config.json says hidden_act='quick_gelu' .* but activation='gelu' was requested"):
        load_checkpoint(base_dir, activation="gelu")
    with pytest.raises(CheckpointError, match="text_config.num_attention_heads is 2, but text_heads=4 was requested"):
        load_checkpoint(base_dir, text_heads=4)


def test_bare_hf_state_dict_is_pointed_at_its_directory(base_dir, tmp_path):
    shutil.copy(base_dir / "model.safetensors", tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match="Hugging Face transformers CLIP state dict.*load the directory"):
        load_checkpoint(tmp_path / "weights.safetensors")


def test_legacy_preprocessor_config(base_dir, tmp_path):
    """The form of openai/clip-vit-base-patch32's preprocessor_config.json (transformers 4's
    CLIPFeatureExtractor: int sizes, no do_rescale) reads as the same recipe."""
    d = tmp_path / "d"
    shutil.copytree(base_dir, d)
    modern = load_checkpoint(d).image_processor
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}))
    legacy = load_checkpoint(d).image_processor
    assert {**legacy, "image_processor_type": "CLIPImageProcessor"} == modern
    assert legacy["image_processor_type"] == "CLIPFeatureExtractor"
    _edit_json(d / "preprocessor_config.json", lambda c: c.update(do_normalize=False))
    plain = load_checkpoint(d).image_processor
    assert (plain["do_normalize"], plain["image_mean"], plain["image_std"]) == (False, [0.0] * 3, [1.0] * 3)


def test_engine_layer_norms_use_the_eps_the_loader_requires():
    from filip_engine.checkpoint import _ENGINE_LN_EPS, random_model
    norms = [m for m in random_model("tiny").modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == _ENGINE_LN_EPS for m in norms)
