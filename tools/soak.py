"""Soak test: mixed image / text / score traffic with a share of bad requests, at a fixed rate,
for a set duration, against a real server.

    python -m tools.soak --repository build/demo/triton_models --duration 600 --rate 10
    python -m tools.soak --url localhost:8001 --pid $(pgrep -f bin/tritonserver) --duration 60

Reports requests served, errors by kind, p50/p99 per interval, and the server's memory (RSS
of the server and its Python-backend stubs, read from /proc) over time.  Exit 1 if a good
request failed, memory kept growing, or the server stopped answering; 0 otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from filip_client.errors import FilipError, FilipInvalidInputError


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields_ = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            ppid, pages = int(fields_[1]), int(fields_[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
        rss[int(proc.name)] = pages * 4096
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


MIN_MEMORY_SAMPLES = 8
MEMORY_SAMPLES = 32      # RSS samples per run, whatever the report interval


def memory_grows(samples: list[int], tolerance: float = 0.10) -> bool:
    """True when the last quarter's mean exceeds the second quarter's by more than ``tolerance``
    (the first quarter is warm-up: allocators and caches fill).  Needs MIN_MEMORY_SAMPLES;
    fewer cannot be judged (``run_soak`` takes MEMORY_SAMPLES and fails a run it could not judge)."""
    if len(samples) < MIN_MEMORY_SAMPLES:
        raise ValueError(f"{len(samples)} memory samples cannot be judged; at least {MIN_MEMORY_SAMPLES} are needed")
    q = len(samples) // 4
    early, late = float(np.mean(samples[q:2 * q])), float(np.mean(samples[-q:]))
    return late > early * (1 + tolerance)


@dataclass
class Interval:
    t: float
    requests: int
    p50_ms: float
    p99_ms: float
    rss_mib: float


@dataclass
class SoakReport:
    duration_s: float
    rate: float
    requests: int = 0
    good_ok: int = 0
    good_failed: int = 0
    bad_rejected: int = 0
    bad_accepted: int = 0
    errors: dict = field(default_factory=dict)
    intervals: list = field(default_factory=list)
    alive_at_end: bool = False
    memory_samples: list = field(default_factory=list)   # server RSS in bytes, MEMORY_SAMPLES over the run
    memory_growing: bool | None = None                   # None: not judged (no server pid to measure)

    @property
    def passed(self) -> bool:
        return (self.good_failed == 0 and self.bad_accepted == 0 and self.alive_at_end
                and self.memory_growing is not True)


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((320, 240), Image.BICUBIC).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def run_soak(url: str, *, duration: float, rate: float, bad_share: float = 0.1, interval: float = 10.0,
             pid: int | None = None, seed: int = 0, log=print, rss=process_tree_rss) -> SoakReport:
    """``rss(pid) -> bytes`` measures the server (its process tree); memory is sampled
    MEMORY_SAMPLES times over the run, independently of the report ``interval``."""
    from filip_client import FilipClient
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    jpegs = [_jpeg(rng) for _ in range(8)]
    words = "a photo of the dog cat red blue car on in with street park".split()
    report = SoakReport(duration, rate)
    lock = threading.Lock()
    errors: Counter = Counter()
    lat: list[float] = []
    client = FilipClient(url, timeout=30, concurrency=1)
    query = client.embed_texts(["a photo of a dog"])
    gallery = client.embed_images(jpegs[:4])

    def good(kind: str):
        if kind == "image":
            client.embed_images([jpegs[pick.randrange(8)]])
        elif kind == "text":
            client.embed_texts([" ".join(pick.choice(words) for _ in range(pick.randint(3, 15)))])
        else:
            client.score(gallery, query, direction="t2i", scoring="token")

    def bad(kind: str):   # refused on the server (corrupt image) or by the client (over-long text)
        if kind == "image":
            client.embed_images([b"\xff\xd8\xff\xe0" + bytes(pick.randrange(10, 200))])
        else:
            client.embed_texts(["x" * 5000])

    def one(i: int):
        is_bad = pick.random() < bad_share
        kind = pick.choice(["image", "text", "score"] if not is_bad else ["image", "text"])
        t = time.perf_counter()
        try:
            (bad if is_bad else good)(kind)
            outcome = "bad accepted" if is_bad else "ok"
        except FilipInvalidInputError:
            outcome = "rejected (invalid input)" if is_bad else "good failed: invalid input"
        except FilipError as e:
            outcome = f"{'bad' if is_bad else 'good'} failed: {type(e).__name__}"
        dt = time.perf_counter() - t
        with lock:
            report.requests += 1
            errors[outcome] += 1
            if outcome == "ok":
                lat.append(dt)

    t0 = time.monotonic()
    next_report = t0 + interval
    sample_every = duration / MEMORY_SAMPLES
    next_sample = t0 + sample_every
    with ThreadPoolExecutor(16) as pool:
        i = 0
        while time.monotonic() - t0 < duration:
            pool.submit(one, i)
            i += 1
            target = t0 + i / rate                       # fixed arrival rate (open loop)
            now = time.monotonic()
            if pid and now >= next_sample:
                report.memory_samples.append(rss(pid))
                next_sample += sample_every
            if now >= next_report:
                with lock:
                    window, lat[:] = list(lat), []
                mem = report.memory_samples[-1] if report.memory_samples else 0
                ms = np.asarray(window) * 1e3
                iv = Interval(round(now - t0, 1), len(window), float(np.percentile(ms, 50)) if ms.size else float("nan"),
                              float(np.percentile(ms, 99)) if ms.size else float("nan"), mem / 2**20)
                report.intervals.append(asdict(iv))
                log(f"t={iv.t:6.1f}s  ok={iv.requests:5d}  p50={iv.p50_ms:7.2f} ms  p99={iv.p99_ms:7.2f} ms  "
                    f"server RSS={iv.rss_mib:7.1f} MiB")
                next_report += interval
            if target > now:
                time.sleep(target - now)
    report.errors = dict(errors)
    report.good_ok = errors["ok"]
    report.good_failed = sum(v for k, v in errors.items() if k.startswith("good failed"))
    report.bad_rejected = errors["rejected (invalid input)"]
    report.bad_accepted = errors["bad accepted"] + sum(v for k, v in errors.items() if k.startswith("bad failed"))
    try:
        report.alive_at_end = client.health(deep=True).ok
    except FilipError:
        report.alive_at_end = False
    if pid:
        while len(report.memory_samples) < MEMORY_SAMPLES:          # the loop may end a sample short
            report.memory_samples.append(rss(pid))
        report.memory_growing = memory_grows(report.memory_samples)
    client.close()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; else one is started on --repository")
    p.add_argument("--repository", type=Path)
    p.add_argument("--pid", type=int, help="server PID for memory tracking (known when the soak starts the server)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    p.add_argument("--bad-share", type=float, default=0.1, help="share of bad requests (default 0.1)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between report lines (default 30)")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if (args.url is None) == (args.repository is None):
        p.error("give exactly one of --url or --repository")
    from filip_export.launch import TritonServer
    server = TritonServer(args.repository).start() if args.repository else None
    try:
        report = run_soak(server.url if server else args.url, duration=args.duration, rate=args.rate,
                          bad_share=args.bad_share, interval=args.interval,
                          pid=server.proc.pid if server else args.pid)
    finally:
        if server:
            server.stop()
    print(json.dumps({k: v for k, v in asdict(report).items() if k not in ("intervals", "memory_samples")},
                     indent=1, default=str))
    print("PASS" if report.passed else "FAIL")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1, default=str))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
