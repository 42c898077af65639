"""``bench soak`` on tiny-random: half a minute of load through every fault, each twice, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shadowserve.bench.common.faults import FAULTS, fault_schedule
from shadowserve.store.client import POOL_SIZE


def test_schedule_fires_every_fault_each_round_between_steady_windows():
    windows = fault_schedule(90.0, rounds=2)
    assert [w.fault for w in windows] == list(FAULTS) * 2
    assert windows[0].start > 0 and windows[-1].end < 90.0
    assert all(a.end < b.start for a, b in zip(windows, windows[1:]))  # a steady gap between faults


@pytest.mark.timeout(240)
def test_soak_answers_everything_correctly_and_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shadowserve.cli", "bench", "soak", "--model", "tiny-random", "--minutes", "0.5",
         "--chunk-size", "64", "--json", str(out)],
        capture_output=True, text=True, timeout=220,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    total = report["summary"]["total"]
    assert total["sent"] > 50 and total["correct"] == total["sent"], report["summary"]
    assert total["wrong"] == total["failed"] == total["hung"] == 0
    assert total["fetched"] > 0  # the fetch path answered some of them, not only recompute
    assert all(report["faults_fired"][f] >= 2 for f in FAULTS), report["fault_events"]
    damaged = [e["detail"] for e in report["fault_events"] if e["fault"] == "store-corrupt" and e["action"] == "begin"]
    assert all(d.startswith("damaged ") and int(d.split()[1]) > 0 for d in damaged), damaged
    for name, r in report["resources"].items():
        if name == "store_connections":  # a pool: it may grow to the peak of overlapping calls, never past its cap
            assert r["end"] <= POOL_SIZE, (name, r, report["fds_added"])
            continue
        # Nothing grows: a leak adds; a descriptor the server opened at start-up may have closed since.
        assert r["end"] <= r["start"] if name == "open_fds" else r["end"] == r["start"], (name, r, report["fds_added"])
    counters = report["server_counters"]
    assert counters["dataplane_restarts_total"] >= 2  # the kills were noticed and recovered from
    assert counters["fetch_failures_total"] > 0  # damaged chunks were refused, not served
    assert counters["save_failures_total"] > 0  # the full store turned writes away
    assert "faults fired" in proc.stdout and "open_fds" in proc.stdout
