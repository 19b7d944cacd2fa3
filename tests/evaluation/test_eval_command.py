"""``multibox eval`` end to end (a random tiny network, a few synthetic images): a report for any data evaluation
accepts, results that say what was evaluated and are written beside -- not over -- the checkpoint's own
evaluation, and ``--no-progress``."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from multibox.checkpoint import save_checkpoint
from multibox.cli import main
from multibox.config import load_config
from multibox.data.synth import SYNTH_CLASS_NAMES, generate_synthetic_coco
from multibox.models import build_model

pytestmark = pytest.mark.slow   # a few evaluation passes and reports (about half a minute)

REPORT = {"pr_curves.png", "confusion_matrix.png", "samples.png", "index.html"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcmd")
    ann = generate_synthetic_coco(root / "data", num_images=3, seed=4, max_side=300)
    other = generate_synthetic_coco(root / "other", num_images=2, seed=5, max_side=300)
    cfg = load_config("tiny", ["model.widths=[8, 8, 16, 16, 16, 16, 16, 16]", f"data.path={ann}",
                               f"data.val_path={ann}", "data.num_workers=0", "eval.score_threshold=0.02"])
    cfg.model.num_classes = len(SYNTH_CLASS_NAMES)
    ckpt = root / "run" / "best.pt"
    save_checkpoint({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "epoch": 3,
                     "class_names": ["background", *SYNTH_CLASS_NAMES]}, ckpt)
    return {"root": root, "ann": ann, "other": other, "ckpt": ckpt, "cfg": cfg}


def _eval(ckpt: Path, *extra: str) -> int:
    return main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--no-progress", *extra])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_own_split_eval_json_records_checkpoint_data_thresholds_and_evaluator(setup):
    ckpt = setup["ckpt"]
    assert _eval(ckpt) == 0
    body = json.loads((ckpt.parent / "eval.json").read_text())
    assert body["checkpoint"] == {"path": str(ckpt.resolve()), "sha256": _sha256(ckpt), "epoch": 3}
    data = body["data"]
    assert (data["source"], data["kind"], data["images"]) == (str(setup["ann"].resolve()), "coco", 3)
    e = setup["cfg"].eval
    assert body["thresholds"]["score_threshold"] == 0.02
    assert (body["thresholds"]["nms_threshold"], body["thresholds"]["max_per_class"],
            body["thresholds"]["max_per_image"]) == (e.nms_threshold, e.max_per_class, e.max_per_image)
    assert body["thresholds"]["iou_thresholds"] == pytest.approx([0.5 + 0.05 * k for k in range(10)])
    assert body["thresholds"]["max_detections"] == [1, 10, 100]
    assert body["evaluator"] == "faster"
    assert REPORT <= {p.name for p in ckpt.parent.iterdir()}
    page = (ckpt.parent / "index.html").read_text()
    assert str(ckpt.resolve()) in page and _sha256(ckpt) in page and str(setup["ann"].resolve()) in page


def test_other_data_is_written_beside_not_over(setup, capsys):
    ckpt, folder = setup["ckpt"], setup["ckpt"].parent
    if not (folder / "eval.json").is_file():
        assert _eval(ckpt) == 0
    own = (folder / "eval.json").read_bytes()
    capsys.readouterr()
    assert _eval(ckpt, "--data", str(setup["other"])) == 0
    assert (folder / "eval.json").read_bytes() == own            # the held-out evaluation is untouched
    beside = sorted(p.name for p in folder.glob("eval-annotations-*.json"))
    assert len(beside) == 1, beside
    name = beside[0][:-len(".json")]
    body = json.loads((folder / f"{name}.json").read_text())
    assert (body["data"]["source"], body["data"]["images"]) == (str(setup["other"].resolve()), 2)
    assert REPORT <= {p.name for p in (folder / name).iterdir()}
    assert str(setup["other"].resolve()) in (folder / name / "index.html").read_text()
    assert f"{folder / name}.json" in capsys.readouterr().out
    # The same data named another way is the same evaluation: its files are replaced, no third name appears.
    relative = Path("..") / setup["other"].relative_to(setup["root"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert _eval(Path("best.pt"), "--data", str(relative)) == 0
    assert sorted(p.name for p in folder.glob("eval-*.json")) == beside


def test_another_checkpoint_in_the_folder_does_not_take_its_eval_json(setup):
    ckpt, folder = setup["ckpt"], setup["ckpt"].parent
    if not (folder / "eval.json").is_file():
        assert _eval(ckpt) == 0
    own = (folder / "eval.json").read_bytes()
    second = folder / "epoch_2.pt"
    shutil.copyfile(ckpt, second)
    assert _eval(second) == 0
    assert (folder / "eval.json").read_bytes() == own
    body = json.loads((folder / "eval-epoch_2.json").read_text())
    assert body["checkpoint"]["path"] == str(second.resolve())
    assert REPORT <= {p.name for p in (folder / "eval-epoch_2").iterdir()}


def test_an_out_folder_holding_another_evaluation_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(setup["ckpt"], "--out", str(out)) == 0
    first = (out / "eval.json").read_bytes()
    assert _eval(setup["ckpt"], "--out", str(out)) == 0          # the same evaluation again: replaced
    capsys.readouterr()
    assert _eval(setup["ckpt"], "--out", str(out), "--data", str(setup["other"])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'eval.json'} holds the evaluation of") and err.count("\n") == 1, err
    assert (out / "eval.json").read_bytes() == first


def test_data_that_check_data_only_warns_about_gets_its_report(setup, tmp_path):
    gt = json.loads(setup["other"].read_text())
    gt["annotations"][0]["bbox"] = [10, 10, -5, 20]              # negative width: a warning of check-data
    gt["annotations"][1]["bbox"] = [250, 250, 400, 400]          # reaches out of the image: clipped
    bad = setup["other"].parent / "warned.json"
    bad.write_text(json.dumps(gt))
    assert main(["check-data", str(bad)]) == 0
    out = tmp_path / "out"
    assert _eval(setup["ckpt"], "--data", str(bad), "--out", str(out)) == 0
    assert REPORT <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("flag, progress", [(["--no-progress"], False), ([], True)])
def test_no_progress_reaches_the_evaluation(setup, tmp_path, monkeypatch, flag, progress):
    import multibox.evaluation.evaluate as evaluate

    seen = []
    real = evaluate.evaluate_model

    def spy(*args, **kwargs):
        seen.append(kwargs.get("progress"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    args = ["eval", "--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--out", str(tmp_path), *flag]
    assert main(args) == 0
    assert seen == [progress]
