"""What a trained FILIP learned, measured through any client of the project (the gRPC
client against a served repository, or the in-process pipeline): held-out scenes from
tools/scenes.py, seeds the training never draws.

    python -m tools.scene_eval --repository build/trained/triton_models [--out build/trained/eval]
    python -m tools.scene_eval --repository DIR --url HOST:8001      # a server already serving DIR

- zero-shot: one-object scenes classified among the 24 "colour shape" names; accuracy of the
  colour, the shape and both, token-wise vs global scoring;
- retrieval: each caption of a 1,000-scene gallery searches the gallery (text -> image):
  R@1 and R@5 by s_T and by the pooled cosine, exact and (served) through filip_search's
  exact and two-stage modes, and two-stage's recall@10 against exact;
- binding: two-object scenes "a C1 S1 and a C2 S2" against the swapped caption
  "a C2 S1 and a C1 S2": how often the true caption scores higher;
- localisation: for each colour and shape word of a caption, whether the patch it matches
  best (argmax over patches of <patch, word>) lies on that object; the chance level is the
  share of the image's patches that object covers;
- heatmaps: for one scene, a PNG per query word of where it matched (``--out``).
Every figure is printed beside its chance level.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tools.scenes import COLOURS, SHAPES, SIZE, patch_masks, scenes

LABELS = [f"{c} {s}" for c in COLOURS for s in SHAPES]
TEMPLATES = ["a {}", "a small {}", "a large {}"]
SEEDS = {"zero_shot": 11, "retrieval": 12, "binding": 13, "localisation": 14, "heatmap": 15}


def _ranks(scores: np.ndarray) -> np.ndarray:
    """scores [n_img, n_txt] with the true image of text j at row j -> the rank of it per text."""
    true = scores[np.arange(scores.shape[1]), np.arange(scores.shape[1])]
    return (scores > true[None, :]).sum(axis=0)


def zero_shot(api, n: int = 300) -> dict:
    sc = scenes(SEEDS["zero_shot"], n, n_objects=1)
    img = api.embed_images([s.image for s in sc])
    out = {}
    for scoring in ("token", "global"):
        pred = np.asarray(api.classify(img, LABELS, templates=TEMPLATES, scoring=scoring)).argmax(axis=1)
        names = [LABELS[p].split(" ") for p in pred]
        colour = np.mean([c == s.objects[0].colour for (c, _), s in zip(names, sc)])
        shape = np.mean([sh == s.objects[0].shape for (_, sh), s in zip(names, sc)])
        both = np.mean([LABELS[p] == s.objects[0].name for p, s in zip(pred, sc)])
        out[scoring] = {"colour": float(colour), "shape": float(shape), "both": float(both)}
    out["chance"] = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "both": 1 / len(LABELS)}
    out["n"] = n
    return out


def retrieval(api, n: int = 1000, client=None) -> dict:
    sc = scenes(SEEDS["retrieval"], n)
    img = api.embed_images([s.image for s in sc])
    txt = api.embed_texts([s.caption for s in sc])
    out = {"n": n, "chance": {"R@1": 1 / n, "R@5": 5 / n}}
    step = max(1, 100_000 // n)                      # the served per-request limit on scored pairs
    for scoring in ("token", "global"):
        r = _ranks(np.concatenate([np.asarray(api.score(img, txt[a:a + step], scoring=scoring, direction="t2i"))
                                   for a in range(0, n, step)], axis=1))
        out[scoring] = {"R@1": float((r < 1).mean()), "R@5": float((r < 5).mean())}
    if client is not None:          # the served search: index the scenes, search every caption
        out["served_search"] = served_search(client, sc)
    return out


def served_search(client, sc) -> dict:
    ids = [f"scene-{i:05d}" for i in range(len(sc))]
    client.index_images([s.pil() for s in sc], "scenes-eval", ids=ids, on_server=True, progress=False)
    client.reload_gallery("scenes-eval")
    caps = [s.caption for s in sc]
    out = {}
    for scoring in ("token", "global"):
        tops = {}
        for mode in ("exact", "two_stage"):
            res = client.search(caps, k=10, mode=mode, scoring=scoring,
                                **({"candidates": 100} if mode == "two_stage" else {}))
            tops[mode] = [[h.id for h in hits] for hits in res]
            rank = [hits.index(ids[i]) if ids[i] in hits else 99 for i, hits in enumerate(tops[mode])]
            out[f"{scoring}/{mode}"] = {"R@1": float(np.mean([r < 1 for r in rank])),
                                        "R@5": float(np.mean([r < 5 for r in rank]))}
        overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(tops["exact"], tops["two_stage"]) if a]
        out[f"{scoring}/two_stage_recall@10_vs_exact"] = float(np.mean(overlap))
    out["two_stage_candidates"] = 100
    return out


def binding(api, n: int = 300) -> dict:
    sc = [s for s in scenes(SEEDS["binding"], 3 * n, n_objects=2)
          if s.objects[0].colour != s.objects[1].colour and s.objects[0].shape != s.objects[1].shape][:n]
    true = [f"a {a.colour} {a.shape} and a {b.colour} {b.shape}" for a, b in (s.objects for s in sc)]
    swapped = [f"a {b.colour} {a.shape} and a {a.colour} {b.shape}" for a, b in (s.objects for s in sc)]
    img = api.embed_images([s.image for s in sc])
    t, w = api.embed_texts(true), api.embed_texts(swapped)
    out = {"n": len(sc), "chance": 0.5}
    for scoring in ("token", "global"):
        st = np.diag(np.asarray(api.score(img, t, scoring=scoring, direction="t2i")))
        sw = np.diag(np.asarray(api.score(img, w, scoring=scoring, direction="t2i")))
        out[scoring] = float((st > sw).mean())
    return out


def _word_tokens(caption: str, tokenizer) -> dict[str, int]:
    """Token index (SOT = 0) of each colour and shape word of the caption (each is one BPE token)."""
    pos, where = 1, {}
    for word in caption.replace(",", " ,").split():
        ids = tokenizer.encode(word)
        if word in COLOURS or word in SHAPES:
            if len(ids) != 1:
                raise ValueError(f"'{word}' is {len(ids)} BPE tokens")
            where.setdefault(word, pos)
        pos += len(ids)
    return where


def localisation(api, tokenizer, grid: int, n: int = 300) -> dict:
    sc = scenes(SEEDS["localisation"], n)
    img = api.embed_images([s.image for s in sc])
    txt = api.embed_texts([s.caption for s in sc])
    hits = {"colour": [], "shape": []}
    chance = {"colour": [], "shape": []}
    for i, s in enumerate(sc):
        where = _word_tokens(s.caption, tokenizer)
        sims = img.tokens[i] @ txt.tokens[i, :int(txt.lengths[i])].T          # [P, L]
        for obj in s.objects:
            on = patch_masks(obj, grid)
            for kind, word in (("colour", obj.colour), ("shape", obj.shape)):
                if word in where and sum(o.colour == word or o.shape == word for o in s.objects) == 1:
                    hits[kind].append(bool(on[int(np.argmax(sims[:, where[word]]))]))
                    chance[kind].append(float(on.mean()))
    return {kind: {"hit": float(np.mean(hits[kind])), "chance": float(np.mean(chance[kind])), "n": len(hits[kind])}
            for kind in hits}


def heatmaps(api, tokenizer, grid: int, out: Path, scale: int = 4) -> list[Path]:
    """One scene, one PNG per colour / shape word: where the word matched (opaque yellow-red
    over the patches most similar to the word, the scene showing through elsewhere)."""
    s = next(x for x in scenes(SEEDS["heatmap"], 20) if len(x.objects) >= 2)
    img, txt = api.embed_images([s.image]), api.embed_texts([s.caption])
    sims = img.tokens[0] @ txt.tokens[0, :int(txt.lengths[0])].T
    out.mkdir(parents=True, exist_ok=True)
    base = s.pil().resize((SIZE * scale, SIZE * scale), Image.NEAREST)
    base.save(out / "scene.png")
    paths = [out / "scene.png"]
    for word, r in _word_tokens(s.caption, tokenizer).items():
        heat = sims[:, r].reshape(grid, grid)
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-6)
        rgba = np.zeros((grid, grid, 4), np.uint8)      # red, opaque where the word matches best
        rgba[..., 0], rgba[..., 1], rgba[..., 3] = 255, (200 * heat ** 2), (220 * heat ** 3)
        layer = Image.fromarray(rgba, "RGBA").resize(base.size, Image.NEAREST)
        p = out / f"heatmap-{word}.png"
        Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB").save(p)
        paths.append(p)
    (out / "caption.txt").write_text(s.caption + "\n")
    return paths


def evaluate(api, tokenizer, grid: int, *, client=None, out: Path | None = None, n_retrieval: int = 1000) -> dict:
    res = {"zero_shot": zero_shot(api), "retrieval": retrieval(api, n_retrieval, client),
           "binding": binding(api), "localisation": localisation(api, tokenizer, grid)}
    if out is not None:
        res["heatmaps"] = [str(p) for p in heatmaps(api, tokenizer, grid, out)]
    return res


def report(res: dict) -> str:
    z, r, b, loc = res["zero_shot"], res["retrieval"], res["binding"], res["localisation"]
    lines = [f"zero-shot, {z['n']} one-object scenes, 24 classes (chance: colour {z['chance']['colour']:.3f}, "
             f"shape {z['chance']['shape']:.3f}, both {z['chance']['both']:.3f}):"]
    for s in ("token", "global"):
        lines.append(f"  {s:6s}: colour {z[s]['colour']:.3f}  shape {z[s]['shape']:.3f}  both {z[s]['both']:.3f}")
    lines.append(f"text -> image retrieval over {r['n']} scenes (chance R@1 {r['chance']['R@1']:.3f}, "
                 f"R@5 {r['chance']['R@5']:.3f}):")
    for s in ("token", "global"):
        lines.append(f"  {s:6s}: R@1 {r[s]['R@1']:.3f}  R@5 {r[s]['R@5']:.3f}")
    for key, v in r.get("served_search", {}).items():
        if isinstance(v, dict):
            lines.append(f"  served search {key:17s}: R@1 {v['R@1']:.3f}  R@5 {v['R@5']:.3f}")
        elif key.endswith("vs_exact"):
            lines.append(f"  served search {key}: {v:.3f}")
    lines.append(f"binding, {b['n']} two-object scenes: true caption beats the colour-swapped one "
                 f"(chance {b['chance']:.2f}): token {b['token']:.3f}, global {b['global']:.3f}")
    lines.append("word-patch localisation (best patch of the word lies on its object):")
    for kind, v in loc.items():
        lines.append(f"  {kind:6s} words: {v['hit']:.3f} (chance {v['chance']:.3f}, n = {v['n']})")
    for p in res.get("heatmaps", []):
        lines.append(f"  wrote {p}")
    return "\n".join(lines)


def markdown(res: dict, command: str, checkpoint: str) -> str:
    """The docs/BENCHMARKS.md section: every figure beside its chance level."""
    z, r, b, loc = res["zero_shot"], res["retrieval"], res["binding"], res["localisation"]
    ss = r.get("served_search", {})
    lines = [
        "## The trained demo model (held-out scenes, through the served path)",
        "",
        f"`{checkpoint}` (tools/train_filip.py on tools/scenes.py), exported, served by tritonserver and "
        f"measured through the gRPC client by `{command}`. Held-out scenes come from seeds the training "
        "never draws.",
        "",
        f"| measure | token-wise (FILIP) | global (pooled cosine) | chance |",
        "|---|---|---|---|",
    ]
    for key in ("colour", "shape", "both"):
        lines.append(f"| zero-shot {key}, {z['n']} one-object scenes, 24 classes | {z['token'][key]:.3f} | "
                     f"{z['global'][key]:.3f} | {z['chance'][key]:.3f} |")
    for key in ("R@1", "R@5"):
        lines.append(f"| text -> image {key}, {r['n']} scenes | {r['token'][key]:.3f} | {r['global'][key]:.3f} | "
                     f"{r['chance'][key]:.3f} |")
        for mode in ("exact", "two_stage"):
            if f"token/{mode}" in ss:
                lines.append(f"| served search ({mode.replace('_', '-')}) {key} | {ss[f'token/{mode}'][key]:.3f} | "
                             f"{ss[f'global/{mode}'][key]:.3f} | {r['chance'][key]:.3f} |")
    if ss:
        lines.append(f"| two-stage recall@10 against exact ({ss['two_stage_candidates']} candidates) | "
                     f"{ss['token/two_stage_recall@10_vs_exact']:.3f} | {ss['global/two_stage_recall@10_vs_exact']:.3f} | |")
    lines.append(f"| binding: the true caption beats the colour-swapped one, {b['n']} two-object scenes | "
                 f"{b['token']:.3f} | {b['global']:.3f} | {b['chance']:.2f} |")
    for kind, v in loc.items():
        lines.append(f"| localisation: a {kind} word's best patch lies on its object (n = {v['n']}) | {v['hit']:.3f} | | "
                     f"{v['chance']:.3f} |")
    lines += ["", "Localisation is token-wise by nature (the argmax over patches of each word's similarity); the "
              "synthetic-gallery recall@10 of the search section above is for random embeddings."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.scene_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True,
                   help="the model repository (its tokenizer and patch grid; served by tritonserver for the run "
                        "unless --url names a server already serving it)")
    p.add_argument("--url", help="a running server serving --repository (HOST:PORT, gRPC)")
    p.add_argument("--out", type=Path, default=None, help="folder for the heatmap PNGs and metrics.json")
    p.add_argument("--n-retrieval", type=int, default=1000)
    p.add_argument("--report", type=Path, default=None,
                   help="write the figures as this file's delimited scene-eval section (docs/BENCHMARKS.md)")
    args = p.parse_args(argv)
    from contextlib import nullcontext

    from filip_client import FilipClient
    from filip_engine.artifacts import read_manifest
    from filip_engine.tokenizer import ClipTokenizer
    from filip_export.launch import TritonServer

    text_dir = args.repository / "filip_text" / "1"
    cfg, manifest = read_manifest(text_dir)
    tok = ClipTokenizer.from_file(text_dir / "tokenizer.json", context_length=cfg.text.context_length)
    with (nullcontext() if args.url else TritonServer(args.repository)) as server:
        with FilipClient(args.url or server.url, timeout=120) as c:
            res = evaluate(c, tok, cfg.vision.grid, client=c, out=args.out, n_retrieval=args.n_retrieval)
    print(report(res))
    if args.out:
        (args.out / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")
    if args.report:
        from tools.measure import write_section
        command = "python -m tools.scene_eval " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(args.report, markdown(res, command, manifest["checkpoint"]), "scene-eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
