"""
The chaos run (bench/chaos.py) in its 60-second version: random faults,
alone and in pairs (kill -9 and restart of the daemon, Redis and
PostgreSQL, SIGSTOP/SIGCONT of each, a client that stops reading), while a
producer XADDs in streams mode and clients resume. Whatever the order of
the faults, nothing the producer wrote is lost or doubled (README, "What
it promises").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_a_minute_of_chaos_loses_nothing(tmp_path: Path) -> None:
    """
    Every pattern reaches every subscription once and in order per symbol,
    the newest tick of each symbol reaches every client, every pattern
    event is in PostgreSQL once, every 1-minute bar is exact, and every
    round of faults is recovered from.
    """
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--duration", "60", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        output, errors = process.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it cleans up its servers
        output, errors = process.communicate(timeout=60)
        raise AssertionError(f"the chaos run did not end:\n{errors[-4000:]}") from None
    assert process.returncode in (0, 2), errors[-6000:]

    summary = json.loads(output)
    sys.stderr.write(json.dumps({"chaos": {k: v for k, v in summary.items()
                                           if k != "fault_log"}}) + "\n")
    assert sum(summary["faults"].values()) >= 10 and summary["combined_rounds"] >= 1
    events = summary["events"]
    assert events["published"] > 10_000 and events["producer_retries"] > 0
    assert events["delivered"] == events["expected_deliveries"] > 0
    assert events["lost"] == events["duplicated"] == events["unexpected"] == 0
    assert events["tick_duplicates"] == events["newest_tick_missing"] == 0
    rows = summary["rows"]
    assert rows["expected"] == events["patterns"]
    assert rows["missing"] == rows["duplicated"] == rows["unexpected"] == 0
    assert summary["recovery_s"]["unrecovered"] == 0
    assert summary["bars"]["checked"] > 0 and summary["bars"]["unexpected"] == 0
    assert summary["clients"]["resumed_unrecovered"] == 0
    assert events["out_of_order"] == events["ticks_out_of_order"] == 0
    assert summary["bars"]["wrong"] == 0
    assert process.returncode == 0, errors[-6000:]
