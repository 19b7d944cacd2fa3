"""The test suite's own manners: it writes nothing into the repository's default output locations (runs/, data/,
bench.json; checked after every test by tests/conftest.py), nothing past pytest's output capture (``pytest -q``
shows dots and the summary only), and the commands' ``--help`` describes their options."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import default_outputs
from multibox.cli import build_parser

TESTS = Path(__file__).resolve().parent


def test_default_outputs_lists_run_folders_and_files(tmp_path):
    assert default_outputs(tmp_path) == set()
    (tmp_path / "runs" / "20260101-120000").mkdir(parents=True)
    (tmp_path / "bench.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    assert default_outputs(tmp_path) == {"runs", "runs/20260101-120000", "bench.json"}


def test_a_test_writing_into_runs_fails_and_is_named(tmp_path):
    """A copy of this suite's conftest in a scratch project: the test that leaves runs/<timestamp> behind fails
    at its teardown, naming the folder; its neighbours, and a runs/ folder that was there before, pass."""
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "runs" / "a-user-run").mkdir(parents=True)
    shutil.copy(TESTS / "conftest.py", project / "tests" / "conftest.py")
    (project / "tests" / "test_writes.py").write_text(
        "from pathlib import Path\n"
        "def test_clean(tmp_path):\n"
        "    (tmp_path / 'runs' / 'x').mkdir(parents=True)\n"
        "def test_leaves_a_run_folder():\n"
        "    (Path(__file__).parents[1] / 'runs' / '20260101-120000').mkdir()\n"
        "def test_after():\n"
        "    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=project,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "3 passed, 1 error" in done.stdout, done.stdout
    assert "ERROR at teardown of test_leaves_a_run_folder" in done.stdout, done.stdout
    assert f"{project / 'runs' / '20260101-120000'}; give the command an --out" in done.stdout, done.stdout


def test_no_test_writes_past_the_output_capture():
    """``capsys.disabled()`` or the interpreter's original streams put text among pytest's dots."""
    pattern = re.compile(r"\b(?:capsys|capfd|capsysbinary|capfdbinary)\.disabled\(|sys\.__std(?:out|err)__")
    here = Path(__file__).resolve()
    offenders = [f"{path.relative_to(TESTS)}:{n}" for path in sorted(TESTS.rglob("*.py")) if path != here
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_synth_help_describes_every_option():
    parser = build_parser("synth")
    synth = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["synth"]
    options = [a for a in synth._actions if a.dest != "help"]
    assert {a.dest for a in options} >= {"out", "num_images", "seed"}
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    text = " ".join(synth.format_help().split())   # argparse wraps to the terminal's width
    assert "number of images (default: 200)" in text and "(default: 0)" in text
