"""
The shipped deployment files work as shipped: the systemd unit's ExecStart
line (with its environment) starts a daemon that serves, logs JSON lines to
stdout for journald, and stops cleanly on systemd's KillSignal.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson

from tests.servers import free_port, poll

ROOT = Path(__file__).resolve().parent.parent


def unit_service_section(path: Path) -> list[tuple[str, str]]:
    """The [Service] section's key=value lines, in order (keys may repeat)."""
    section, entries = None, []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            entries.append((key, value))
    return entries


def test_the_systemd_units_command_runs_a_daemon_that_stops_on_its_kill_signal(
        tmp_path: Path) -> None:
    entries = unit_service_section(ROOT / "conf" / "tickstock.service")
    argv = shlex.split(dict(entries)["ExecStart"])
    assert argv[0] == "/opt/tickstock/venv/bin/twistd"
    argv[0] = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ)
    for key, value in entries:
        if key == "Environment":
            name, _, value = value.partition("=")
            env[name] = value
    assert env["TICKSTOCK_CONFIG"] == "/etc/tickstock/tickstock.toml"
    env["TICKSTOCK_CONFIG"] = str(ROOT / "conf" / "tickstock.toml")
    env["TICKSTOCK_SPOOL_DIR"] = str(tmp_path / "spool")
    port = free_port()
    env["TICKSTOCK_LISTEN"] = f"tcp:{port}:interface=127.0.0.1"
    kill = getattr(signal, dict(entries)["KillSignal"])

    daemon = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        poll(ready, 30, "the daemon ready")
        daemon.send_signal(kill)
        output, _ = daemon.communicate(timeout=float(dict(entries)["TimeoutStopSec"]))
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    # twistd ends by re-raising the signal it stopped on; systemd counts
    # SIGTERM as a clean exit.
    assert daemon.returncode in (0, -kill)
    records = [orjson.loads(line) for line in output.splitlines()]
    assert records[-1]["message"] == "Server Shut Down."
    assert not (tmp_path / "twistd.pid").exists()  # --pidfile= : systemd tracks the process


def test_the_daemon_process_runs_with_its_own_garbage_collector_thresholds() -> None:
    """makeService (twistd's entry point) sets the process's GC thresholds."""
    import gc

    from tickstock.tap import GC_THRESHOLDS, Options, makeService

    before = gc.get_threshold()
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    try:
        makeService(options)
        assert gc.get_threshold() == GC_THRESHOLDS != before
    finally:
        gc.set_threshold(*before)
