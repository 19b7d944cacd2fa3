"""A finished training run's folder holds what ``multibox eval`` writes for ``best.pt``: eval.json saying what was
evaluated (the checkpoint, the data, the thresholds, the evaluator) and the report beside it -- also when the run
was resumed after its best evaluation."""
from __future__ import annotations

import json

import pytest

from multibox.cli import main
from multibox.data.synth import generate_synthetic_coco

pytestmark = pytest.mark.slow   # two short training runs

TINY = ["model.widths=[8, 8, 16, 16, 16, 16, 16, 16]", "train.batch_size=2", "train.epochs=2", "train.eval_every=1",
        "data.num_workers=0", "train.checkpoint_every=0", "eval.batch_size=4", "eval.score_threshold=0.03"]
REPORT = {"pr_curves.png", "confusion_matrix.png", "samples.png", "index.html", "eval.json", "curves.png"}


def _train(ann, out) -> list[str]:
    args = ["train", "--data", str(ann), "--val-data", str(ann), "--out", str(out), "--no-progress"]
    for item in TINY:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    ann = generate_synthetic_coco(root / "data", num_images=4, seed=2, max_side=300)
    out = root / "run"
    assert main(_train(ann, out)) == 0
    return ann, out


def test_run_folder_holds_the_report_of_best_pt(run):
    ann, out = run
    assert REPORT <= {p.name for p in out.iterdir()}
    body = json.loads((out / "eval.json").read_text())
    epoch = body["checkpoint"]["epoch"]
    assert epoch in (1, 2)
    assert body["checkpoint"] == {"path": "best.pt", "epoch": epoch}
    best_ap = max(r["AP"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "eval")
    assert body["AP"] == best_ap                                    # the best of the evaluations
    assert (body["data"]["source"], body["data"]["images"]) == (str(ann.resolve()), 4)
    assert body["thresholds"]["score_threshold"] == 0.03 and body["evaluator"] == "faster"
    page = (out / "index.html").read_text()
    assert "best.pt on annotations.json" in page and str(ann.resolve()) in page
    assert f"<th>epoch</th><td>{epoch}</td>" in page and "<th>images</th><td>4</td>" in page


def test_eval_of_best_pt_on_its_own_split_keeps_the_same_record(run):
    _, out = run
    trained = json.loads((out / "eval.json").read_text())
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--device", "cpu", "--no-progress"]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["AP"] == pytest.approx(trained["AP"], abs=1e-6)
    assert again["data"] == trained["data"]
    assert again["checkpoint"]["path"] == str((out / "best.pt").resolve()) and again["checkpoint"]["epoch"] == \
        trained["checkpoint"]["epoch"]


def test_a_resumed_run_whose_best_came_before_writes_the_report_too(run):
    _, out = run
    for name in ("pr_curves.png", "confusion_matrix.png", "samples.png", "index.html"):
        (out / name).unlink()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0   # every epoch done: best.pt evaluated again
    assert REPORT <= {p.name for p in out.iterdir()}
