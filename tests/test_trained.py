"""The trained demo model (models/filip-scenes.pt, made by tools/train_filip.py on
tools/scenes.py) through the served path: what it learned must survive export, serving and
the client. A swapped channel, a wrong mask or a shifted token would pass every parity test
that compares the engine with itself, but not these gates, which sit well above chance and
below what the committed checkpoint measures (docs/BENCHMARKS.md, "The trained demo model").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.scenes import SHAPES, SIZE, make_scene, patch_masks, scenes

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "models" / "filip-scenes.pt"


def test_scenes_are_a_function_of_their_seed_and_captions_say_what_is_drawn():
    a, b = scenes(5, 40), scenes(5, 40)
    assert all(np.array_equal(x.image, y.image) and x.caption == y.caption for x, y in zip(a, b))
    for s in a:
        assert s.image.shape == (SIZE, SIZE, 3) and 1 <= len(s.objects) <= 3
        for o in s.objects:
            assert o.colour in s.caption and o.shape in s.caption
            colour = s.image[o.mask].astype(int).mean(axis=0)            # the object is painted where its mask is
            assert np.abs(colour - s.image[o.mask][0]).max() < 25
            assert patch_masks(o, 8).any()
        for i, o in enumerate(s.objects):                                # objects do not overlap
            for p in s.objects[i + 1:]:
                assert not (o.mask & p.mask).any()
        if " left of " in s.caption:
            first, second = s.objects
            assert first.centre[0] < second.centre[0]
        if " above " in s.caption:
            first, second = s.objects
            assert first.centre[1] < second.centre[1]
    assert {o.shape for s in a for o in s.objects} == set(SHAPES)


def test_training_is_deterministic_from_its_seed(tmp_path):
    from tools.train_filip import train

    runs = []
    for name in ("a", "b"):
        train(tmp_path / f"{name}.pt", seed=3, minutes=0, steps=2, batch_size=8, lr=1e-3, threads=1)
        runs.append(torch.load(tmp_path / f"{name}.pt", weights_only=True)["state_dict"])
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["steps"] == 2 and record["seed"] == 3 and record["schedule_steps"] == 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from filip_client import FilipClient
    from filip_export.launch import TritonServer
    from filip_export.to_trt import main as export_main

    repo = tmp_path_factory.mktemp("trained") / "triton_models"
    assert export_main([str(CKPT), "--out", str(repo)]) == 0
    with TritonServer(repo) as server, FilipClient(server.url, timeout=120) as client:
        yield repo, client


@pytest.mark.slow
def test_what_the_trained_model_learned_survives_serving(served, tmp_path):
    from filip_engine.artifacts import read_manifest
    from filip_engine.pipeline import FilipPipeline
    from filip_engine.tokenizer import ClipTokenizer
    from tools.scene_eval import evaluate, report

    repo, client = served
    cfg, manifest = read_manifest(repo / "filip_text" / "1")
    assert manifest["default_scoring"] == "token"                      # a FILIP checkpoint
    tok = ClipTokenizer.from_file(repo / "filip_text" / "1" / "tokenizer.json", context_length=cfg.text.context_length)
    res = evaluate(client, tok, cfg.vision.grid, client=client, out=tmp_path, n_retrieval=500)
    print(report(res))
    z, r, b, loc = res["zero_shot"], res["retrieval"], res["binding"], res["localisation"]
    assert z["token"]["colour"] >= 0.8 and z["global"]["colour"] >= 0.8            # chance 1/6
    assert z["token"]["shape"] >= 0.4 and z["global"]["shape"] >= 0.4              # chance 1/4
    assert r["token"]["R@5"] >= 0.1 and r["global"]["R@5"] >= 0.1                  # chance 0.01
    served = r["served_search"]
    for scoring in ("token", "global"):        # search ranks as score does (the gallery holds fp16 tokens)
        assert all(abs(served[f"{scoring}/exact"][k] - r[scoring][k]) <= 0.02 for k in ("R@1", "R@5"))
    assert served["token/two_stage_recall@10_vs_exact"] >= 0.9
    assert b["token"] >= 0.55 and b["global"] >= 0.55                               # chance 0.5
    for kind in ("colour", "shape"):                                                # chance about 0.09
        assert loc[kind]["hit"] >= 4 * loc[kind]["chance"] and loc[kind]["n"] >= 200, loc
    assert all(Path(p).is_file() for p in res["heatmaps"])
    # the same numbers in-process: served embeddings equal the checkpoint's own
    pipe = FilipPipeline.from_checkpoint(CKPT)
    sc = [make_scene(np.random.default_rng(99)) for _ in range(6)]
    a, c = pipe.embed_images([s.image for s in sc]), client.embed_images([s.image for s in sc])
    assert np.abs(a.tokens - c.tokens).max() < 1e-4 and np.abs(a.pooled - c.pooled).max() < 1e-4
