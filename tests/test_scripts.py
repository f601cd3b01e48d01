"""
The scripts a new user runs first, and the checkout they run in.

scripts/venv (run by scripts/demo and scripts/test) calls pip only when the
venv is behind the checkout, so a second start of the demo does not wait for
it. The tests run the real script on a copy of the checkout whose
.venv/bin/python records its arguments instead of installing: a real install
takes seconds to minutes and needs the package index, and what matters here is
whether, and how, the script calls pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".venv/tickstock-install.stamp"

# Stands in for the venv's python: logs "pip install …", fails on demand.
RECORDING_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
exit "${FAIL_INSTALL:-0}"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """What scripts/venv reads from the checkout, with a venv that records pip calls."""
    for name in ("pyproject.toml", "setup.cfg", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "venv", tmp_path / "scripts" / "venv")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    shutil.copytree(ROOT / "tickstock", tmp_path / "tickstock", ignore=skip)
    shutil.copytree(ROOT / "twisted" / "plugins", tmp_path / "twisted" / "plugins", ignore=skip)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(RECORDING_PYTHON)
    python.chmod(0o755)
    return tmp_path


def run_venv(checkout: Path, fail: bool = False) -> list[str]:
    """Run scripts/venv in C{checkout}; the pip commands it ran this time."""
    log = checkout / ".venv" / "calls.log"
    before = log.read_text().splitlines() if log.exists() else []
    env = dict(os.environ, FAIL_INSTALL="1" if fail else "0")
    result = subprocess.run([str(checkout / "scripts" / "venv")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode != 0) == fail, result.stderr
    after = log.read_text().splitlines() if log.exists() else []
    return after[len(before):]


def is_full_install(call: str) -> bool:
    """Whether a recorded pip call installs TickStock with its dependencies."""
    words = call.split()
    return words[:3] == ["-m", "pip", "install"] and "--no-deps" not in words \
        and "constraints.txt" in words and words[-1] == ".[test]"


def is_tickstock_only(call: str) -> bool:
    """Whether a recorded pip call reinstalls TickStock alone."""
    words = call.split()
    return words[:3] == ["-m", "pip", "install"] and "--no-deps" in words and words[-1] == "."


def test_a_venv_up_to_date_with_the_checkout_runs_no_pip(checkout: Path) -> None:
    first = run_venv(checkout)
    assert len(first) == 1 and is_full_install(first[0]), first
    assert "setuptools>=69" in first[0].split(), "the build requirements, for --no-deps reinstalls"
    assert (checkout / STAMP).exists()

    assert run_venv(checkout) == []


@pytest.mark.parametrize("change", [
    "tickstock/web/dashboard/style.css",         # package data, not Python
    "tickstock/store/migrations/9999_new.sql",   # a new file
    "twisted/plugins/tickstock_plugin.py",
])
def test_a_changed_tickstock_file_reinstalls_tickstock_alone(checkout: Path, change: str) -> None:
    run_venv(checkout)
    path = checkout / change
    path.write_text((path.read_text() if path.exists() else "") + "\n/* changed */\n")

    again = run_venv(checkout)
    assert len(again) == 1 and is_tickstock_only(again[0]), again
    assert run_venv(checkout) == []


def test_bytecode_and_the_plugin_cache_are_not_changes(checkout: Path) -> None:
    run_venv(checkout)
    (checkout / "tickstock" / "__pycache__").mkdir()
    (checkout / "tickstock" / "__pycache__" / "events.cpython-311.pyc").write_bytes(b"\0")
    (checkout / "twisted" / "plugins" / "dropin.cache").write_bytes(b"\0")

    assert run_venv(checkout) == []


@pytest.mark.parametrize("change", ["constraints.txt", "pyproject.toml", "setup.cfg"])
def test_changed_dependencies_reinstall_everything(checkout: Path, change: str) -> None:
    run_venv(checkout)
    with open(checkout / change, "a") as out:
        out.write("\n# changed\n")
    (checkout / "tickstock" / "events.py").write_text("# changed too\n")

    again = run_venv(checkout)
    assert len(again) == 1 and is_full_install(again[0]), again
    assert run_venv(checkout) == []


def test_a_failed_install_leaves_no_stamp_so_the_next_run_retries(checkout: Path) -> None:
    run_venv(checkout)
    (checkout / "tickstock" / "events.py").write_text("# changed\n")

    assert len(run_venv(checkout, fail=True)) == 1
    assert not (checkout / STAMP).exists()
    retried = run_venv(checkout)
    assert len(retried) == 1 and is_full_install(retried[0]), "no stamp: start over"
    assert run_venv(checkout) == []


def test_the_files_the_readme_has_users_create_are_ignored_by_git() -> None:
    """The README's quick start writes jwt.secret into the checkout; it must not be committed."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["jwt.secret", "key.pem", "cert.pem", "twistd.pid", "twistd.log", ".venv/bin/python"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert sorted(result.stdout.split()) == sorted(names), result.stderr
