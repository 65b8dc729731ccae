"""The benchmark's pure logic: percentile summaries and the budget checks. (It reads the
replay's summary from ``replay --summary-json``: tests/test_replay.py checks that file.)
No timing is asserted here; that is what `lhtstream bench` is for."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_percentiles_of_known_values():
    from lhtstream.base.stats import percentiles
    from lhtstream.service.harness import LAT_QS

    # 1..1000: linear interpolation puts p50 at 500.5, p99 at 990.01, p99.9 at 999.001
    out = percentiles(np.arange(1, 1001, dtype=float), LAT_QS)
    assert out == {"p50": 500.5, "p99": 990.0, "p999": 999.0, "max": 1000.0}
    assert percentiles(np.array([7.0]), LAT_QS) == {"p50": 7.0, "p99": 7.0, "p999": 7.0,
                                                    "max": 7.0}
    assert percentiles(np.zeros(0), LAT_QS) == {"p50": None, "p99": None, "p999": None,
                                                "max": None}


def test_over_floor_compares_with_the_pooled_hop():
    from lhtstream.cli.bench import check_endtoend, over_floor

    # the hop's 1..1000 us: p50 500.5, p99 990.0, p99.9 999.0 (as above)
    hop = np.arange(1, 1001, dtype=float)
    result = _result(latency_us={"p50": 750.75, "p99": 1980.0, "p999": 2500.0, "max": 3000.0})
    out = over_floor(result, hop)
    assert out["floor_us"] == {"p50": 500.5, "p99": 990.0, "p999": 999.0}
    assert out["hop_messages"] == 1000
    assert (out["ratio_p50"], out["ratio_p99"]) == (1.5, 2.0)
    assert (out["added_p50_us"], out["added_p999_us"]) == (250.2, 1501.0)
    # a hop under 1 ms at p99.9 leaves the strict budget in force
    assert len(check_endtoend(dict(result, over_floor=out))) == 1


def _result(**over):
    r = {"transport": "ipc", "streams": 1, "frames_lost": 0, "frames_processed": 5000,
         "latency_us": {"p50": 200.0, "p99": 600.0, "p999": 999.9, "max": 4000.0}}
    r.update(over)
    return r


def test_check_endtoend_flags_loss_and_the_p999_budget():
    from lhtstream.cli.bench import check_endtoend

    assert check_endtoend(_result()) == []
    assert len(check_endtoend(_result(frames_lost=3))) == 1
    empty = {"p50": None, "p99": None, "p999": None, "max": None}
    # no frame: flagged as such, and neither percentile can be under budget
    assert len(check_endtoend(_result(frames_processed=0, latency_us=empty))) == 3
    tail = {"p50": 1, "p99": 2, "p999": 1000.0, "max": 3}
    over = check_endtoend(_result(latency_us=tail))
    assert len(over) == 1 and "p99.9" in over[0]
    # a host whose bare hop misses the budget at p99.9: judged on what the monitor adds
    def hop(p999):
        return {"floor_us": {"p50": 1.0, "p99": 2.0, "p999": p999},
                "added_p999_us": round(3000.0 - p999, 1)}

    host_tail = {"p50": 1, "p99": 2, "p999": 3000.0, "max": 4000.0}
    assert check_endtoend(_result(latency_us=host_tail, over_floor=hop(2500.0))) == []
    assert len(check_endtoend(_result(latency_us=host_tail, over_floor=hop(1500.0)))) == 1
    assert len(check_endtoend(_result(latency_us=host_tail, over_floor=hop(900.0)))) == 1
    assert len(check_endtoend(_result(latency_us=host_tail))) == 1  # no hop measured
    # short (non-strict) runs report the tail but still fail on loss and on the typical frame
    assert check_endtoend(_result(latency_us=tail), strict=False) == []
    assert len(check_endtoend(_result(frames_lost=1, latency_us=tail), strict=False)) == 1
    slow = {"p50": 1000.0, "p99": 2000.0, "p999": 3000.0, "max": 4000.0}
    assert any("p50" in p for p in check_endtoend(_result(latency_us=slow), strict=False))


def test_check_view_cost_judges_the_ratio_on_long_segments_and_the_cpu_on_short():
    from lhtstream.cli.bench import check_view_cost

    def result(segment_s, ratio, cpu, lost=0, pictures=25.0):
        return {"segment_s": segment_s, "frames_lost": lost, "latency_ratio": {"p50": ratio},
                "view": {"cpu_percent": cpu, "pictures_per_s": pictures, "page_errors": []}}

    assert check_view_cost(result(30.0, 1.08, 7.5)) == []
    assert "p50 x1.6" in check_view_cost(result(30.0, 1.6, 7.5))[0]
    assert check_view_cost(result(2.5, 2.7, 9.0)) == []  # a short run's ratio: the host's
    assert "% of a core" in check_view_cost(result(2.5, 1.0, 80.0))[0]  # a busy view
    assert len(check_view_cost(result(2.5, 1.0, 9.0, lost=1))) == 1
    assert len(check_view_cost(result(2.5, 1.0, 9.0, pictures=0.0))) == 1


def test_the_bench_runs_from_the_installed_package_alone(tmp_path):
    """`lhtstream bench` needs nothing from a source checkout: with only the package
    (no tools/, no bench/) on the path, its bare-hop measurement runs."""
    import os
    import shutil
    import subprocess
    import sys

    import lhtstream

    shutil.copytree(Path(lhtstream.__file__).parent, tmp_path / "lhtstream",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = ("import lhtstream, sys; from lhtstream.cli.bench import run_zmq_floor; "
            "print(lhtstream.__file__); print(run_zmq_floor('ipc', 0.5).size)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    where, size = out.stdout.split()
    assert where.startswith(str(tmp_path))  # the copy, not the checkout
    assert 400 <= int(size) <= 500  # every message of 0.5 s at 1 kHz, give or take the start
