"""Instances x threads of the served encoders, per CPU engine: which layout of Triton
instances and encoder threads serves concurrent requests best, and what oversubscribing the
cores costs.

    python -m tools.instances_bench --repository build/precision/int8/triton_models [--repository ...]
                                    [--concurrency 4] [--rounds 4] [--window 3] [--report docs/BENCHMARKS.md]

For each repository, copies of it are served side by side (one tritonserver each, started
together), differing only in ``filip_image`` / ``filip_text``'s instance count and their
``intra_op_threads`` parameter: one instance with every core, ``cores`` instances with one
thread each, and ``cores`` instances with every core each (oversubscribed).  ``--concurrency``
clients each send one JPEG at a time for ``--window`` seconds per layout, rounds interleaved
across the layouts; images/s is the median over the rounds, latency percentiles over every
request.  ``--report FILE`` writes the table as the delimited section "instances-bench".
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

SECTION = "instances-bench"
HEADING = "## Served instances x encoder threads, per CPU engine"
ENCODERS = ("filip_image", "filip_text")


def layouts(cores: int) -> dict[str, tuple[int, int]]:
    """name -> (instances, threads per instance)."""
    many = max(2, cores)
    return {f"1 x {cores}": (1, cores), f"{many} x 1": (many, 1), f"{many} x {cores} (oversubscribed)": (many, cores)}


def with_layout(config: str, instances: int, threads: int) -> str:
    """A filip_image / filip_text ``config.pbtxt`` with another instance count and thread count."""
    config, n = re.subn(r"(instance_group \{\s*count: )\d+", lambda m: m.group(1) + str(instances), config)
    config, k = re.subn(r'(key: "intra_op_threads"\s*value \{\s*string_value: ")\d+',
                        lambda m: m.group(1) + str(threads), config)
    if n != 1 or k != 1:
        raise ValueError("not an encoder config of this project (instance_group / intra_op_threads not found once)")
    return config


def copy_with_layout(src: Path, dst: Path, instances: int, threads: int) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for m in ENCODERS:
        cfg = dst / m / "config.pbtxt"
        cfg.write_text(with_layout(cfg.read_text(), instances, threads))
    return dst


def closed_loop(clients, jpegs, seconds: float) -> tuple[float, list[float]]:
    """Every client sends one image at a time for ``seconds``; (images/s, latencies in s)."""
    stop = time.perf_counter() + seconds

    def loop(client, k):
        done, lat = 0, []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            client.embed_images([jpegs[(k + done) % len(jpegs)]])
            lat.append(time.perf_counter() - t)
            done += 1
        return done, lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        res = list(pool.map(loop, clients, range(len(clients))))
    elapsed = time.perf_counter() - t0
    return sum(d for d, _ in res) / elapsed, [x for _, lat in res for x in lat]


def table(rows: list[tuple[str, str, float, float, float]]) -> str:
    lines = ["| repository (engine) | instances x threads | images/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {lay} | {rate:.1f} | {p50:.0f} | {p99:.0f} |" for r, lay, rate, p50, p99 in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.instances_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, action="append", required=True, help="a model repository (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("build/instances-bench"), help="where the copies go")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--window", type=float, default=3.0, help="seconds per layout per round")
    ap.add_argument("--report", type=Path, help="write the table as the 'instances-bench' section of this file")
    args = ap.parse_args(argv)

    from filip_client import FilipClient
    from filip_engine.precision import default_threads
    from tools.bench import realistic_jpegs
    from tools.precision_bench import _start_servers, engines_cell, machine_line, read_manifests

    cores = default_threads()
    jpegs = realistic_jpegs(16)
    rows = []
    for repo in args.repository:
        label = f"{repo.parent.name} ({engines_cell(read_manifests(repo))})"
        names = {name.split(" (")[0].replace(" ", ""): name for name in layouts(cores)}   # folder -> layout
        base = args.out / repo.parent.name
        copies = {key: copy_with_layout(repo, base / key / "triton_models", *layouts(cores)[name])
                  for key, name in names.items()}
        with ExitStack() as stack:
            servers = {names[k]: s for k, s in _start_servers(stack, copies, base).items()}
            clients = {n: [stack.enter_context(FilipClient(s.url, timeout=120)) for _ in range(args.concurrency)]
                       for n, s in servers.items()}
            for cs in clients.values():                   # warm-up: every instance's first batches
                closed_loop(cs, jpegs, 1.0)
            rates = {n: [] for n in clients}
            lat = {n: [] for n in clients}
            for _ in range(args.rounds):
                for n, cs in clients.items():
                    r, ls = closed_loop(cs, jpegs, args.window)
                    rates[n].append(r)
                    lat[n] += ls
            for n in clients:
                ms = np.asarray(lat[n]) * 1e3
                rows.append((label, n, statistics.median(rates[n]), float(np.percentile(ms, 50)),
                             float(np.percentile(ms, 99))))
                print(f"{label}: {n}: {rows[-1][2]:.1f} images/s, p50 {rows[-1][3]:.0f} ms, p99 {rows[-1][4]:.0f} ms",
                      flush=True)
    text = table(rows)
    machine = machine_line([], args.rounds, args.window).split(" One run")[0]
    print("\n" + text + "\n\n" + machine)
    if args.report:
        from tools.measure import write_section
        write_section(args.report, "\n".join([
            HEADING, "",
            (f"`python -m tools.instances_bench` over the repositories of the precision benchmark above: served "
             f"image requests (640x480 JPEGs, one image each) from {args.concurrency} concurrent clients, one "
             f"tritonserver per layout started together, {args.rounds} interleaved rounds of {args.window:g} s; "
             "Triton's dynamic batcher merges concurrent requests into batches for each instance."), "",
            machine, "", text, ""]), SECTION)
        print(f"wrote the '{SECTION}' section of {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
