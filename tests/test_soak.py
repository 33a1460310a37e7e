"""The soak script's short mode against a real server, and its memory-growth rule."""
from __future__ import annotations

import os

import pytest

from filip_export.launch import TritonServer
from tools.soak import MEMORY_SAMPLES, main as soak_main, memory_grows, process_tree_rss, run_soak
from filip_export.to_trt import main as export_main


def test_memory_growth_rule():
    with pytest.raises(ValueError, match="cannot be judged"):
        memory_grows([100] * 3)                                         # too few samples: no verdict
    assert not memory_grows([50, 90, 100, 100, 101, 99, 100, 102])     # warm-up, then flat
    assert memory_grows([100, 100, 100, 100, 110, 120, 130, 140]) is True   # a plain bool (JSON-able)
    assert process_tree_rss(os.getpid()) > 10 * 2**20


def test_short_soak(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0
    lines = []
    with TritonServer(repo) as server:
        report = run_soak(server.url, duration=8, rate=25, bad_share=0.2, interval=2, pid=server.proc.pid,
                          log=lines.append)
        # the same soak with a server whose memory keeps growing: judged, and failed on it alone
        grow = iter(range(10**9))
        leaking = run_soak(server.url, duration=4, rate=10, bad_share=0.0, interval=2, pid=server.proc.pid,
                           log=lambda _: None, rss=lambda pid: (100 + next(grow)) * 2**20)
    assert report.passed, report
    assert report.requests >= 150 and report.good_failed == 0 and report.bad_rejected > 10
    assert len(report.intervals) >= 3 and all(iv["rss_mib"] > 50 for iv in report.intervals)
    assert len(report.memory_samples) == MEMORY_SAMPLES and report.memory_growing is False
    assert lines and "p99" in lines[0]
    assert leaking.memory_growing is True and not leaking.passed
    assert leaking.good_failed == 0 and leaking.alive_at_end


def test_soak_cli_writes_its_report(tiny_checkpoint, tmp_path, capsys):
    import json
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0
    rc = soak_main(["--repository", str(repo), "--duration", "3", "--rate", "20", "--interval", "1",
                    "--json", str(tmp_path / "soak.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS" in out
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["good_failed"] == 0 and report["alive_at_end"] is True and report["intervals"]
