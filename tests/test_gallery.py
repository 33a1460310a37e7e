"""The gallery format: the client's writer and the engine's reader against each other, the
commit protocol (a killed writer loses nothing committed and leaves nothing served half
written), and refusal of corrupt, truncated or foreign files with a clear error."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from filip_contract.gallery import MANIFEST, GalleryError, GalleryWriteError, gallery_bytes
from filip_contract.gallery_writer import GalleryWriter, quantize_int8
from tools.gallery_synth import SyntheticSpec, synthesize
from filip_contract.gallery_reader import Gallery

ROOT = Path(__file__).resolve().parent.parent


def _items(n: int, p: int = 5, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((n, p, d)).astype(np.float32)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    return t, rng.standard_normal((n, 6)).astype(np.float32)


def test_round_trip_fp16(tmp_path):
    t, pooled = _items(7)
    with GalleryWriter(tmp_path / "g", model={"name": "test"}) as w:
        assert w.add([f"a{i}" for i in range(4)], t[:4], pooled[:4], [{"n": i} for i in range(4)]) == 4
        assert w.add(["b0", "b1", "b2"], t[4:], pooled[4:]) == 7
    g = Gallery.open(tmp_path / "g")
    assert g.count == 7 and g.ids == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    assert (g.tokens_per_item, g.dim, g.token_dtype, len(g.segments)) == (5, 8, "float16", 2)
    assert np.array_equal(g.tokens_of(np.arange(7)), t.astype(np.float16).astype(np.float32))
    # any order, across segments
    rows = np.array([6, 0, 3, 4])
    assert np.array_equal(g.tokens_of(rows), t[rows].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(g.centroids(), t.mean(axis=1), rtol=0, atol=1e-7)
    assert g.metadata(2) == {"n": 2} and g.metadata(5) == {}
    assert g.info()["model"] == {"name": "test"}
    assert list(g.rows_of(["b1", "a0", "zzz"])) == [0, 5]
    assert gallery_bytes(tmp_path / "g") > t.nbytes / 2


def test_int8_tokens_within_half_a_step(tmp_path):
    t, pooled = _items(6, p=7, d=16, seed=1)
    with GalleryWriter(tmp_path / "g", token_dtype="int8") as w:
        w.add([str(i) for i in range(6)], t, pooled)
    g = Gallery.open(tmp_path / "g")
    x = g.tokens_of(np.arange(6))
    step = np.abs(t).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(x - t) <= step / 2 + 1e-7)
    q, s = quantize_int8(t)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and s.shape == (6, 7)


def test_writer_rejects_bad_items_and_writes_nothing(tmp_path):
    t, pooled = _items(3)
    with GalleryWriter(tmp_path / "g") as w:
        w.add(["x"], t[:1], pooled[:1])
        bad = t.copy()
        bad[1, 2, 3] = np.nan
        with pytest.raises(GalleryWriteError) as e:
            w.add(["x", "", "y"], bad, pooled[:2], [{"a": object()}, None, None])
        msg = str(e.value)
        for part in ("already in the gallery", "non-empty one-line string", "NaN", "pooled must be", "JSON"):
            assert part in msg, (part, msg)
        with pytest.raises(GalleryWriteError, match="another model"):
            w.add(["z"], _items(1, p=6)[0], pooled[:1])
    g = Gallery.open(tmp_path / "g")
    assert g.count == 1 and len(list((tmp_path / "g" / "segments").iterdir())) == 4   # tokens, pooled, centroid, items


def test_one_writer_at_a_time_and_dtype_fixed(tmp_path):
    with GalleryWriter(tmp_path / "g"):
        with pytest.raises(GalleryWriteError, match="another process"):
            GalleryWriter(tmp_path / "g")
    t, pooled = _items(1)
    with GalleryWriter(tmp_path / "g") as w:
        w.add(["a"], t, pooled)
    with pytest.raises(GalleryWriteError, match="cannot append int8"):
        GalleryWriter(tmp_path / "g", token_dtype="int8")


@pytest.fixture()
def small(tmp_path):
    t, pooled = _items(6)
    with GalleryWriter(tmp_path / "g") as w:
        w.add(["a", "b", "c"], t[:3], pooled[:3])
        w.add(["d", "e", "f"], t[3:], pooled[3:])
    return tmp_path / "g"


def _seg(path: Path, kind: str, i: int = 1) -> Path:
    return path / "segments" / f"seg-{i:06d}.{kind}"


@pytest.mark.parametrize("damage, match", [
    (lambda p: _seg(p, "tokens.npy").write_bytes(_seg(p, "tokens.npy").read_bytes()[:-10]), "truncated"),
    (lambda p: _seg(p, "pooled.npy").unlink(), "missing"),
    (lambda p: (p / MANIFEST).write_text("{not json"), "unreadable manifest"),
    (lambda p: (p / MANIFEST).unlink(), "gallery.json is missing"),
    (lambda p: (p / MANIFEST).write_text(json.dumps({**json.loads((p / MANIFEST).read_text()), "version": 9})), "format version"),
    (lambda p: (p / MANIFEST).write_text(json.dumps({**json.loads((p / MANIFEST).read_text()), "count": 7})), "count"),
    (lambda p: _seg(p, "items.jsonl", 0).write_text(_seg(p, "items.jsonl", 0).read_text().replace('"c"', '"X"')), "checksum"),
])
def test_damaged_gallery_is_refused(small, damage, match):
    damage(small)
    with pytest.raises(GalleryError, match=match):
        Gallery.open(small)


def test_flipped_byte_found_by_checksum_not_by_size(small):
    f = _seg(small, "tokens.npy")
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))
    assert Gallery.open(small, verify="size").count == 6     # same size: only the hash sees it
    with pytest.raises(GalleryError, match="checksum mismatch"):
        Gallery.open(small)


def test_wrong_array_under_right_checksum_is_refused(small):
    """A file replaced by a valid .npy of another shape, manifest updated to match its bytes."""
    import hashlib
    f = _seg(small, "pooled.npy")
    np.save(f, np.zeros((3, 7), np.float32))
    m = json.loads((small / MANIFEST).read_text())
    m["segments"][1]["files"]["pooled.npy"] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (small / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(GalleryError, match=r"expected float32 \[3, 6\]"):
        Gallery.open(small)


def test_uncommitted_segment_is_invisible_and_cleaned(small):
    """Files of a segment that never reached the manifest (a writer killed mid-commit)."""
    for kind in ("tokens.npy", "pooled.npy"):
        _seg(small, kind, 2).write_bytes(b"half written")
    assert Gallery.open(small).count == 6
    with GalleryWriter(small) as w:
        assert sorted(w.removed_orphans) == ["seg-000002.pooled.npy", "seg-000002.tokens.npy"]
        t, pooled = _items(1, seed=5)
        w.add(["g"], t, pooled)
    assert Gallery.open(small).ids[-1] == "g"


def test_no_gallery_is_a_clear_error(tmp_path):
    with pytest.raises(GalleryError, match="no gallery at"):
        Gallery.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GalleryError, match="gallery.json is missing"):
        Gallery.open(tmp_path / "empty")


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tools.gallery_synth import SyntheticSpec, synthesize
synthesize({path!r}, 4000, segment=200, spec=SyntheticSpec(dim=32, tokens=9, topics=20, words=64, seed=3), progress=True)
"""


def test_killed_writer_loses_nothing_and_resumes(tmp_path):
    """Kill (SIGKILL) a writer mid-run, check what it committed is servable, resume, and
    compare with an uninterrupted run of the same seed: identical tokens and ids."""
    path = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:                       # wait until a few segments are committed
        if "1000/4000" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    g = Gallery.open(path)
    assert 1000 <= g.count < 4000 and g.count % 200 == 0, g.count
    killed_at = g.count
    spec = SyntheticSpec(dim=32, tokens=9, topics=20, words=64, seed=3)
    r = synthesize(path, 4000, segment=200, spec=spec)
    assert r["written"] == 4000 - killed_at
    synthesize(tmp_path / "straight", 4000, segment=200, spec=spec)
    a, b = Gallery.open(path), Gallery.open(tmp_path / "straight")
    assert a.ids == b.ids and a.count == 4000
    rows = np.arange(0, 4000, 7)
    assert np.array_equal(a.tokens_of(rows), b.tokens_of(rows))
    assert not [p for p in (path / "segments").iterdir() if p.name.endswith(".tmp")]


def test_synthetic_gallery_is_reproducible(tmp_path):
    spec = dict(dim=16, tokens=4, topics=5, words=20, words_per_topic=6, seed=11)
    for name in ("a", "b"):
        synthesize(tmp_path / name, 300, segment=100, spec=SyntheticSpec(**spec))
    a, b = Gallery.open(tmp_path / "a"), Gallery.open(tmp_path / "b")
    assert np.array_equal(a.tokens_of(np.arange(300)), b.tokens_of(np.arange(300)))
    qa, qb = np.load(tmp_path / "a" / "synthetic-queries.npz"), np.load(tmp_path / "b" / "synthetic-queries.npz")
    assert np.array_equal(qa["tokens"], qb["tokens"]) and list(qa["targets"]) == list(qb["targets"])
