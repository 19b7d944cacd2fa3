"""The architecture's rules, checked: one direction of imports between layers (import-linter, the contract in
pyproject.toml), no import cycles (deferred imports included), a Python API that loads no training code, and
checkpoints written before the restructuring still loading and predicting the same."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multibox
from multibox.errors import InputError
from multibox.inference import detector as detector_module

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_checkpoint_v1"
grimp = pytest.importorskip("grimp")


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    """import-linter's command line on ``cwd``'s pyproject.toml, analysing the ``multibox`` found on ``pythonpath``."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_layers_contract_is_kept():
    result = lint_imports(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("importer, line", [
    ("core/boxes.py", "from multibox.models import build_model"),                      # maths -> models
    ("models/ssd.py", "def _late():\n    from multibox.engine.fit import fit\n"),      # deferred, still caught
    ("inference/detector.py", "from multibox.engine import loop"),                      # independent siblings
])
def test_a_wrong_way_import_breaks_the_contract(tmp_path, importer, line):
    shutil.copytree(ROOT / "src" / "multibox", tmp_path / "src" / "multibox",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "src" / "multibox" / importer).open("a") as f:
        f.write("\n" + line + "\n")
    result = lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "0 kept, 1 broken" in result.stdout
    importer_module = "multibox." + importer[:-3].replace("/", ".")
    assert f"{importer_module} ->" in result.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("multibox", cache_dir=None)   # function-level (deferred) imports included
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")]:
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


TRAINING_MODULES = ("multibox.engine", "multibox.core.losses", "multibox.core.matching", "multibox.data.build",
                    "multibox.data.gpu_transforms", "multibox.data.shards", "multibox.evaluation", "multibox.cli",
                    "multibox.bench")
HEAVY_PACKAGES = ("matplotlib", "pyarrow", "pycocotools", "faster_coco_eval")


def test_load_and_predict_import_no_training_code():
    code = (f"import sys, json, multibox\n"
            f"d = multibox.load({str(FIXTURE / 'best.pt')!r}, device='cpu')\n"
            f"d.predict({str(FIXTURE / 'image.png')!r})\n"
            f"print(json.dumps(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "multibox.inference.detector" in modules
    training = [m for m in modules if m.startswith(TRAINING_MODULES)]
    heavy = [m for m in modules if m.split(".")[0] in HEAVY_PACKAGES]
    assert training == [] and heavy == []


def test_public_load_forwards_every_argument():
    def parameters(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    # ``runtime`` picks the runtime of an exported ONNX model; a checkpoint has only PyTorch's.
    assert parameters(multibox.load) == parameters(detector_module.load) + [("runtime", "auto")]
    with pytest.raises(InputError, match="runtime applies to exported ONNX models"):
        multibox.load(FIXTURE / "best.pt", runtime="openvino")
    detector = multibox.load(FIXTURE / "best.pt", device="cpu", precision="bf16", compile=False)
    assert detector.dtype is torch.bfloat16 and detector.cfg.eval.precision == "bf16"


def test_checkpoint_from_before_the_restructuring_predicts_the_same():
    """Written at commit 0b136a8 (see fixtures/tiny_checkpoint_v1/README.md): same detections today. Compared one
    to one with tolerances for another torch's rounding; detections within 1e-4 of the score threshold may differ."""
    expected = {k: torch.tensor(v) for k, v in json.loads((FIXTURE / "expected.json").read_text()).items()}
    detector = multibox.load(FIXTURE / "best.pt", device="cpu")
    got = detector.predict(FIXTURE / "image.png")[0]
    assert len(expected["scores"]) == 100
    threshold = detector.postprocess.score_threshold
    firm_expected = expected["scores"] > threshold + 1e-4
    firm_got = got["scores"] > threshold + 1e-4
    assert int(firm_expected.sum()) == int(firm_got.sum())
    for box, score, label in zip(expected["boxes"][firm_expected], expected["scores"][firm_expected],
                                 expected["labels"][firm_expected]):
        same = ((got["labels"] == label) & ((got["scores"] - score).abs() < 1e-4)
                & ((got["boxes"] - box).abs().amax(dim=1) < 1e-2))
        assert bool(same.any()), (box, score, label)
