"""Reduced precision on the CPU, speed beside accuracy: one repository per precision (fp32,
bf16, int8) of one checkpoint, measured in-process and served in the same run.

    python -m tools.precision_bench --checkpoint CKPT --out build/precision [--precisions fp32,bf16,int8]
                                    [--rounds 5] [--window 1.0] [--report docs/BENCHMARKS.md]

1. Export: ``OUT/<precision>/triton_models`` by ``python -m filip_export.to_trt CKPT
   --precision P --runtime onnxruntime`` (its log in ``OUT/<precision>/export.log``).  A
   repository already there is reused when its manifests name the same checkpoint file and
   precision, are newer than the checkpoint and it serves no TensorRT plans.  A precision
   whose export fails (bf16 on a CPU without bf16 instructions) is left out, saying why.
2. In-process: every repository's :class:`~filip_engine.pipeline.FilipPipeline` open at once;
   image batch 1, image batch 8 and text batch 8 straight on each tower's engine (pixels
   preprocessed once, captions tokenised once: the same inputs for every precision).
3. Served: one tritonserver per repository, all started together on distinct ports; the
   same workloads through :class:`filip_client.FilipClient` with the images sent as JPEGs, so
   the server-side decode and preprocessing are included.
4. Accuracy: each tower's held-out gate figures from its manifest (fp32: exact, gated at
   cos >= 0.99999 against PyTorch).

Rounds are interleaved across precisions (round r runs fp32, bf16, int8, then round r + 1),
each a closed loop of one request at a time for at least ``--window`` seconds; items/s is the
median over the rounds, latency percentiles are over every request of every round, and each
speed-up is against fp32 measured in the same run.  ``--report FILE`` writes the tables as the
delimited section "precision-bench" of FILE (``tools.measure.write_section``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from filip_export.calibration import ADJECTIVES, NOUNS

PRECISIONS = ("fp32", "bf16", "int8")
BASELINE = "fp32"
# (name, tower, items per request), in table order
WORKLOADS = (("image b1", "image", 1), ("image b8", "image", 8), ("text b1", "text", 1), ("text b8", "text", 8))
LATENCY_WORKLOADS = ("image b1", "text b1")      # the served table's p50 / p99 columns
FP32_EXACT = "exact (fp32 gate cos >= 0.99999)"
TOWER_DIRS = {"image": "filip_image/1", "text": "filip_text/1"}
MANIFEST = "filip_config.json"
TRT_MODEL_DIRS = ("filip_image_trt", "filip_text_trt")
SECTION = "precision-bench"
HEADING = "## Reduced precision on the CPU (bf16, int8)"
SCENES_SECTION = "precision-scenes"
SCENES_HEADING = "## Reduced precision on the trained demo model (bf16, int8)"

CAPTION_TEMPLATES = (
    "a photo of a {a} {n} in front of the {m}",
    "two {n}s and a {b} {m} on a sunny day",
    "the {a} {n} is standing beside an old {m}",
    "a close-up photo of a {a} {n} near the {m} at night",
    "a {a} {n} standing next to a {b} {m} on the street",
    "a photograph of a {n} and a {b} {m} in the city",
)


# --- inputs -----------------------------------------------------------------------------------
def captions(n: int = 64, seed: int = 0) -> list[str]:
    """Everyday captions of 8-12 words (a pure function of the seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = str(rng.choice(CAPTION_TEMPLATES))
        a, b = (str(x) for x in rng.choice(ADJECTIVES, 2, replace=False))
        n_, m = (str(x) for x in rng.choice(NOUNS, 2, replace=False))
        out.append(t.format(a=a, b=b, n=n_, m=m))
    return out


# --- export or reuse --------------------------------------------------------------------------
def reuse_problem(repo: Path, checkpoint: Path, precision: str) -> str | None:
    """Why the repository at ``repo`` cannot stand for ``checkpoint`` exported at ``precision``
    (None: it can).  Both towers' manifests must name the checkpoint's file and the
    precision (no ``engine`` entry: fp32), be newer than the checkpoint file, and their model
    files must be there; a repository serving TensorRT plans is no CPU repository."""
    for tower, sub in TOWER_DIRS.items():
        path = repo / sub / MANIFEST
        if not path.is_file():
            return f"no {sub}/{MANIFEST}"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{sub}/{MANIFEST} unreadable: {e}"
        if manifest.get("checkpoint") != checkpoint.name:
            return f"exported from {manifest.get('checkpoint')!r}, not {checkpoint.name!r}"
        engine = manifest.get("engine") or {}
        got = engine.get("precision") or "fp32"
        if got != precision:
            return f"{tower} tower at {got}, not {precision}"
        model_file = engine.get("model_file") or f"{tower}.onnx"
        if not (repo / sub / model_file).is_file():
            return f"{sub}/{model_file} missing"
        if checkpoint.is_file() and checkpoint.stat().st_mtime > path.stat().st_mtime:
            return f"{checkpoint.name} is newer than the repository"
    trt = [d for d in TRT_MODEL_DIRS if (repo / d).exists()]
    if trt:
        return f"serves TensorRT plans ({', '.join(trt)})"
    return None


def export(checkpoint: Path, precision: str, out: Path, log: Callable[[str], None] = print) -> Path | None:
    """``out/<precision>/triton_models``, exported or reused; None when the export failed."""
    repo = out / precision / "triton_models"
    why = reuse_problem(repo, checkpoint, precision)
    if why is None:
        log(f"{precision}: reusing {repo} (exported from {checkpoint.name} at {precision})")
        return repo
    if repo.exists():
        log(f"{precision}: {repo} cannot be reused ({why}); exporting again")
    logfile = out / precision / "export.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "filip_export.to_trt", str(checkpoint), "--out", str(repo),
           "--precision", precision, "--runtime", "onnxruntime"]
    log(f"{precision}: exporting {checkpoint} -> {repo} (log: {logfile})")
    t = time.perf_counter()
    with open(logfile, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        log(f"{precision}: export failed (exit {rc}), left out of the benchmark:\n  " + "\n  ".join(tail))
        return None
    log(f"{precision}: exported in {time.perf_counter() - t:.0f} s")
    return repo


# --- measurement ------------------------------------------------------------------------------
def interleaved(names: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """The measuring order: round 0 runs every name in order, then round 1, ..."""
    return [(r, n) for r in range(rounds) for n in names]


@dataclass
class Speed:
    """One workload on one precision: median items/s over the rounds, per-request latency
    percentiles (ms) over every request of every round."""
    items_per_s: float
    p50_ms: float
    p99_ms: float
    rounds: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, rates: Sequence[float], latencies_s: Sequence[float]) -> "Speed":
        ms = np.asarray(latencies_s, np.float64) * 1e3
        p50, p99 = (float(x) for x in np.percentile(ms, [50, 99])) if ms.size else (math.nan, math.nan)
        return cls(float(statistics.median(rates)) if rates else math.nan, p50, p99, list(rates))


def measure(calls: Mapping[str, Callable[[int], int]], rounds: int, window: float, *, warmup: int = 2,
            min_requests: int = 2) -> dict[str, Speed]:
    """``calls[name](i)`` sends request ``i`` and returns its item count.  After ``warmup``
    requests each, ``rounds`` interleaved rounds of at least ``window`` seconds and
    ``min_requests`` requests per name."""
    for fn in calls.values():
        for i in range(warmup):
            fn(i)
    rates: dict[str, list[float]] = {n: [] for n in calls}
    lat: dict[str, list[float]] = {n: [] for n in calls}
    counter = dict.fromkeys(calls, warmup)
    for _, name in interleaved(list(calls), rounds):
        fn, items, done = calls[name], 0, 0
        t0 = time.perf_counter()
        while True:
            t = time.perf_counter()
            items += fn(counter[name])
            now = time.perf_counter()
            lat[name].append(now - t)
            counter[name] += 1
            done += 1
            if done >= min_requests and now - t0 >= window:
                break
        rates[name].append(items / (now - t0))
    return {n: Speed.of(rates[n], lat[n]) for n in calls}


def in_process_calls(pipe, pixels: np.ndarray, texts: Sequence[str]) -> dict[str, Callable[[int], int]]:
    """Workload -> one request straight on the pipeline's tower engines: preprocessed pixels,
    captions tokenised (padded to the batch's longest, as served) once up front."""
    def feeds_of(b):
        batches = [pipe.tokenizer(list(texts[a:a + b]), pad_to="longest") for a in range(0, len(texts) - b + 1, b)]
        return [{"input_ids": t.ids.astype(np.int64), "lengths": t.lengths.astype(np.int64)} for t in batches]

    n = len(pixels)

    def image(b):
        def call(i):
            rows = [(i * b + k) % n for k in range(b)]
            pipe.image_runtime.infer({"pixel_values": pixels[rows]})
            return b
        return call

    def text(b):
        feeds = feeds_of(b)

        def call(i):
            pipe.text_runtime.infer(feeds[i % len(feeds)])
            return b
        return call

    return {"image b1": image(1), "image b8": image(8), "text b1": text(1), "text b8": text(8)}


def served_calls(client, jpegs: Sequence[bytes], texts: Sequence[str]) -> dict[str, Callable[[int], int]]:
    """Workload -> one request through the gRPC client: encoded JPEGs, raw captions."""
    def image(b):
        def call(i):
            client.embed_images([jpegs[(i * b + k) % len(jpegs)] for k in range(b)], batch_size=b)
            return b
        return call

    def text(b):
        def call(i):
            client.embed_texts([texts[(i * b + k) % len(texts)] for k in range(b)], batch_size=b)
            return b
        return call

    return {"image b1": image(1), "image b8": image(8), "text b1": text(1), "text b8": text(8)}


def measure_workloads(calls: Mapping[str, Mapping[str, Callable[[int], int]]], rounds: int, window: float,
                      log: Callable[[str], None] = print) -> dict[str, dict[str, Speed]]:
    """precision -> workload -> one-request function  =>  precision -> workload -> Speed; each
    workload measured on its own, its rounds interleaved across the precisions."""
    out: dict[str, dict[str, Speed]] = {p: {} for p in calls}
    for name, _, _ in WORKLOADS:
        got = measure({p: c[name] for p, c in calls.items()}, rounds, window)
        for p, s in got.items():
            out[p][name] = s
        log(f"  {name}: " + ", ".join(f"{p} {s.items_per_s:.1f}/s" for p, s in got.items()))
    return out


# --- accuracy and engines from the manifests --------------------------------------------------
@dataclass(frozen=True)
class Accuracy:
    exact: bool                         # fp32: no gate figures, exact against PyTorch
    image_min_cos: float = math.nan
    text_min_cos: float = math.nan
    top10_s_t: float = math.nan
    top10_global: float = math.nan


def accuracy_of(manifests: Mapping[str, dict]) -> Accuracy:
    """The held-out gate figures the towers' manifests record (``tower -> manifest``)."""
    engines = {t: m.get("engine") or {} for t, m in manifests.items()}
    if all((e.get("precision") or "fp32") == "fp32" for e in engines.values()):
        return Accuracy(exact=True)
    gates = {t: (e.get("details") or {}).get("gate") or {} for t, e in engines.items()}

    def cos(tower):
        return float(((gates.get(tower, {}).get("held_out") or {}).get("tokens") or {}).get("min_cosine", math.nan))

    rank = gates.get("text") or gates.get("image") or {}
    return Accuracy(False, cos("image"), cos("text"), float(rank.get("top10_s_T", math.nan)),
                    float(rank.get("top10_global", math.nan)))


def engine_label(entry: Mapping | None) -> str:
    """A manifest's ``engine`` entry in a few words, e.g. "openvino bf16" or
    "onnxruntime int8 dynamic (2 of 24 MatMuls fp32)"."""
    entry = entry or {}
    precision, engine = entry.get("precision") or "fp32", entry.get("engine") or "onnxruntime"
    quant = (entry.get("details") or {}).get("quantization") or {}
    label = f"{engine} {precision}"
    method = str(quant.get("method", ""))
    if method:
        label += " static" if "static" in method else " dynamic" if "dynamic" in method else f" {method}"
    kept = quant.get("kept_fp32") or []
    if kept:
        total = int(quant.get("quantized", 0)) + len(kept)
        label += f" ({len(kept)} of {total} MatMuls fp32)"
    return label


def engines_cell(manifests: Mapping[str, dict]) -> str:
    image, text = (engine_label(manifests[t].get("engine")) for t in ("image", "text"))
    return image if image == text else f"{image} / {text}"


def read_manifests(repo: Path) -> dict[str, dict]:
    return {t: json.loads((repo / sub / MANIFEST).read_text()) for t, sub in TOWER_DIRS.items()}


# --- tables -----------------------------------------------------------------------------------
@dataclass
class Row:
    precision: str
    engines: str
    speeds: dict[str, Speed]            # workload -> Speed
    accuracy: Accuracy


def _rate_cell(speed: Speed | None, base: Speed | None) -> str:
    if speed is None or not math.isfinite(speed.items_per_s):
        return "n/a"
    if base is None or not math.isfinite(base.items_per_s) or base.items_per_s <= 0:
        return f"{speed.items_per_s:.1f}"
    return f"{speed.items_per_s:.1f} ({speed.items_per_s / base.items_per_s:.2f}x)"


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def accuracy_cells(a: Accuracy) -> tuple[str, str]:
    if a.exact:
        return FP32_EXACT, "1.0 / 1.0 (exact)"
    return (f"{_num(a.image_min_cos, 5)} / {_num(a.text_min_cos, 5)}",
            f"{_num(a.top10_s_t, 3)} / {_num(a.top10_global, 3)}")


def table(rows: Sequence[Row], *, served: bool) -> str:
    """One Markdown table; speed-ups are against the fp32 row (none without one)."""
    base = next((r for r in rows if r.precision == BASELINE), None)
    head = ["precision", "engine (image / text)"] + [f"{w} items/s (x fp32)" for w, _, _ in WORKLOADS]
    if served:
        head += [f"{w} p50 / p99 ms" for w in LATENCY_WORKLOADS]
    head += ["min token cos image / text", "top-10 s_T / global"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.precision, r.engines]
        cells += [_rate_cell(r.speeds.get(w), base.speeds.get(w) if base else None) for w, _, _ in WORKLOADS]
        if served:
            for w in LATENCY_WORKLOADS:
                s = r.speeds.get(w)
                cells.append(f"{_num(s.p50_ms, 2)} / {_num(s.p99_ms, 2)}" if s else "n/a")
        cells += list(accuracy_cells(r.accuracy))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(precisions: Sequence[str], rounds: int, window: float) -> str:
    from filip_engine.precision import cpu_model, default_threads
    versions = []
    for name, module in (("OpenVINO", "openvino"), ("ONNX Runtime", "onnxruntime")):
        try:
            versions.append(f"{name} {__import__(module).__version__.split('-')[0]}")   # OpenVINO appends its build
        except ImportError:
            versions.append(f"{name} not installed")
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores ({default_threads()} usable); {', '.join(versions)}. "
            f"One run, rounds interleaved across precisions ({', '.join(precisions)}, then the next round): "
            f"median of {rounds} rounds of >= {window:g} s each, one request at a time.")


def scenes_table(scenes: Mapping[str, tuple[dict, dict]], manifests: Mapping[str, dict]) -> str:
    """Zero-shot accuracy and text -> image recall of the trained demo model per precision,
    token-wise / global, with chance levels (``tools.scene_eval``'s measures, served)."""
    lines = ["| precision | engine (image / text) | zero-shot colour | zero-shot shape | zero-shot colour+shape "
             "| R@1 | R@5 |", "|---|---|---|---|---|---|---|"]
    chance = None
    for p, (z, r) in scenes.items():
        def pair(get):
            return " / ".join(f"{get(s):.3f}" for s in ("token", "global"))
        lines.append(f"| {p} | {engines_cell(manifests[p])} | {pair(lambda s: z[s]['colour'])} | "
                     f"{pair(lambda s: z[s]['shape'])} | {pair(lambda s: z[s]['both'])} | "
                     f"{pair(lambda s: r[s]['R@1'])} | {pair(lambda s: r[s]['R@5'])} |")
        chance = (z["chance"], r["chance"], z["n"], r["n"])
    zc, rc, zn, rn = chance
    lines.append(f"| chance | | {zc['colour']:.3f} | {zc['shape']:.3f} | {zc['both']:.3f} | {rc['R@1']:.3f} | {rc['R@5']:.3f} |")
    return ("\n".join(lines) + f"\n\nEach cell: token-wise (FILIP) / global (pooled cosine). Zero-shot over {zn} held-out "
            f"one-object scenes (24 classes), retrieval over {rn} held-out scenes and their captions, all through each "
            "precision's server (`tools.scene_eval`).")


def report_section(checkpoint: Path, machine: str, in_process: str, served: str, scenes: str = "",
                   heading: str | None = None) -> str:
    return "\n".join([
        heading or HEADING, "",
        (f"`python -m tools.precision_bench --checkpoint {checkpoint.name}`: one repository per precision "
        "(`export/to_trt.py --precision`), all measured in the same run with their rounds interleaved. "
        "In-process: each tower's engine on preprocessed 640x480 photos and tokenised 8-12-word captions; "
        "served: one tritonserver per repository, the same photos sent as JPEGs (decode and preprocessing "
        "included) through the gRPC client. Accuracy: the held-out gate figures each export recorded "
        "against PyTorch fp32 (min per-token cosine, top-10 agreement of s_T and of the global cosine)."), "",
        machine, "",
        "### In-process", "", in_process, "",
        "### Served (tritonserver, gRPC)", "", served, "",
        *(["### What the trained model still knows, per precision", "", scenes, ""] if scenes else []),
    ])


# --- the run ----------------------------------------------------------------------------------
def _precisions(text: str) -> list[str]:
    got = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [p for p in got if p not in PRECISIONS]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"precisions must be among {', '.join(PRECISIONS)}, got {text!r}")
    return got


def _start_servers(stack: ExitStack, repos: Mapping[str, Path], out: Path) -> dict:
    """One tritonserver per repository on ports chosen together (so distinct), started at once."""
    from filip_export.launch import TritonServer, free_ports
    ports = free_ports(3 * len(repos))
    servers = {}
    for i, (p, repo) in enumerate(repos.items()):
        s = TritonServer(repo, log=out / p / "tritonserver.log", ready_timeout=600)
        s.grpc_port, s.http_port, s.metrics_port = ports[3 * i:3 * i + 3]
        s.url = f"127.0.0.1:{s.grpc_port}"
        servers[p] = s
        stack.callback(s.stop)
    t = time.perf_counter()
    with ThreadPoolExecutor(len(servers)) as pool:
        for f in [pool.submit(s.start) for s in servers.values()]:
            f.result()
    print(f"served: {len(servers)} tritonservers ready in {time.perf_counter() - t:.0f} s ("
          + ", ".join(f"{p} on {s.url}" for p, s in servers.items()) + ")", flush=True)
    return servers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.precision_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint exported at every precision")
    ap.add_argument("--out", type=Path, default=Path("build/precision"),
                    help="one repository per precision under OUT/<precision>/triton_models (default build/precision)")
    ap.add_argument("--precisions", type=_precisions, default=list(PRECISIONS), help="default fp32,bf16,int8")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per workload (default 5)")
    ap.add_argument("--window", type=float, default=1.0, help="seconds per precision per round, at least (default 1)")
    ap.add_argument("--report", type=Path, help="write the tables as the 'precision-bench' section of this file "
                    "('precision-scenes' with --scene-eval)")
    ap.add_argument("--scene-eval", action="store_true",
                    help="the checkpoint is the trained demo model (models/filip-scenes.pt): also its zero-shot accuracy "
                         "and text -> image R@1 / R@5 on held-out scenes through each precision's server")
    ap.add_argument("--n-retrieval", type=int, default=1000, help="--scene-eval: scenes in the retrieval test (default 1000)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.window <= 0:
        ap.error("--rounds must be >= 1 and --window > 0")
    if not args.checkpoint.is_file():
        ap.error(f"--checkpoint {args.checkpoint}: no such file")

    def log(line: str) -> None:
        print(line, flush=True)

    repos = {}
    for p in args.precisions:
        repo = export(args.checkpoint, p, args.out, log)
        if repo is not None:
            repos[p] = repo
    if not repos:
        print("error: no repository to measure", file=sys.stderr)
        return 2
    precisions = list(repos)
    manifests = {p: read_manifests(r) for p, r in repos.items()}
    machine = machine_line(precisions, args.rounds, args.window)
    print(machine, flush=True)

    from filip_engine.pipeline import FilipPipeline
    from tools.bench import realistic_jpegs
    jpegs, texts = realistic_jpegs(16), captions(64)
    pipes = {p: FilipPipeline.from_repository(r) for p, r in repos.items()}
    pixels = next(iter(pipes.values())).transform.batch(jpegs)
    print(f"inputs: {len(jpegs)} JPEGs 640x480 (mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB; "
          f"{pixels.shape[-1]} px preprocessed), {len(texts)} captions of 8-12 words", flush=True)

    print("in-process:", flush=True)
    local = measure_workloads({p: in_process_calls(pipe, pixels, texts) for p, pipe in pipes.items()},
                              args.rounds, args.window, log)
    del pipes

    from filip_client import FilipClient
    with ExitStack() as stack:
        servers = _start_servers(stack, repos, args.out)
        clients = {p: stack.enter_context(FilipClient(s.url, timeout=120)) for p, s in servers.items()}
        print("served:", flush=True)
        remote = measure_workloads({p: served_calls(c, jpegs, texts) for p, c in clients.items()},
                                   args.rounds, args.window, log)
        scenes = None
        if args.scene_eval:
            from tools.scene_eval import retrieval, zero_shot
            scenes = {}
            for p, c in clients.items():
                t = time.perf_counter()
                scenes[p] = (zero_shot(c), retrieval(c, n=args.n_retrieval))
                log(f"  scenes {p}: evaluated in {time.perf_counter() - t:.0f} s")

    def rows(speeds):
        return [Row(p, engines_cell(manifests[p]), speeds[p], accuracy_of(manifests[p])) for p in precisions]

    in_table, served_table = table(rows(local), served=False), table(rows(remote), served=True)
    scene_table = scenes_table(scenes, manifests) if scenes else ""
    print("\nIn-process\n\n" + in_table + "\n\nServed (tritonserver, gRPC)\n\n" + served_table + "\n\n"
          + (scene_table + "\n\n" if scene_table else "") + machine)
    if args.report:
        from tools.measure import write_section
        section = SCENES_SECTION if scenes else SECTION
        args.report.parent.mkdir(parents=True, exist_ok=True)
        write_section(args.report, report_section(args.checkpoint, machine, in_table, served_table, scene_table,
                                                  heading=SCENES_HEADING if scenes else HEADING), section)
        print(f"wrote the '{section}' section of {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
