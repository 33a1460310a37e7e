"""Indexing images into a gallery through the server (shared by FilipClient and AsyncFilipClient),
and its command line:

    python -m filip_client.indexing --url localhost:8001 --gallery galleries/photos photos/ [--reload photos]

Images are embedded by the served filip_image model and committed in segments of
``commit_every`` items, by one of two writers:

- on the client's filesystem, with :class:`filip_contract.gallery_writer.GalleryWriter`
  (``gallery`` is a folder; for storage the server also mounts, or a gallery built here);
- on the server's (``on_server=True``): ``gallery`` is the name of a gallery under the
  server's gallery root, and each segment is sent to filip_search (APPEND), which writes it
  with the same writer there.  Client and server need share no filesystem.

A run that is killed loses nothing it had committed; running it again skips the ids already
in the gallery.  A bad image (corrupt, missing, too large) is reported in the result and
skipped; the others are indexed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from filip_contract.gallery_writer import GalleryWriter

from . import _protocol as P
from .errors import FilipError, FilipInvalidInputError
from .types import Embeddings, IndexReport


def _resolve(images, ids, metadata) -> tuple[list, list[str], list]:
    if isinstance(images, (str, os.PathLike)):
        files, found = P.image_folder(images)
        images = files
        ids = list(ids) if ids is not None else found
        metadata = list(metadata) if metadata is not None else [{"path": str(f)} for f in files]
    else:
        images = list(images)
        if ids is None:
            if not all(isinstance(im, (str, os.PathLike)) for im in images):
                raise FilipInvalidInputError("ids are required unless every image is a file path")
            ids = [str(im) for im in images]
        ids = list(ids)
        metadata = list(metadata) if metadata is not None else [None] * len(images)
    if len(ids) != len(images) or len(metadata) != len(images):
        raise FilipInvalidInputError(f"{len(images)} images, {len(ids)} ids and {len(metadata)} metadata entries")
    if len(set(ids)) != len(ids):
        raise FilipInvalidInputError("ids must be unique")
    return images, ids, metadata


class ServerGalleryWriter:
    """The writer of a gallery on the server, behind filip_search's APPEND: what
    :class:`GalleryWriter` offers here (``in``, ``add``, ``count``), over ``send(inputs) -> INFO``."""

    def __init__(self, send: Callable[[list], dict], grpc, name: str, token_dtype: str, ids: Sequence[str]):
        self.send, self.grpc, self.name, self.token_dtype = send, grpc, name, token_dtype
        info = send(P.append_inputs(grpc, name, list(ids), token_dtype))       # which of ids the gallery holds
        self._present, self.count = set(info["present"]), int(info["count"])

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._present

    def add(self, ids: Sequence[str], tokens, pooled, metadata) -> int:
        info = self.send(P.append_inputs(self.grpc, self.name, list(ids), self.token_dtype, tokens, pooled, metadata))
        self._present.update(ids)
        self.count = int(info["count"])
        return self.count

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def index_images(embed: Callable[[list], Embeddings], images: Sequence[P.ImageLike] | str | os.PathLike,
                 gallery: str | os.PathLike, *, ids: Sequence[str] | None = None,
                 metadata: Sequence[Mapping[str, Any] | None] | None = None, token_dtype: str = "float16",
                 commit_every: int = 256, progress: bool = True,
                 server: Callable[[list[str]], ServerGalleryWriter] | None = None) -> IndexReport:
    """``embed(list_of_images) -> Embeddings`` is the client's embed_images; ``server(ids)``,
    when given, opens the server's writer of the gallery named ``gallery``."""
    if commit_every < 1:
        raise FilipInvalidInputError(f"commit_every must be at least 1, got {commit_every}")
    images, ids, metadata = _resolve(images, ids, metadata)
    report = IndexReport(gallery=str(gallery))
    t0 = time.perf_counter()
    with (server(ids) if server is not None else GalleryWriter(gallery, token_dtype=token_dtype)) as w:
        todo = [i for i in range(len(images)) if ids[i] not in w]
        report.skipped = len(images) - len(todo)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), unit="img", desc=f"indexing {Path(gallery).name}")
        try:
            for a in range(0, len(todo), commit_every):
                group = todo[a:a + commit_every]
                try:
                    parts, ok = [embed([images[i] for i in group])], group
                except FilipInvalidInputError:
                    parts, ok = [], []           # isolate the bad image(s): one request each
                    for i in group:
                        try:
                            parts.append(embed([images[i]]))
                            ok.append(i)
                        except FilipInvalidInputError as e:
                            report.failed[ids[i]] = str(e)
                if ok:
                    emb = Embeddings.concat(parts)
                    w.add([ids[i] for i in ok], emb.tokens, emb.pooled, [metadata[i] for i in ok])
                    report.added += len(ok)
                if bar is not None:
                    bar.update(len(group))
        finally:
            if bar is not None:
                bar.close()
        report.total = w.count
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m filip_client.indexing", description="Embed images through the server into a gallery.")
    p.add_argument("images", nargs="+", help="image files, or one folder (searched recursively)")
    p.add_argument("--gallery", required=True, type=Path,
                   help="gallery folder (created, or resumed if it exists); with --on-server, a gallery name")
    p.add_argument("--on-server", action="store_true",
                   help="write the gallery on the server, under its gallery root (no shared filesystem needed)")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address (default localhost:8001)")
    p.add_argument("--token-dtype", choices=["float16", "int8"], default="float16",
                   help="stored token precision: float16 (default) or int8 with a per-token scale")
    p.add_argument("--batch-size", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--commit-every", type=int, default=256, help="images per committed segment (default 256)")
    p.add_argument("--reload", metavar="NAME", default=None,
                   help="afterwards, tell filip_search to load the gallery NAME (a folder under its gallery root)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from .sync import FilipClient
    images = args.images[0] if len(args.images) == 1 and Path(args.images[0]).is_dir() else args.images
    try:
        with FilipClient(args.url) as client:
            gallery = str(args.gallery) if args.on_server else args.gallery
            r = client.index_images(images, gallery, token_dtype=args.token_dtype, batch_size=args.batch_size,
                                    commit_every=args.commit_every, progress=not args.no_progress,
                                    on_server=args.on_server)
            print(f"{r.gallery}: added {r.added}, skipped {r.skipped} already indexed, failed {len(r.failed)}; "
                  f"{r.total} items; {r.images_per_s:.1f} images/s")
            for item_id, why in r.failed.items():
                print(f"  failed {item_id}: {why}", file=sys.stderr)
            if args.reload:
                info = client.reload_gallery(args.reload)
                print(f"filip_search loaded {args.reload!r}: {info['count']} items in {info['load_ms']} ms")
    except FilipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if not r.failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
