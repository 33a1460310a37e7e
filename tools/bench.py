"""Latency benchmark: sweeps of concurrency x request batch size against a running server
(or one it starts), the same workloads in-process, percentiles, Triton's server-side split.

    python -m tools.bench --url localhost:8001 --repository triton_models
    python -m tools.bench --repository build/demo/triton_models --workloads image,text --concurrency 1,4,8 --batch 1,8

For each (workload, concurrency, batch) point: warm-up requests, then measurement windows of
``--window`` seconds (closed loop: ``concurrency`` threads each sending one request, waiting
for the answer, sending the next) until the last 3 windows agree (throughput and p50 within
10%) or ``--max-time`` passes.  Reported over those last windows: throughput (items/s),
p50/p90/p95/p99/max latency, errors, and from Triton's statistics API the mean queue /
compute-input / compute-infer / compute-output time per request and the realised batch size.
``--in-process`` runs the same inputs through the engine on ONNX Runtime (no server; the
engine is imported lazily), so serving overhead shows as a ratio.

``--perf-analyzer``: the served image and text points are measured by Triton's own
perf_analyzer instead (``tools.perf_analyzer``: obtained once, run over gRPC with the same
JPEGs and captions, synchronous closed loop at each concurrency and batch size; stable when the
last 3 of at most ``--pa-max-trials`` windows of ``--pa-interval`` ms agree within
``--pa-stability`` percent; a point that never does is measured once more at twice that
percentage and marked unstable).  perf_analyzer reports no maximum latency (``n/a`` in the
table); its server split is Triton's mean per request.  The score workload keeps the
closed-loop client.  The in-process points then sweep the same concurrencies (closed loop,
``concurrency`` threads calling the one in-process pipeline) unless
``--in-process-concurrency`` says otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tools import perf_analyzer as pa

WORDS = ("a the photo of dog cat man woman child red blue green small large old young running sitting "
         "standing on in with near beach street park field table car bicycle tree house playing holding "
         "white black two three group people water snow grass ball city night sunny wooden front").split()


# --- statistics (pure; tested on known samples) -------------------------------------------
@dataclass
class LatencyStats:
    requests: int
    items: int
    errors: int
    seconds: float
    throughput: float          # items per second
    p50: float                 # milliseconds
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, latencies_s: list[float], items: int, errors: int, seconds: float) -> "LatencyStats":
        ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
        q = np.percentile(ms, [50, 90, 95, 99]) if ms.size else [math.nan] * 4
        return cls(len(latencies_s), items, errors, seconds, items / seconds if seconds > 0 else math.nan,
                   float(q[0]), float(q[1]), float(q[2]), float(q[3]), float(ms.max()) if ms.size else math.nan)


def is_stable(windows: list[LatencyStats], k: int = 3, tol: float = 0.10) -> bool:
    """True when the last ``k`` windows' throughput and p50 each vary by at most ``tol`` of their mean."""
    if len(windows) < k:
        return False
    for key in ("throughput", "p50"):
        v = np.array([getattr(w, key) for w in windows[-k:]], dtype=np.float64)
        if not np.all(np.isfinite(v)) or v.mean() <= 0 or (v.max() - v.min()) > tol * v.mean():
            return False
    return True


def merge(windows: list[LatencyStats], raw: list[list[float]]) -> LatencyStats:
    lat = [x for r in raw for x in r]
    return LatencyStats.of(lat, sum(w.items for w in windows), sum(w.errors for w in windows),
                           sum(w.seconds for w in windows))


# --- load generation -------------------------------------------------------------------------
@dataclass
class Point:
    workload: str
    mode: str                  # "served" | "in-process"
    concurrency: int
    batch: int
    stats: LatencyStats
    windows: int
    stable: bool
    server: dict = field(default_factory=dict)
    source: str = "closed-loop"   # who measured it: "closed-loop" (this module) | "perf_analyzer"
    perf_analyzer: dict = field(default_factory=dict)   # perf_analyzer's full result, command line included


def run_point(call: Callable[[int], None], *, concurrency: int, batch: int, window: float, max_time: float,
              warmup: int) -> tuple[LatencyStats, int, bool]:
    """Closed-loop load: ``call(i)`` performs one request of ``batch`` items (raising on error)."""
    for i in range(warmup):
        call(i)
    windows: list[LatencyStats] = []
    raws: list[list[float]] = []
    t_end = time.monotonic() + max_time
    counter = iter(range(10**12))
    lock = threading.Lock()
    while True:
        lat: list[float] = []
        errs = [0]
        stop = time.monotonic() + window

        def worker():
            while time.monotonic() < stop:
                with lock:
                    i = next(counter)
                t = time.perf_counter()
                try:
                    call(i)
                    ok = True
                except Exception:
                    ok = False
                dt = time.perf_counter() - t
                with lock:
                    if ok:
                        lat.append(dt)
                    else:
                        errs[0] += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        windows.append(LatencyStats.of(lat, len(lat) * batch, errs[0], time.perf_counter() - t0))
        raws.append(lat)
        if is_stable(windows) or time.monotonic() >= t_end:
            break
    k = min(3, len(windows))
    return merge(windows[-k:], raws[-k:]), len(windows), is_stable(windows)


# --- workloads -------------------------------------------------------------------------------
def realistic_jpegs(n: int = 16, seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs (640x480, quality 90): crops of a real photograph when matplotlib
    ships it, else smooth synthetic scenes; tens of kB each, like web photos."""
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(seed)
    base = None
    try:
        import matplotlib
        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        base = Image.open(p).convert("RGB") if p.is_file() else None
    except ImportError:
        pass
    out = []
    for i in range(n):
        if base is not None:
            w, h = base.size
            x0, y0 = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
            img = base.crop((x0, y0, x0 + 3 * w // 4, y0 + 3 * h // 4)).resize((640, 480))
        else:
            img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        img = img.filter(ImageFilter.GaussianBlur(0.5 + i % 3))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def realistic_captions(n: int = 64, seed: int = 0) -> list[str]:
    """Captions of 8-20 words (COCO-like lengths: 10-25 tokens with SOT/EOT)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) for _ in range(n)]


def workload_calls(api, jpegs: list[bytes], captions: list[str]) -> dict[str, Callable[[int], Callable[[int], None]]]:
    """workload -> (batch -> one-request function).  ``api`` is a FilipClient (served) or the
    engine's FilipPipeline (in-process): both have embed_images / embed_texts / score."""
    img_emb = api.embed_images(jpegs[:8])
    query = api.embed_texts(captions[:1])

    def gallery(batch: int):   # ``batch`` image embeddings, tiled from the 8 computed ones
        reps = math.ceil(batch / len(img_emb))
        tile = lambda a: np.concatenate([a] * reps)[:batch]  # noqa: E731
        return type(img_emb)(tile(img_emb.tokens), tile(img_emb.lengths), tile(img_emb.pooled))

    def score(b: int):
        g = gallery(b)
        return lambda i: api.score(g, query, direction="t2i", scoring="token")

    return {
        "image": lambda b: (lambda i: api.embed_images([jpegs[(i + k) % len(jpegs)] for k in range(b)], batch_size=b)),
        "text": lambda b: (lambda i: api.embed_texts([captions[(i + k) % len(captions)] for k in range(b)], batch_size=b)),
        "score": score,
    }


MODEL_OF = {"image": "filip_image", "text": "filip_text", "score": "filip_score"}


def server_split(before: dict, after: dict) -> dict:
    """Mean per-execution queue/compute times (ms) and the realised batch size between two
    statistics snapshots of one model."""
    def get(s, *keys):
        for k in keys:
            s = s.get(k, {}) if isinstance(s, dict) else {}
        return int(s) if not isinstance(s, dict) else 0
    out = {}
    a, b = before["model_stats"][0], after["model_stats"][0]
    execs = get(b, "execution_count") - get(a, "execution_count")
    infers = get(b, "inference_count") - get(a, "inference_count")
    out["executions"] = execs
    out["realised_batch"] = infers / execs if execs else math.nan
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        n = get(b, "inference_stats", part, "count") - get(a, "inference_stats", part, "count")
        ns = get(b, "inference_stats", part, "ns") - get(a, "inference_stats", part, "ns")
        out[f"{part}_ms"] = ns / n / 1e6 if n else math.nan
    return out


# --- perf_analyzer (served points) ------------------------------------------------------------
PA_WORKLOADS = ("image", "text")    # measured by perf_analyzer under --perf-analyzer; score keeps the closed loop


def perf_analyzer_point(result: dict, workload: str, concurrency: int, batch: int, stable: bool = True) -> Point:
    """A served Point from ``tools.perf_analyzer.run``'s result: no max latency (NaN) and no
    error count beyond 0 (perf_analyzer stops at the first failed request)."""
    requests = result.get("requests") or 0
    items = requests * batch
    tp = result["items_per_s"]
    stats = LatencyStats(requests, items, 0, items / tp if tp > 0 else math.nan, tp, result["p50_ms"], result["p90_ms"],
                         result["p95_ms"], result["p99_ms"], math.nan)
    server = {"executions": result.get("executions") or 0, "realised_batch": result.get("realised_batch", math.nan),
              **{k: result[k] for k in ("queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms")}}
    full = {k: (" ".join(v) if k == "command" else v) for k, v in result.items()}
    return Point(workload, "served", concurrency, batch, stats, 0, stable, server, "perf_analyzer", full)


def measure_perf_analyzer(binary, env, url: str, workload: str, data: Path, concurrency: int, batch: int, *,
                          interval_ms: int, stability: float, max_trials: int) -> Point:
    """One served point by perf_analyzer; when it finds no stable measurement, once more at twice
    the stability percentage (the point is then marked unstable)."""
    kw = dict(measurement_interval_ms=interval_ms, max_trials=max_trials)
    try:
        r = pa.run(binary, env, url, MODEL_OF[workload], data, concurrency, batch, stability_percentage=stability, **kw)
        return perf_analyzer_point(r, workload, concurrency, batch, True)
    except pa.PerfAnalyzerUnstable as e:
        print(f"note: {e}; measuring again at {2 * stability:g}%", flush=True)
        r = pa.run(binary, env, url, MODEL_OF[workload], data, concurrency, batch, stability_percentage=2 * stability, **kw)
        return perf_analyzer_point(r, workload, concurrency, batch, False)


# --- output ---------------------------------------------------------------------------------
def _f(x: float, width: int, digits: int = 2) -> str:
    return f"{'n/a':>{width}}" if not math.isfinite(x) else f"{x:>{width}.{digits}f}"


def table(points: list[Point]) -> str:
    head = (f"{'workload':<8} {'mode':<10} {'by':<4} {'conc':>4} {'batch':>5} {'items/s':>9} {'p50':>8} {'p90':>8} "
            f"{'p95':>8} {'p99':>8} {'max':>8} {'err':>4} {'stable':>6} {'queue':>7} {'c.in':>6} {'infer':>7} "
            f"{'c.out':>6} {'batch*':>6}")
    lines = [head, "-" * len(head)]
    for p in points:
        s, v = p.stats, p.server
        by = "pa" if p.source == "perf_analyzer" else "loop"
        lines.append(f"{p.workload:<8} {p.mode:<10} {by:<4} {p.concurrency:>4} {p.batch:>5} {s.throughput:>9.1f} "
                     f"{s.p50:>8.2f} {s.p90:>8.2f} {s.p95:>8.2f} {s.p99:>8.2f} {_f(s.max, 8)} {s.errors:>4} "
                     f"{str(p.stable):>6} {_f(v.get('queue_ms', math.nan), 7)} {_f(v.get('compute_input_ms', math.nan), 6)} "
                     f"{_f(v.get('compute_infer_ms', math.nan), 7)} {_f(v.get('compute_output_ms', math.nan), 6)} "
                     f"{_f(v.get('realised_batch', math.nan), 6)}")
    lines.append("latencies in ms; by: pa = Triton's perf_analyzer (it reports no max: n/a), loop = this tool's closed "
                 "loop; queue / c.in / infer / c.out: Triton's mean queue, compute input, compute infer, compute "
                 "output time per request; batch*: realised dynamic batch size")
    return "\n".join(lines)


def plot(points: list[Point], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = sorted({p.workload for p in points})
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7), squeeze=False)
    for col, w in enumerate(workloads):
        for (mode, batch) in sorted({(p.mode, p.batch) for p in points if p.workload == w}):
            pts = sorted((p for p in points if p.workload == w and p.mode == mode and p.batch == batch),
                         key=lambda p: p.concurrency)
            c = [p.concurrency for p in pts]
            (line,) = axes[0][col].plot(c, [p.stats.p50 for p in pts], "-o", label=f"{mode} b{batch} p50")
            axes[0][col].plot(c, [p.stats.p99 for p in pts], "--x", color=line.get_color(), label=f"{mode} b{batch} p99")
            axes[1][col].plot(c, [p.stats.throughput for p in pts], "-o", label=f"{mode} b{batch}")
        axes[0][col].set(title=f"{w}: latency", xlabel="concurrency", ylabel="ms")
        axes[1][col].set(title=f"{w}: throughput", xlabel="concurrency", ylabel="items/s")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (host:grpc_port); default: start one on --repository")
    p.add_argument("--repository", type=Path, help="model repository (served when no --url; used by --in-process)")
    p.add_argument("--workloads", default="image,text,score")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated (default 1,2,4,8)")
    p.add_argument("--batch", default="1,8", help="items per request, comma-separated (default 1,8)")
    p.add_argument("--window", type=float, default=2.0, help="seconds per measurement window (default 2)")
    p.add_argument("--max-time", type=float, default=15.0, help="seconds per point before giving up on stability (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up requests per point (default 3)")
    p.add_argument("--in-process", action="store_true",
                   help="also run each workload in-process (at --in-process-concurrency)")
    p.add_argument("--in-process-concurrency",
                   help="closed-loop threads in-process, comma-separated "
                        "(default 1; with --perf-analyzer the --concurrency list)")
    p.add_argument("--perf-analyzer", action="store_true",
                   help="measure the served image and text points with Triton's perf_analyzer (tools.perf_analyzer)")
    p.add_argument("--pa-interval", type=int, default=3000, help="perf_analyzer --measurement-interval in ms (default 3000)")
    p.add_argument("--pa-stability", type=float, default=20.0,
                   help="perf_analyzer --stability-percentage (default 20)")
    p.add_argument("--pa-max-trials", type=int, default=10, help="perf_analyzer --max-trials (default 10)")
    p.add_argument("--json", type=Path, help="write every point as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of latency percentiles and throughput against concurrency")
    args = p.parse_args(argv)
    if args.url is None and args.repository is None:
        p.error("give --url or --repository")
    if args.in_process and args.repository is None:
        p.error("--in-process needs --repository")
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in workloads if w not in MODEL_OF]
    if bad:
        p.error(f"unknown workloads {bad}; choose from {sorted(MODEL_OF)}")

    in_process_conc = _ints(args.in_process_concurrency or (args.concurrency if args.perf_analyzer else "1"))

    from filip_export.launch import TritonServer
    from filip_client import FilipClient
    jpegs, captions = realistic_jpegs(), realistic_captions()
    print(f"inputs: {len(jpegs)} JPEGs 640x480 (mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB), "
          f"{len(captions)} captions of 8-20 words")
    pa_data: dict[str, Path] = {}
    if args.perf_analyzer:
        try:
            binary, env = pa.obtain()
        except pa.PerfAnalyzerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        data_dir = Path(tempfile.mkdtemp(prefix="bench-pa-"))
        inputs = {"image": lambda: pa.image_input_data(jpegs), "text": lambda: pa.text_input_data(captions)}
        pa_data = {w: pa.write_input_data(data_dir / f"{w}.json", inputs[w]()) for w in PA_WORKLOADS if w in workloads}
    server = None if args.url else TritonServer(args.repository).start()
    url = args.url or server.url
    points: list[Point] = []
    try:
        with FilipClient(url, concurrency=max(_ints(args.concurrency)), timeout=120) as client:
            calls = workload_calls(client, jpegs, captions)
            for w in workloads:
                for b in _ints(args.batch):
                    for c in _ints(args.concurrency):
                        if w in pa_data:
                            points.append(measure_perf_analyzer(
                                binary, env, url, w, pa_data[w], c, b, interval_ms=args.pa_interval,
                                stability=args.pa_stability, max_trials=args.pa_max_trials))
                        else:
                            before = client._grpc.get_inference_statistics(MODEL_OF[w], as_json=True)
                            stats, n, stable = run_point(calls[w](b), concurrency=c, batch=b, window=args.window,
                                                         max_time=args.max_time, warmup=args.warmup)
                            after = client._grpc.get_inference_statistics(MODEL_OF[w], as_json=True)
                            points.append(Point(w, "served", c, b, stats, n, stable, server_split(before, after)))
                        print(table(points[-1:]).splitlines()[2], flush=True)
    except pa.PerfAnalyzerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
        if args.perf_analyzer:
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.in_process:
        from filip_engine.pipeline import FilipPipeline   # lazily: the client needs no engine otherwise
        calls = workload_calls(FilipPipeline.from_repository(args.repository), jpegs, captions)
        for w in workloads:
            for b in _ints(args.batch):
                for c in in_process_conc:
                    stats, n, stable = run_point(calls[w](b), concurrency=c, batch=b, window=args.window,
                                                 max_time=args.max_time, warmup=args.warmup)
                    points.append(Point(w, "in-process", c, b, stats, n, stable))
                    print(table(points[-1:]).splitlines()[2], flush=True)
    print()
    print(table(points))
    if args.json:
        args.json.write_text(json.dumps([asdict(pt) for pt in points], indent=1, default=float))
    if args.plot:
        plot(points, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
