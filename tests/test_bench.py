"""Benchmark statistics on known samples, perf_analyzer's reports parsed from real samples, and
short runs against a real server (the closed loop; perf_analyzer in the slow test)."""
from __future__ import annotations

import base64
import json
import math
import struct

import pytest

from tools import perf_analyzer as pa
from tools.bench import LatencyStats, is_stable, main as bench_main, perf_analyzer_point, server_split, table


def test_percentiles_on_known_samples():
    lat = [i / 1000 for i in range(1, 101)]          # 1..100 ms
    s = LatencyStats.of(lat, items=400, errors=2, seconds=2.0)
    assert s.requests == 100 and s.items == 400 and s.errors == 2 and s.throughput == 200.0
    assert s.p50 == pytest.approx(50.5) and s.p90 == pytest.approx(90.1) and s.p99 == pytest.approx(99.01)
    assert s.max == pytest.approx(100.0)
    empty = LatencyStats.of([], items=0, errors=5, seconds=1.0)
    assert math.isnan(empty.p50) and empty.errors == 5


def _w(tp, p50):
    return LatencyStats(10, 10, 0, 1.0, tp, p50, p50, p50, p50, p50)


def test_stability_rule():
    assert not is_stable([_w(100, 5), _w(101, 5)])                       # fewer than 3 windows
    assert is_stable([_w(50, 9), _w(100, 5.0), _w(104, 5.2), _w(98, 4.9)])  # last 3 within 10 %
    assert not is_stable([_w(100, 5), _w(100, 5), _w(120, 5)])           # throughput moved 18 %
    assert not is_stable([_w(100, 5), _w(100, 5), _w(100, 6)])           # p50 moved 19 %
    assert not is_stable([_w(100, 5), _w(100, 5), _w(float("nan"), 5)])


def test_server_split_from_statistics():
    def snap(execs, infers, queue_ns, infer_ns, n):
        return {"model_stats": [{"execution_count": str(execs), "inference_count": str(infers),
                                 "inference_stats": {"queue": {"count": str(n), "ns": str(queue_ns)},
                                                     "compute_infer": {"count": str(n), "ns": str(infer_ns)}}}]}
    d = server_split(snap(10, 10, 0, 0, 10), snap(20, 50, 4_000_000, 20_000_000, 20))
    assert d["executions"] == 10 and d["realised_batch"] == 4.0
    assert d["queue_ms"] == pytest.approx(0.4) and d["compute_infer_ms"] == pytest.approx(2.0)
    assert math.isnan(d["compute_output_ms"])


def test_smoke_against_a_real_server(tiny_checkpoint, tmp_path, capsys):
    from filip_export.to_trt import main as export_main
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = bench_main(["--repository", str(repo), "--concurrency", "1,2", "--batch", "1,4", "--window", "0.3",
                     "--max-time", "1.2", "--warmup", "1", "--in-process", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    points = json.loads(out_json.read_text())
    assert len(points) == 3 * 2 * 2 + 3 * 2          # served sweep + in-process
    for p in points:
        assert p["stats"]["errors"] == 0 and p["stats"]["requests"] > 0 and p["stats"]["throughput"] > 0
        if p["mode"] == "served":
            assert p["server"]["executions"] > 0
    assert out_png.stat().st_size > 10_000
    assert "items/s" in capsys.readouterr().out


# perf_analyzer 2.48.0 reports as written by it: ``-f`` with --verbose-csv, filip_image of the
# ViT-B-32 repository at concurrency 8, batch 1; and without it, the tiny repository's filip_text
# at concurrency 1 (all times in microseconds).
PA_VERBOSE_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
8,19.3455,15,1496,174637,211,229335,968,3,401603,482579,545683,611257,406668,18,406610
"""
PA_PLAIN_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,483.121,4,350,597,19,960,127,2,1622,3426,4775,6052
"""
# its console output for the first report (the part after the settings; trailing blanks trimmed)
PA_STDOUT = """\
Request concurrency: 8
  Client:
    Request count: 209
    Throughput: 19.3455 infer/sec
    Avg latency: 406668 usec (standard deviation 67055 usec)
    p50 latency: 401603 usec
    p90 latency: 482579 usec
    p95 latency: 545683 usec
    p99 latency: 611257 usec
    Avg gRPC time: 406628 usec ((un)marshal request/response 18 usec + response wait 406610 usec)
  Server:
    Inference count: 209
    Execution count: 56
    Successful request count: 209
    Avg request latency: 405161 usec (overhead 9 usec + queue 174637 usec + compute input 211 usec + compute infer 229335 usec + compute output 968 usec)

Inferences/Second vs. Client Average Batch Latency
Concurrency: 8, throughput: 19.3455 infer/sec, latency 406668 usec
"""


def test_perf_analyzer_csv_parsed():
    (r,) = pa.parse_csv(PA_VERBOSE_CSV, batch=1)
    assert r["concurrency"] == 8 and r["batch"] == 1
    assert r["infer_per_s"] == r["items_per_s"] == pytest.approx(19.3455) and r["requests_per_s"] == pytest.approx(19.3455)
    assert (r["p50_ms"], r["p90_ms"], r["p95_ms"], r["p99_ms"]) == pytest.approx((401.603, 482.579, 545.683, 611.257))
    assert r["avg_ms"] == pytest.approx(406.668)
    assert r["queue_ms"] == pytest.approx(174.637) and r["compute_input_ms"] == pytest.approx(0.211)
    assert r["compute_infer_ms"] == pytest.approx(229.335) and r["compute_output_ms"] == pytest.approx(0.968)
    assert r["network_ms"] == pytest.approx(1.496) and r["client_send_ms"] == pytest.approx(0.015)
    assert math.isnan(r["max_ms"])                      # perf_analyzer reports no maximum

    (r,) = pa.parse_csv(PA_PLAIN_CSV, batch=4)           # infer/s counts batch items
    assert r["items_per_s"] == pytest.approx(483.121) and r["requests_per_s"] == pytest.approx(483.121 / 4)
    assert r["p99_ms"] == pytest.approx(6.052)
    assert r["avg_ms"] == pytest.approx((4 + 350 + 597 + 19 + 960 + 127 + 2) / 1e3)   # no Avg column: the parts' sum
    with pytest.raises(pa.PerfAnalyzerError, match="Inferences/Second"):
        pa.parse_csv("Concurrency,p50 latency\n1,5\n")


def test_perf_analyzer_stdout_counts():
    d = pa.parse_stdout(PA_STDOUT)
    assert (d["requests"], d["inferences"], d["executions"]) == (209, 209, 56)
    assert d["realised_batch"] == pytest.approx(209 / 56)
    assert math.isnan(pa.parse_stdout("nothing here")["realised_batch"])


def test_perf_analyzer_input_data():
    img = pa.image_input_data([b"\xff\xd8jpeg", b"\xff\xd8other"])["data"]
    raw = base64.b64decode(img[1]["IMAGE"]["b64"])      # Triton's serialised BYTES: length, then the bytes
    assert struct.unpack("<I", raw[:4])[0] == len(b"\xff\xd8other") and raw[4:] == b"\xff\xd8other"
    assert img[0]["IMAGE"]["shape"] == [1]
    assert pa.text_input_data(["a dog", "a cat"])["data"][1] == {"TEXT": {"content": ["a cat"], "shape": [1]}}


def test_perf_analyzer_point_in_the_table():
    r = pa.parse_csv(PA_VERBOSE_CSV)[0] | pa.parse_stdout(PA_STDOUT) | {"command": ["perf_analyzer", "-m", "filip_image"]}
    p = perf_analyzer_point(r, "image", 8, 1)
    assert p.source == "perf_analyzer" and p.mode == "served" and p.stats.requests == 209
    assert p.stats.throughput == pytest.approx(19.3455) and math.isnan(p.stats.max)
    assert p.server["queue_ms"] == pytest.approx(174.637) and p.server["executions"] == 56
    assert p.perf_analyzer["command"] == "perf_analyzer -m filip_image"
    row = table([p]).splitlines()[2].split()
    assert row[:3] == ["image", "served", "pa"] and row[10] == "n/a"   # max column


@pytest.mark.slow
def test_perf_analyzer_against_a_real_server(tiny_checkpoint, tmp_path):
    """Obtains perf_analyzer (downloads the tritonclient 2.48.0 wheel once into build/perf_analyzer)
    and measures the tiny repository's filip_text for a few seconds, directly and through
    ``tools.bench --perf-analyzer``."""
    from filip_export.launch import TritonServer
    from filip_export.to_trt import main as export_main
    from tools.bench import realistic_captions
    try:
        binary, env = pa.obtain()
    except pa.PerfAnalyzerDownloadError as e:
        pytest.skip(f"perf_analyzer cannot be downloaded here: {e}")
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0
    data = pa.write_input_data(tmp_path / "text.json", pa.text_input_data(realistic_captions()))
    with TritonServer(repo) as server:
        r = pa.run(binary, env, server.url, "filip_text", data, concurrency=1, batch=1,
                   measurement_interval_ms=1000, stability_percentage=50, max_trials=6)
        assert r["items_per_s"] > 0 and r["requests"] > 0
        assert math.isfinite(r["p99_ms"]) and r["p99_ms"] >= r["p50_ms"] > 0
        assert r["compute_infer_ms"] > 0 and r["realised_batch"] >= 1

        out_json = tmp_path / "b.json"
        rc = bench_main(["--url", server.url, "--repository", str(repo), "--workloads", "text,score", "--concurrency", "1",
                         "--batch", "1", "--window", "0.3", "--max-time", "1.2", "--warmup", "1", "--perf-analyzer",
                         "--pa-interval", "1000", "--pa-stability", "50", "--pa-max-trials", "6",
                         "--in-process", "--in-process-concurrency", "1,2", "--json", str(out_json)])
    assert rc == 0
    points = {(p["workload"], p["mode"], p["concurrency"]): p for p in json.loads(out_json.read_text())}
    assert set(points) == {("text", "served", 1), ("score", "served", 1), ("text", "in-process", 1),
                           ("text", "in-process", 2), ("score", "in-process", 1), ("score", "in-process", 2)}
    t = points[("text", "served", 1)]
    assert t["source"] == "perf_analyzer" and t["stats"]["throughput"] > 0 and math.isnan(t["stats"]["max"])
    assert "--concurrency-range 1:1" in t["perf_analyzer"]["command"]
    assert points[("score", "served", 1)]["source"] == "closed-loop"
    assert all(p["stats"]["throughput"] > 0 for p in points.values())
