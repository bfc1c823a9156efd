"""bench/memory_trace.py: the live-tensor tracker counts what ops create and forgets what is freed; the script runs
on the CPU and reports a peak per context."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from memory_trace import LiveTensors  # noqa: E402


def test_tracker_peak_is_the_largest_live_set():
    a = torch.ones(1000)  # made before the tracker: not counted
    with LiveTensors() as tracker:
        b = a * 2  # 4,000 bytes
        c = b + 1  # 8,000 live
        del b, c  # both freed
        d = torch.zeros(1500)  # 6,000 live: below the peak
    assert tracker.peak == 8000 and tracker.live == 6000
    assert sorted(x[3] for x in tracker.at_peak) == [4000, 4000] and d.numel() == 1500


def test_memory_trace_runs_on_cpu(tmp_path):
    out = tmp_path / "trace.json"
    subprocess.run([sys.executable, str(BENCH / "memory_trace.py"), "--layers", "2", "--batch", "1", "--contexts", "96",
                    "160", "--prefill-chunk", "64", "--new-tokens", "2", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert [r["context"] for r in result["rows"]] == [96, 160]
    assert all(r["peak_live_bytes"] > 0 and r["largest_at_peak"] for r in result["rows"])
    assert result["peak_ratio_last_over_first"] > 0
