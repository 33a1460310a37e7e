"""What the benchmarks share: a timer, the machine's memcpy bandwidth (the yardstick the
scorer and the search kernel are both reported against) and the delimited sections of
docs/BENCHMARKS.md that other tools own and the report keeps."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def memcpy_bandwidth(nbytes: int = 512 * 2**20) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    t = timed(lambda: np.copyto(dst, src), 5)
    return nbytes / t          # bytes copied per second (each byte read once and written once)


SECTIONS = ("search-bench", "scene-eval", "precision-bench", "precision-scenes", "instances-bench")   # delimited sections of docs/BENCHMARKS.md other tools own


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


START, END = _markers("search-bench")


def keep_section(path: Path, text: str) -> str:
    """``text`` with the delimited sections of the existing ``path`` (if any) appended, so that
    tools.bench_report, which rewrites the file, keeps what the search benchmark
    (tools.search_bench) and the trained model's evaluation (tools.scene_eval) wrote."""
    old = path.read_text() if path.exists() else ""
    out = text.rstrip("\n")
    for name in SECTIONS:
        start, end = _markers(name)
        if start in old and end in old:
            out += "\n\n" + old[old.index(start):old.index(end) + len(end)]
    return out + "\n"


def write_section(path: Path, section: str, name: str = "search-bench") -> None:
    """Replace (or append) the delimited section ``name`` of ``path``."""
    start, end = _markers(name)
    old = path.read_text() if path.exists() else ""
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)
