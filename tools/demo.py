"""The last step of ``make demo``: serve a model repository with ``tritonserver``, embed a
real photograph and drawn images plus a few captions through the gRPC client, print s_I /
s_T, a zero-shot classification and a word-patch alignment map, check the served
embeddings against in-process PyTorch, index a folder of images into a gallery through the
server and search it (exact and two-stage), stop the server.

    python -m tools.demo --repository build/demo/triton_models --checkpoint build/demo/filip-ViT-B-32.pt
    python -m tools.demo --url localhost:8001            # against a server you started

A random-initialised checkpoint gives meaningless rankings; the demo shows the machinery and
that the numbers are exact.
"""
from __future__ import annotations

import argparse
import json
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from filip_client.errors import FilipError
from filip_export.launch import TritonServer
from filip_client import FilipClient

TEXTS = ["a photo of a woman in uniform", "a red circle on a white background",
         "a blue square", "a diagram of a neural network", "!"]
LABELS = ["person", "circle", "square", "cat"]


def demo_images() -> dict[str, object]:
    """A real photograph shipped with matplotlib (when installed) and drawn images, in the
    different forms the client accepts (path, bytes, PIL, array)."""
    images: dict[str, object] = {}
    try:
        import matplotlib
        photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if photo.is_file():
            images["grace_hopper.jpg (path)"] = str(photo)
    except ImportError:
        pass
    circle = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(circle).ellipse((90, 50, 230, 190), fill="red")
    buf = io.BytesIO()
    circle.save(buf, format="PNG")
    images["red circle (PNG bytes)"] = buf.getvalue()
    square = Image.new("RGB", (200, 300), "white")
    ImageDraw.Draw(square).rectangle((40, 90, 160, 210), fill="blue")
    images["blue square (PIL)"] = square
    images["noise (uint8 array)"] = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    return images


def _table(title: str, rows: list[str], cols: list[str], m: np.ndarray) -> str:
    w = max(len(r) for r in rows)
    head = " " * w + " | " + " ".join(f"{c[:14]:>14}" for c in cols)
    lines = [title, head, "-" * len(head)]
    lines += [f"{r:<{w}} | " + " ".join(f"{v:>+14.4f}" for v in m[i]) for i, r in enumerate(rows)]
    return "\n".join(lines)


def photo_folder(folder: Path) -> Path:
    """The demo's image folder for indexing: the photograph plus drawn shapes in a few colours."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, item in demo_images().items():
        if isinstance(item, str):
            (folder / Path(item).name).write_bytes(Path(item).read_bytes())
    for colour in ("red", "blue", "green", "yellow", "black"):
        for shape in ("circle", "square"):
            im = Image.new("RGB", (240, 200), "white")
            draw = ImageDraw.Draw(im)
            (draw.ellipse if shape == "circle" else draw.rectangle)((60, 40, 180, 160), fill=colour)
            im.save(folder / f"{colour}-{shape}.png")
    return folder


def gallery_search(client: FilipClient, gallery: Path, photos: Path) -> None:
    """Index the photo folder through the server, load it into filip_search, search it."""
    report = client.index_images(photos, gallery, commit_every=4, progress=False)
    print(f"indexed {photos} into {gallery}: added {report.added} ({report.images_per_s:.1f} images/s through the "
          f"server), {report.skipped} already there, {len(report.failed)} failed; {report.total} items")
    info = client.reload_gallery(gallery.name)
    print(f"filip_search loaded gallery '{gallery.name}': {info['count']} items, {info['segments']} segments, "
          f"verified in {info['load_ms']} ms")
    queries = ["a red circle", "a blue square", "a photo of a woman in uniform"]
    exact = client.search(queries, k=3)
    print(f"search (exact, {exact.info[0]['timings_ms']} ms):")
    for q, hits in zip(queries, exact):
        print(f"  {q!r}: " + ", ".join(f"{h.id} {h.score:+.4f}" for h in hits))
    two = client.search(queries, k=3, mode="two_stage", candidates=info["count"])
    same = [[h.id for h in a] for a in two] == [[h.id for h in a] for a in exact]
    print(f"two-stage with every item a candidate equals exact: {same}")
    if not same:
        raise FilipError("two-stage search with all items as candidates differs from exact search")


def run(client: FilipClient, checkpoint: Path | None, gallery: Path | None = None,
        scenes: tuple[Path, Path] | None = None) -> None:
    images = demo_images()
    names = list(images)
    t = time.perf_counter()
    img = client.embed_images(list(images.values()))
    t_img = time.perf_counter() - t
    t = time.perf_counter()
    txt = client.embed_texts(TEXTS)
    t_txt = time.perf_counter() - t
    print(f"served: {len(img)} images in {t_img * 1e3:.0f} ms -> tokens {img.tokens.shape}, pooled {img.pooled.shape}")
    print(f"served: {len(txt)} texts in {t_txt * 1e3:.0f} ms -> tokens {txt.tokens.shape}, lengths {txt.lengths.tolist()}")
    print()
    print(_table("s_I (token scoring, image -> text: mean over patches of the best word)", names, TEXTS,
                 client.score(img, txt, scoring="token")))
    print()
    print(_table("s_T (token scoring, text -> image: mean over words of the best patch)", names, TEXTS,
                 client.score(img, txt, scoring="token", direction="t2i")))
    print()
    print(_table("global scoring (cosine of the pooled embeddings)", names, TEXTS, client.score(img, txt, scoring="global")))
    print()
    scoring = client.default_scoring()
    zs = client.classify(img, LABELS)
    rule = "mean s_I over the prompt ensemble" if scoring == "token" else "CLIP's rule: mean template embedding"
    print(_table(f"zero-shot by the repository's default scoring, {scoring} ({rule})", names, LABELS, zs))
    for n, row in zip(names, zs):
        print(f"  {n}: {LABELS[int(np.argmax(row))]}")
    print()
    amap = client.alignment(img[0], txt[0])
    print(f"word-patch alignment of '{names[0]}' with '{TEXTS[0]}' (best token per patch; 0 = SOT):")
    print("\n".join("  " + " ".join(f"{v:2d}" for v in row) for row in np.atleast_2d(amap)))
    if checkpoint is not None:
        # in-process comparison: the engine is imported lazily, only here
        from filip_engine.compare import compare_outputs
        from filip_engine.io_spec import Tolerance
        from filip_engine.pipeline import FilipPipeline
        ref = FilipPipeline.from_checkpoint(checkpoint)
        print()
        for what, a, b in (("images", ref.embed_images(list(images.values())), img), ("texts", ref.embed_texts(TEXTS), txt)):
            r = compare_outputs({"tokens": a.tokens, "pooled": a.pooled}, {"tokens": b.tokens, "pooled": b.pooled},
                                Tolerance(max_abs=1e-4, min_cosine=0.9999), f"served vs in-process PyTorch, {what}")
            print(r.summary())
            r.raise_if_failed()
    if gallery is not None:
        print()
        gallery_search(client, gallery, photo_folder(gallery.parent.parent / "photos"))
    if scenes is None:
        print("\n(with random weights the rankings above are meaningless; the numbers are exact. "
              "make demo serves the trained models/filip-scenes.pt and measures what it learned)")
        return
    # what a trained checkpoint learned, on held-out scenes, through this server
    from filip_engine.artifacts import read_manifest
    from filip_engine.tokenizer import ClipTokenizer
    from tools.scene_eval import evaluate, report
    repository, out = scenes
    cfg, _ = read_manifest(repository / "filip_text" / "1")
    tok = ClipTokenizer.from_file(repository / "filip_text" / "1" / "tokenizer.json",
                                  context_length=cfg.text.context_length)
    print("\nheld-out scenes (tools/scenes.py), measured through this server:")
    res = evaluate(client, tok, cfg.vision.grid, client=client, out=out)
    print(report(res))
    (out / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, help="model repository to serve (starts and stops tritonserver)")
    p.add_argument("--url", help="use a running server instead (host:grpc_port)")
    p.add_argument("--checkpoint", type=Path, help="also compare with in-process PyTorch on this checkpoint")
    p.add_argument("--scenes-eval", type=Path, default=None, metavar="DIR",
                   help="with --repository: also measure a scenes-trained checkpoint (tools/scene_eval.py) "
                        "through the server and write its word heatmaps and metrics.json to DIR")
    p.add_argument("--gallery", type=Path, default=None,
                   help="gallery folder to index the demo photos into and search (its name is what filip_search "
                        "loads from its gallery root; default with --repository: <repository>/../galleries/demo)")
    args = p.parse_args(argv)
    if (args.repository is None) == (args.url is None):
        p.error("give exactly one of --repository or --url")
    if args.scenes_eval and args.repository is None:
        p.error("--scenes-eval needs --repository (its tokenizer and patch grid)")
    try:
        if args.url:
            with FilipClient(args.url) as client:
                run(client, args.checkpoint, args.gallery)
        else:
            with TritonServer(args.repository) as server:
                print(f"tritonserver ready on {server.url} in {server.startup_s:.1f} s (log: {server.log})")
                with FilipClient(server.url) as client:
                    run(client, args.checkpoint, args.gallery or args.repository.resolve().parent / "galleries" / "demo",
                        (args.repository, args.scenes_eval) if args.scenes_eval else None)
            print("tritonserver stopped")
    except (FilipError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from filip_engine.errors import FilipError as EngineError  # a failed parity gate, a bad checkpoint
        if isinstance(e, EngineError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
