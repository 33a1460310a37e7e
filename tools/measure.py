"""What the benchmarks share: a timer, the machine's memcpy bandwidth (the yardstick the
scorer and the search kernel are both reported against) and the delimited section of
docs/BENCHMARKS.md that the search benchmark owns and the report keeps."""
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


START, END = "<!-- search-bench:start -->", "<!-- search-bench:end -->"


def keep_section(path: Path, text: str) -> str:
    """``text`` with the search section of the existing ``path`` (if any) appended, so that
    tools.bench_report, which rewrites the file, keeps what this benchmark wrote."""
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        return text.rstrip("\n") + "\n\n" + old[old.index(START):old.index(END) + len(END)] + "\n"
    return text


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the delimited search section of ``path``."""
    old = path.read_text() if path.exists() else ""
    block = f"{START}\n{section.rstrip()}\n{END}"
    if START in old and END in old:
        new = old[:old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)
