"""Benchmark statistics on known samples, and a short smoke run against a real server."""
from __future__ import annotations

import json
import math

import pytest

from tools.bench import LatencyStats, is_stable, main as bench_main, server_split


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
