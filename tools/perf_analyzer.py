"""Triton's perf_analyzer for the served half of the latency benchmark: obtained once from the
tritonclient 2.48.0 wheel, run over gRPC at one concurrency and batch size per call, its CSV
report parsed into throughput, latency percentiles and Triton's server-side split.

    python -m tools.perf_analyzer --obtain
    python -m tools.perf_analyzer --repository build/demo/triton_models --model filip_image --concurrency 1,8
    python -m tools.perf_analyzer --url localhost:8001 --model filip_text --concurrency 8 --batch 8

Where it comes from (``obtain``): tritonclient 2.48.0 is the last tritonclient wheel that ships
the perf_analyzer binary (``tritonclient-2.48.0.data/data/bin/perf_analyzer``), and the
separate perf-analyzer package publishes no wheel for this platform.  ``obtain`` runs
``pip download tritonclient==2.48.0 --no-deps`` into its cache folder (only when the wheel is
not there yet), extracts the binary, and links the two shared libraries it needs that the
system lacks, ``libb64.so.0d`` and ``libcudart.so.12``, under those sonames from the copies
nvidia-pytriton ships (its ``nvidia_pytriton.libs`` folder, where auditwheel gave them hashed
names); the environment it returns puts that folder on ``LD_LIBRARY_PATH``.

How it measures (``run``): perf_analyzer's synchronous mode, a closed loop of ``concurrency``
threads each with one request of ``batch`` items in flight, over gRPC, with the realistic
inputs of ``tools.bench`` given as ``--input-data`` JSON (captions as strings; JPEG bytes
base64-encoded in Triton's serialised BYTES form, a 4-byte little-endian length before each
element; a batch of ``b`` takes ``b`` consecutive entries).  Measurement windows of
``measurement_interval_ms`` until the last 3 agree within ``stability_percentage`` (max/min of
throughput and of average latency) or ``max_trials`` windows pass; perf_analyzer then exits
with an error, which ``run`` raises as one sentence.  Every subprocess has a timeout.
Reported over the last 3 windows: throughput (perf_analyzer's infer/s counts batch items, so it
is items/s; requests/s = infer/s / batch), p50/p90/p95/p99 and average client latency (no max:
perf_analyzer does not report one), and from Triton's statistics API the mean per-request
server queue, compute input, compute infer and compute output times, and the realised dynamic
batch size (inferences / executions).
"""
from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import io
import json
import math
import os
import re
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "2.48.0"
WHEEL_MEMBER = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
# soname perf_analyzer asks for -> glob of the auditwheel-renamed copy in nvidia_pytriton.libs
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
DEFAULT_CACHE = Path("build/perf_analyzer")
# CSV column -> key in run()'s result (all perf_analyzer latencies are in microseconds)
CSV_LATENCIES = {
    "p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms", "p99 latency": "p99_ms",
    "Avg latency": "avg_ms", "Client Send": "client_send_ms", "Network+Server Send/Recv": "network_ms",
    "Server Queue": "queue_ms", "Server Compute Input": "compute_input_ms",
    "Server Compute Infer": "compute_infer_ms", "Server Compute Output": "compute_output_ms",
    "Client Recv": "client_recv_ms",
}
# the parts whose sum is the average client latency (when the CSV has no "Avg latency" column)
_LATENCY_PARTS = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                  "Server Compute Infer", "Server Compute Output", "Client Recv")


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not be obtained, would not run, or produced no measurement."""


class PerfAnalyzerDownloadError(PerfAnalyzerError):
    """The wheel that ships perf_analyzer could not be downloaded (no network, index refused)."""


class PerfAnalyzerUnstable(PerfAnalyzerError):
    """perf_analyzer ran but found no stable measurement within its windows."""


# --- obtaining the binary -----------------------------------------------------------------
def pytriton_libs() -> Path:
    """nvidia-pytriton's folder of bundled shared libraries (``site-packages/nvidia_pytriton.libs``)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise PerfAnalyzerError("nvidia-pytriton is not installed in this environment, and perf_analyzer needs "
                                "the libb64 and libcudart libraries it ships")
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise PerfAnalyzerError(f"nvidia-pytriton has no folder of bundled libraries at {libs}")
    return libs


def _link_libraries(lib_dir: Path) -> None:
    lib_dir.mkdir(parents=True, exist_ok=True)
    src = pytriton_libs()
    for soname, pattern in LIBRARIES.items():
        found = sorted(src.glob(pattern))
        if not found:
            raise PerfAnalyzerError(f"nvidia-pytriton's libraries ({src}) have no {pattern}, which perf_analyzer "
                                    f"needs as {soname}")
        link = lib_dir / soname
        if link.is_symlink() and Path(os.readlink(link)) == found[-1]:
            continue
        tmp = lib_dir / f".{soname}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(found[-1])
        os.replace(tmp, link)                      # atomic: a concurrent obtain() never sees a missing link


def _download_wheel(wheel_dir: Path, timeout: float) -> Path:
    wheels = sorted(wheel_dir.glob(f"tritonclient-{VERSION}-*.whl"))
    if wheels:
        return wheels[-1]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(wheel_dir), f"tritonclient=={VERSION}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PerfAnalyzerDownloadError(f"pip download tritonclient=={VERSION} did not finish within "
                                        f"{timeout:.0f} s") from None
    wheels = sorted(wheel_dir.glob(f"tritonclient-{VERSION}-*.whl"))
    if r.returncode != 0 or not wheels:
        why = _last_line(r.stderr) or _last_line(r.stdout) or f"exit code {r.returncode}"
        raise PerfAnalyzerDownloadError(f"could not download the tritonclient {VERSION} wheel that ships "
                                        f"perf_analyzer (pip download: {why})")
    return wheels[-1]


def _extract(wheel: Path, binary: Path) -> None:
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise PerfAnalyzerError(f"{wheel.name} has no {WHEEL_MEMBER}") from None
    except (zipfile.BadZipFile, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise PerfAnalyzerError(f"could not extract perf_analyzer from {wheel} ({e}); remove it to download "
                                f"it again") from None
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, binary)


def obtain(cache_dir: Path = DEFAULT_CACHE, *, timeout: float = 300.0) -> tuple[Path, dict]:
    """perf_analyzer ready to run: ``(binary, env)``, ``subprocess.run([binary, ...], env=env)``.

    Downloads the tritonclient wheel into ``cache_dir/wheel`` only when it is not there,
    extracts the binary to ``cache_dir/bin`` once, (re)links the libraries in ``cache_dir/lib``
    and checks that the binary starts (``--version``).  Raises PerfAnalyzerError with one
    sentence when any step fails."""
    cache_dir = Path(cache_dir).absolute()
    binary, lib_dir = cache_dir / "bin" / "perf_analyzer", cache_dir / "lib"
    if not binary.is_file():
        _extract(_download_wheel(cache_dir / "wheel", timeout), binary)
    _link_libraries(lib_dir)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    try:
        r = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PerfAnalyzerError(f"{binary} --version did not answer within 30 s") from None
    except OSError as e:
        raise PerfAnalyzerError(f"{binary} cannot be started ({e.strerror})") from None
    if r.returncode != 0 or "Perf Analyzer" not in r.stdout + r.stderr:
        raise PerfAnalyzerError(f"{binary} does not run here: {_last_line(r.stderr) or _last_line(r.stdout)}")
    return binary, env


def version(binary: Path, env: dict) -> str:
    r = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    return _last_line(r.stdout + r.stderr)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --- input data -----------------------------------------------------------------------------
def text_input_data(captions: list[str], name: str = "TEXT") -> dict:
    """perf_analyzer ``--input-data`` JSON: one batch-1 entry (shape [1]) per caption."""
    return {"data": [{name: {"content": [c], "shape": [1]}} for c in captions]}


def image_input_data(images: list[bytes], name: str = "IMAGE") -> dict:
    """perf_analyzer ``--input-data`` JSON: one batch-1 entry per encoded image.  For BYTES
    inputs perf_analyzer sends the decoded ``b64`` as the tensor's raw content, which must
    therefore be Triton's serialised form: each element preceded by its 4-byte little-endian
    length."""
    return {"data": [{name: {"b64": base64.b64encode(struct.pack("<I", len(b)) + b).decode("ascii"), "shape": [1]}}
                     for b in images]}


def write_input_data(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# --- parsing ---------------------------------------------------------------------------------
def _num(v: str | None) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def parse_csv(text: str, batch: int = 1) -> list[dict]:
    """perf_analyzer's ``-f`` CSV (with or without ``--verbose-csv``), one dict per row
    (concurrency level): ``concurrency``, ``batch``, ``infer_per_s`` (perf_analyzer's
    Inferences/Second, which counts batch items), ``items_per_s`` (the same figure),
    ``requests_per_s``, latencies in ms (``p50_ms`` ... ``p99_ms``, ``avg_ms``; ``max_ms`` is NaN:
    perf_analyzer reports none) and the split: ``client_send_ms``, ``network_ms`` (network and
    server send/receive), ``queue_ms``, ``compute_input_ms``, ``compute_infer_ms``,
    ``compute_output_ms``, ``client_recv_ms``."""
    rows = list(csv.DictReader(io.StringIO(text.strip())))
    if not rows or "Inferences/Second" not in rows[0]:
        raise PerfAnalyzerError("perf_analyzer's CSV report has no 'Inferences/Second' column")
    out = []
    for row in rows:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        c = _num(row.get("Concurrency"))
        d = {"concurrency": int(c) if math.isfinite(c) else None, "batch": batch}
        d["infer_per_s"] = d["items_per_s"] = _num(row["Inferences/Second"])
        d["requests_per_s"] = d["items_per_s"] / batch
        for col, key in CSV_LATENCIES.items():
            d[key] = _num(row.get(col)) / 1e3
        if not math.isfinite(d["avg_ms"]):
            d["avg_ms"] = sum(_num(row.get(c)) for c in _LATENCY_PARTS) / 1e3
        d["max_ms"] = math.nan
        out.append(d)
    return out


_STDOUT = {"requests": r"Client:\s*\n\s*Request count:\s*(\d+)",
           "inferences": r"Server:\s*\n\s*Inference count:\s*(\d+)",
           "executions": r"Server:\s*\n\s*Inference count:\s*\d+\s*\n\s*Execution count:\s*(\d+)"}


def parse_stdout(text: str) -> dict:
    """The counts perf_analyzer prints but does not put in its CSV: client requests, and the
    server's inference and execution counts (their ratio is the realised dynamic batch size)."""
    d = {}
    for key, pat in _STDOUT.items():
        m = re.findall(pat, text)
        d[key] = int(m[-1]) if m else None
    d["realised_batch"] = d["inferences"] / d["executions"] if d["inferences"] and d["executions"] else math.nan
    return d


# --- running ---------------------------------------------------------------------------------
def command(binary: Path, url: str, model: str, input_data: Path, concurrency: int, batch: int, csv_path: Path, *,
            measurement_interval_ms: int, stability_percentage: float, max_trials: int) -> list[str]:
    return [str(binary), "-i", "grpc", "-u", url, "-m", model, "-b", str(batch),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(input_data),
            "-f", str(csv_path), "--verbose-csv",
            "--measurement-interval", str(int(measurement_interval_ms)),
            "--stability-percentage", f"{stability_percentage:g}", "--max-trials", str(int(max_trials))]


def run(binary: Path, env: dict, url: str, model: str, input_data: Path, concurrency: int, batch: int = 1, *,
        measurement_interval_ms: int = 3000, stability_percentage: float = 20.0, max_trials: int = 10,
        timeout: float | None = None) -> dict:
    """One perf_analyzer measurement over gRPC; the row of ``parse_csv`` plus ``parse_stdout``'s
    counts and the command line (``command``).  ``timeout`` (default: twice the longest
    possible measurement plus a minute) bounds the subprocess.  Raises PerfAnalyzerUnstable when
    no 3 windows agreed, PerfAnalyzerError on any other failure, each with one sentence."""
    if timeout is None:
        timeout = 2 * max_trials * measurement_interval_ms / 1e3 + 60
    what = f"{model} at concurrency {concurrency}, batch {batch}"
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as tmp:
        csv_path = Path(tmp) / "report.csv"
        cmd = command(binary, url, model, input_data, concurrency, batch, csv_path,
                      measurement_interval_ms=measurement_interval_ms, stability_percentage=stability_percentage,
                      max_trials=max_trials)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(f"perf_analyzer did not finish measuring {what} within {timeout:.0f} s") from None
        except OSError as e:
            raise PerfAnalyzerError(f"perf_analyzer ({binary}) cannot be started: {e.strerror}") from None
        text = r.stdout + "\n" + r.stderr
        if r.returncode != 0 or not csv_path.is_file():
            if "Failed to obtain stable measurement" in text:
                raise PerfAnalyzerUnstable(
                    f"perf_analyzer found no stable measurement of {what}: the last 3 of {max_trials} windows of "
                    f"{measurement_interval_ms} ms never agreed within {stability_percentage:g}% "
                    f"(a quieter machine, longer windows or a larger percentage would help)")
            why = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()),
                       _last_line(text))
            raise PerfAnalyzerError(f"perf_analyzer failed measuring {what} (exit code {r.returncode}): {why}")
        rows = parse_csv(csv_path.read_text(), batch)
    res = rows[-1]
    res.update(parse_stdout(r.stdout))
    res["command"] = cmd
    return res


# --- command line ----------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    head = (f"{'model':<12} {'conc':>4} {'batch':>5} {'items/s':>9} {'req/s':>8} {'p50':>8} {'p90':>8} {'p95':>8} "
            f"{'p99':>8} {'avg':>8} {'max':>5} {'queue':>7} {'c.in':>6} {'infer':>7} {'c.out':>6} {'batch*':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['model']:<12} {r['concurrency']:>4} {r['batch']:>5} {r['items_per_s']:>9.1f} "
                     f"{r['requests_per_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p95_ms']:>8.2f} "
                     f"{r['p99_ms']:>8.2f} {r['avg_ms']:>8.2f} {'n/a':>5} {r['queue_ms']:>7.2f} "
                     f"{r['compute_input_ms']:>6.2f} {r['compute_infer_ms']:>7.2f} {r['compute_output_ms']:>6.2f} "
                     f"{r['realised_batch']:>6.2f}")
    lines.append("client latencies in ms (perf_analyzer reports no max); queue / c.in / infer / c.out: Triton's mean "
                 "per request; batch*: realised dynamic batch size")
    return "\n".join(lines)


def default_input_data(model: str, path: Path) -> Path:
    from tools.bench import realistic_captions, realistic_jpegs
    if model == "filip_text":
        return write_input_data(path, text_input_data(realistic_captions()))
    if model == "filip_image":
        return write_input_data(path, image_input_data(realistic_jpegs()))
    raise PerfAnalyzerError(f"no built-in input data for model {model!r} (filip_text and filip_image have some); "
                            f"give --input-data FILE")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.perf_analyzer", description=__doc__.split("\n\n")[0])
    p.add_argument("--obtain", action="store_true", help="download and set up perf_analyzer, print where, and exit")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where it is kept (default {DEFAULT_CACHE})")
    p.add_argument("--url", help="a running server's gRPC address host:port")
    p.add_argument("--repository", type=Path, help="start tritonserver on this model repository (when no --url)")
    p.add_argument("--model", action="append", help="filip_text, filip_image (repeatable; default both)")
    p.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--batch", default="1", help="items per request, comma-separated (default 1)")
    p.add_argument("--input-data", type=Path, help="perf_analyzer --input-data JSON (default: tools.bench's "
                                                    "realistic captions / JPEGs for filip_text / filip_image)")
    p.add_argument("--measurement-interval", type=int, default=3000, help="ms per window (default 3000)")
    p.add_argument("--stability-percentage", type=float, default=20.0, help="default 20")
    p.add_argument("--max-trials", type=int, default=10, help="windows before giving up (default 10)")
    p.add_argument("--json", type=Path, help="write every result as JSON here")
    args = p.parse_args(argv)
    try:
        binary, env = obtain(args.cache_dir)
        if args.obtain:
            print(f"{version(binary, env)}: {binary}")
            print(f"run it with LD_LIBRARY_PATH={env['LD_LIBRARY_PATH'].split(os.pathsep)[0]}")
            return 0
        if args.url is None and args.repository is None:
            p.error("give --url or --repository (or --obtain)")
        models = args.model or ["filip_image", "filip_text"]
        server = None
        if args.url is None:
            from filip_export.launch import TritonServer
            try:
                server = TritonServer(args.repository).start()
            except RuntimeError as e:
                raise PerfAnalyzerError(f"tritonserver did not start on {args.repository}: "
                                        f"{_last_line(str(e)) or 'see its log'}") from None
        results = []
        try:
            with tempfile.TemporaryDirectory(prefix="perf_analyzer-data-") as tmp:
                for model in models:
                    data = args.input_data or default_input_data(model, Path(tmp) / f"{model}.json")
                    for b in _ints(args.batch):
                        for c in _ints(args.concurrency):
                            r = run(binary, env, args.url or server.url, model, data, c, b,
                                    measurement_interval_ms=args.measurement_interval,
                                    stability_percentage=args.stability_percentage, max_trials=args.max_trials)
                            r["model"] = model
                            results.append(r)
                            print(table(results[-1:]).splitlines()[2], flush=True)
        finally:
            if server is not None:
                server.stop()
    except PerfAnalyzerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(results))
    print("command:", " ".join(results[-1]["command"]) if results else "")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
