"""Shared test fixtures.

``tutorial_default_boxes`` is a literal port of the MindSpore tutorial's ``GeneratDefaultBoxes`` (numpy, Python
floats, (cy, cx, h, w) order, float32 at the end): the independent reference for the default boxes
(tests/test_anchors.py) and the anchors of the tutorial's matcher (tests/test_matching.py).

``mindspore_python`` is the Python of the separate MindSpore environment (skips with the reason where there is
none); ``fuzz_runs`` holds what the coverage-guided fuzzing of tests/test_fuzz.py really ran in this session.
Every test is checked not to write into the commands' default output locations of the repository
(``runs/``, ``data/``, ``bench.json``): tests write under ``tmp_path``.
"""
from __future__ import annotations

import itertools as it
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def generate_tutorial_default_boxes() -> tuple[np.ndarray, np.ndarray]:
    """Returns (default_boxes (8732, 4) as (cy, cx, h, w), default_boxes_tlbr (8732, 4) as (y1, x1, y2, x2)),
    both float32, computed exactly as the tutorial does (Python float64 maths, cast at the end)."""
    feature_sizes = [38, 19, 10, 5, 3, 1]
    num_default = [4, 6, 6, 6, 4, 4]
    aspect_ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    fk = 300 / np.array([8, 16, 32, 64, 100, 300])
    scale_rate = (0.95 - 0.1) / (len(num_default) - 1)
    scales = [0.1 + scale_rate * i for i in range(len(num_default))] + [1.0]
    default_boxes = []
    for idex, feature_size in enumerate(feature_sizes):
        sk1 = scales[idex]
        sk2 = scales[idex + 1]
        sk3 = math.sqrt(sk1 * sk2)
        all_sizes = [(sk1, sk1)]
        for aspect_ratio in aspect_ratios[idex]:
            w, h = sk1 * math.sqrt(aspect_ratio), sk1 / math.sqrt(aspect_ratio)
            all_sizes.append((w, h))
            all_sizes.append((h, w))
        all_sizes.append((sk3, sk3))
        assert len(all_sizes) == num_default[idex]
        for i, j in it.product(range(feature_size), repeat=2):
            for w, h in all_sizes:
                cx, cy = (j + 0.5) / fk[idex], (i + 0.5) / fk[idex]
                default_boxes.append([cy, cx, h, w])

    def to_tlbr(cy, cx, h, w):
        return cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2

    default_boxes_tlbr = np.array(tuple(to_tlbr(*i) for i in default_boxes), dtype="float32")
    return np.array(default_boxes, dtype="float32"), default_boxes_tlbr


@pytest.fixture(scope="session")
def tutorial_default_boxes() -> tuple[np.ndarray, np.ndarray]:
    return generate_tutorial_default_boxes()


@pytest.fixture(scope="module")
def one_thread():
    """Per-image transforms run single-threaded (as in DataLoader workers); intra-op threads only add contention
    on small images, badly so on a shared machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- MindSpore

MINDSPORE_HOW = ("set MULTIBOX_MINDSPORE_PYTHON to a Python with mindspore==2.10.0 and numpy<2, or create "
                 ".venv-mindspore in the repository root (see .ci/run)")


def find_mindspore_python(configured: str | None) -> tuple[str | None, str]:
    """(the Python of the MindSpore environment, "") or (None, why there is none). ``configured`` is
    ``MULTIBOX_MINDSPORE_PYTHON``'s value; without one, ``.venv-mindspore/bin/python`` in the repository root, where
    .ci/run creates it. A Python that cannot import mindspore and numpy does not count (.ci/run leaves the
    environment without them when their installation fails)."""
    python = Path(configured) if configured else REPO / ".venv-mindspore" / "bin" / "python"
    where = f"MULTIBOX_MINDSPORE_PYTHON={configured}" if configured else str(python)
    if not (python.is_file() and os.access(python, os.X_OK)):
        return None, f"no MindSpore environment: {where} is not an executable Python; {MINDSPORE_HOW}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, sys; "
                            "sys.exit(u.find_spec('mindspore') is None or u.find_spec('numpy') is None)"],
                           env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return None, f"no MindSpore environment: {where} cannot import mindspore and numpy; {MINDSPORE_HOW}"
    return str(python), ""


@pytest.fixture(scope="session")
def mindspore_python() -> str:
    """The Python of the MindSpore environment (MindSpore needs numpy < 2, so it lives apart from the project's;
    :func:`find_mindspore_python`); skips, saying why, where there is none."""
    python, why_not = find_mindspore_python(os.environ.get("MULTIBOX_MINDSPORE_PYTHON"))
    if python is None:
        pytest.skip(why_not)
    return python


# --------------------------------------------------------------------------------------------- fuzzing

@pytest.fixture(scope="session")
def fuzz_runs() -> dict[str, int]:
    """Inputs that each coverage-guided fuzz target of tests/test_fuzz.py ran in this session, as the fuzzer
    counted them (target name -> runs). tests/test_hostile_inputs.py's table states a count only when it is here."""
    return {}


# --------------------------------------------------------------------------------------------- hygiene

# Where the commands write when no path is given, relative to the working directory: ``multibox train`` its run
# folder (runs/<timestamp>), the demo its data (data/synth), ``multibox bench`` its report (bench.json).
DEFAULT_OUTPUTS = ("runs", "data", "bench.json")


def default_outputs(root: Path) -> set[str]:
    """What the commands' default output locations hold under ``root``: each of DEFAULT_OUTPUTS that exists, and
    each entry of those that are folders (``runs/20260101-120000``)."""
    found = set()
    for name in DEFAULT_OUTPUTS:
        path = root / name
        if path.exists():
            found.add(name)
        if path.is_dir():
            found.update(f"{name}/{child.name}" for child in path.iterdir())
    return found


@pytest.fixture(scope="session")
def _known_default_outputs(pytestconfig) -> dict[Path, set[str]]:
    """The default output locations' contents at the start of the session (a user's own runs stay allowed), in
    the repository and in the directory pytest was started from."""
    return {root: default_outputs(root) for root in {REPO, Path(pytestconfig.invocation_params.dir).resolve()}}


@pytest.fixture(autouse=True)
def _no_writes_to_default_outputs(_known_default_outputs):
    """Fails a test (an error at its teardown) that created something in the default output locations: a command
    run without ``--out`` (or a data root) in a test writes into the repository instead of ``tmp_path``."""
    yield
    new = []
    for root, known in _known_default_outputs.items():
        now = default_outputs(root)
        new += [str(root / entry) for entry in sorted(now - known)]
        known |= now   # each offence is reported once, by the test that made it
    if new:
        pytest.fail(f"this test wrote into the commands' default output locations: {', '.join(new)}; give the "
                    "command an --out (or a data root) under tmp_path", pytrace=False)


@pytest.fixture(scope="session")
def quick_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(annotations.json, best.pt) of :func:`_data_builders.train_quick_tiny`, trained once per session."""
    from _data_builders import train_quick_tiny
    return train_quick_tiny(tmp_path_factory.mktemp("quick-tiny"))
