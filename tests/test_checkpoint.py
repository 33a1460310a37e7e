"""Checkpoint layouts against independent references; native round trip; malformed files."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from filip_engine.checkpoint import load_checkpoint, random_model, save_checkpoint
from filip_engine.config import PRESETS, FilipConfig
from filip_engine.errors import CheckpointError
from tests.reference_clip import RefCLIP, RefDeclipFilip, random_token_rows

ATOL = 2e-5  # fp32, two independent implementations of the same math


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err:.3e} > {atol}"


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("wrap", ["bare", "state_dict", "module_prefix", "openai_extras"])
def test_openclip_layout_matches_clip_forward(tmp_path, act, wrap):
    ref = RefCLIP(act=act, seed=1).eval()
    sd = ref.state_dict()
    if wrap == "state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif wrap == "module_prefix":
        obj = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    elif wrap == "openai_extras":  # OpenAI's archives carry these ints as tensors
        obj = dict(sd, input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    else:
        obj = sd
    path = tmp_path / "openclip.pt"
    torch.save(obj, path)

    ck = load_checkpoint(path, activation=act)
    assert ck.layout == "openclip"
    cfg = ck.config
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers) == (32, 8, 128, 2)
    assert (cfg.text.width, cfg.text.layers, cfg.text.vocab_size, cfg.embed_dim) == (128, 2, 49408, 64)
    assert cfg.activation == act and cfg.token_head == "shared"

    images = torch.randn(3, 3, 32, 32)
    ids, lengths = random_token_rows(4, 77, sot=49406, eot=49407, seed=2)
    with torch.no_grad():
        tokens, pooled = ck.model.encode_image(images)
        _close(pooled, F.normalize(ref.encode_image(images), dim=-1))   # == OpenCLIP encode_image(normalize=True)
        _close(tokens, ref.image_tokens(images))
        ttok, tpool = ck.model.encode_text(ids, lengths)
        _close(tpool, F.normalize(ref.encode_text(ids), dim=-1))         # == encode_text(normalize=True)
        want = ref.text_tokens(ids)
        for i, n in enumerate(lengths.tolist()):
            _close(ttok[i, :n], want[i, :n])
            assert ttok[i, n:].abs().max().item() == 0 if n < 77 else True
    assert torch.allclose(ck.model.logit_scale, ref.logit_scale)


def test_wrong_activation_is_visible(tmp_path):
    """The activation cannot be read from the weights; choosing wrongly changes outputs."""
    ref = RefCLIP(act="gelu", seed=3).eval()
    torch.save(ref.state_dict(), tmp_path / "c.pt")
    wrong = load_checkpoint(tmp_path / "c.pt")  # default quick_gelu
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (wrong.model.encode_image(images)[1] - F.normalize(ref.encode_image(images), dim=-1)).abs().max()
    assert diff > 1e-3


def test_declip_filip_layout(tmp_path):
    ref = RefDeclipFilip(seed=4).eval()
    path = tmp_path / "declip.pth.tar"
    torch.save({"model": {"module." + k: v for k, v in ref.state_dict().items()}, "step": 1000}, path)
    ck = load_checkpoint(path)
    assert ck.layout == "declip"
    cfg = ck.config
    assert cfg.token_head == "dense" and cfg.token_dim == 48 and cfg.embed_dim == 96
    assert cfg.text.vocab_size == 49409 and cfg.text_projection_bias
    images = torch.randn(2, 3, 32, 32)
    ids, lengths = random_token_rows(3, 77, sot=49407, eot=49408, seed=5)   # DeCLIP ids: +1
    with torch.no_grad():
        tokens, pooled = ck.model.encode_image(images)
        rt, rp = ref.image(images)
        _close(tokens, rt)
        _close(pooled, rp)
        ttok, tpool = ck.model.encode_text(ids, lengths)
        rtt, rtp = ref.text(ids)
        _close(tpool, rtp)
        for i, n in enumerate(lengths.tolist()):
            _close(ttok[i, :n], rtt[i, :n])
    # the token-wise temperature is DeCLIP's logit_scale_dense
    assert ck.model.logit_scale.item() == pytest.approx(3.3)


def test_native_round_trip(tmp_path):
    model = random_model("tiny", seed=7)
    save_checkpoint(tmp_path / "n.pt", model, vocab_text="#version: 0.2\na b\n")
    ck = load_checkpoint(tmp_path / "n.pt")
    assert ck.layout == "native" and ck.config == PRESETS["tiny"] and ck.vocab_text.startswith("#version")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.encode_image(images), ck.model.encode_image(images)):
            assert torch.equal(a, b)
    assert FilipConfig.from_dict(PRESETS["ViT-B-32"].to_dict()) == PRESETS["ViT-B-32"]


def test_random_model_is_deterministic():
    a, b = random_model("tiny", seed=3), random_model("tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_text_batch_vs_single_invariance():
    """Causal attention + length masking: a row's tokens do not depend on padding or batch mates."""
    model = random_model("tiny", seed=0)
    ids, lengths = random_token_rows(5, 77, sot=49406, eot=49407, seed=9)
    with torch.no_grad():
        tok, pooled = model.encode_text(ids, lengths)
        for i, n in enumerate(lengths.tolist()):
            t1, p1 = model.encode_text(ids[i:i + 1, :n], lengths[i:i + 1])
            _close(t1[0], tok[i, :n], 1e-5)
            _close(p1[0], pooled[i], 1e-5)


# --- malformed inputs: each a CheckpointError whose message names the problem ----------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _tiny_sd():
    return RefCLIP(seed=0).state_dict()


@pytest.mark.parametrize("case, expect", [
    ("missing_file", "not found"),
    ("garbage", "not a readable PyTorch checkpoint"),
    ("empty", "not a readable PyTorch checkpoint"),
    ("code_exec", "posix.system"),
    ("no_state_dict", "no state dict found"),
    ("unknown_layout", "unknown checkpoint layout"),
    ("missing_key", "missing keys ['ln_final.weight']"),
    ("extra_key", "unexpected keys ['visual.attn_pool.weight']"),
    ("bad_shape", "transformer.resblocks.1.mlp.c_fc.weight: checkpoint (500, 128) vs model (512, 128)"),
    ("nan", "contains NaN"),
    ("int_weights", "expected a floating-point tensor"),
    ("native_bad_config", "unknown VisionConfig keys ['colour']"),
    ("native_version", "format_version 99"),
    ("truncated", "not a readable PyTorch checkpoint"),
])
def test_malformed_checkpoints(tmp_path, case, expect):
    path = tmp_path / f"{case}.pt"
    sd = _tiny_sd()
    if case == "garbage":
        path.write_bytes(b"this is not a checkpoint at all" * 10)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "code_exec":
        torch.save({"state_dict": sd, "hook": _Evil()}, path)
    elif case == "no_state_dict":
        torch.save({"epoch": 3, "name": "x"}, path)
    elif case == "unknown_layout":
        torch.save({"encoder.layer.0.weight": torch.zeros(2)}, path)
    elif case == "missing_key":
        sd.pop("ln_final.weight")
        torch.save(sd, path)
    elif case == "extra_key":
        sd["visual.attn_pool.weight"] = torch.zeros(3)
        torch.save(sd, path)
    elif case == "bad_shape":
        sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(500, 128)
        torch.save(sd, path)
    elif case == "nan":
        sd["ln_final.weight"][0] = float("nan")
        torch.save(sd, path)
    elif case == "int_weights":
        sd["ln_final.bias"] = torch.zeros(128, dtype=torch.int64)
        torch.save(sd, path)
    elif case in ("native_bad_config", "native_version"):
        model = random_model("tiny")
        save_checkpoint(path, model)
        obj = torch.load(path, weights_only=True)
        if case == "native_bad_config":
            obj["config"]["vision"]["colour"] = "red"
        else:
            obj["format_version"] = 99
        torch.save(obj, path)
    elif case == "truncated":
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert expect in msg, msg
    if case != "missing_file":
        assert str(path) in msg, msg


def test_torchscript_archive_gets_a_hint(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x * 2
    torch.jit.save(torch.jit.script(Tiny()), tmp_path / "jit.pt")
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_checkpoint(tmp_path / "jit.pt")


def test_code_execution_never_happens(tmp_path, capfd):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "pwned" not in capfd.readouterr().out


def test_argparse_namespace_is_allowed(tmp_path):
    """Research checkpoints carry their argparse args; those are harmless and allowed."""
    import argparse
    torch.save({"state_dict": _tiny_sd(), "args": argparse.Namespace(lr=0.1, arch="ViT")}, tmp_path / "a.pt")
    assert load_checkpoint(tmp_path / "a.pt").layout == "openclip"


def test_native_activation_conflict(tmp_path):
    save_checkpoint(tmp_path / "n.pt", random_model("tiny"))
    with pytest.raises(CheckpointError, match="activation"):
        load_checkpoint(tmp_path / "n.pt", activation="gelu")


def test_safetensors_native_and_openclip(tmp_path):
    from safetensors.torch import save_file
    model = random_model("tiny", seed=2)
    save_checkpoint(tmp_path / "n.safetensors", model, vocab_text="#version: 0.2\na b\n")
    ck = load_checkpoint(tmp_path / "n.safetensors")
    assert ck.layout == "native" and ck.config == PRESETS["tiny"] and ck.vocab_text.startswith("#version")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images)[0], ck.model.encode_image(images)[0])
    ref = RefCLIP(seed=3).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "oc.safetensors"))
    oc = load_checkpoint(tmp_path / "oc.safetensors")
    with torch.no_grad():
        _close(oc.model.encode_image(images)[1], F.normalize(ref.encode_image(images), dim=-1))
    (tmp_path / "bad.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"x": broken json}')
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")
