"""Fine-tuning a detector onto the user's classes (``multibox train --weights NAME|FILE``; multibox.interop.pretrained,
SPEC §4): backbone and box head kept, the class rows of matching names kept, the others fresh.

References: a torchvision ``ssd300_vgg16`` with random weights, saved as the cached ``ssd300_vgg16_coco`` file (its
raw head outputs through its own backbone and head), torchvision's COCO category list (person = 1, car = 3), and
multibox checkpoints written by real training runs. No network: a temporary TORCH_HOME, the downloader replaced by
one that fails.
"""
from __future__ import annotations

import json
import logging
import urllib.error

import pytest
import torch
from torchvision.models.detection import ssd300_vgg16

from _data_builders import make_clean_coco
from multibox.checkpoint import load_checkpoint
from multibox.cli import main
from multibox.config import load_config
from multibox.data.build import build_splits
from multibox.distributed import DistEnv
from multibox.engine.fit import _build_model
from multibox.interop.pretrained import load_detector_weights
from multibox.interop.torchvision import torchvision_ssd300_pairs
from multibox.models import build_model
from multibox.models.published import plan_initial_weights
from multibox.models.weights import WeightMappingError

COCO_FILE = "ssd300_vgg16_coco-b556d3b4.pth"
CPU = torch.device("cpu")
TINY = ["model.widths=[8, 8, 16, 16, 16, 16, 16, 16]", "train.batch_size=2", "train.epochs=1", "data.num_workers=0",
        "train.checkpoint_every=0", "eval.batch_size=4", "train.threads=1"]


def _coco(root, names: dict[int, str], num_images: int = 4):
    """make_clean_coco's set (category ids 17, 3, 44) with the categories renamed."""
    ann = make_clean_coco(root, num_images=num_images)
    body = json.loads(ann.read_text())
    body["categories"] = [dict(c, name=names[c["id"]]) for c in body["categories"]]
    ann.write_text(json.dumps(body))
    return ann


@pytest.fixture(scope="module")
def coco_detector(tmp_path_factory):
    """A random torchvision ssd300_vgg16 (91 COCO slots) saved as torch hub's cached ssd300_vgg16_coco file, and a
    3-class set: two COCO names (person, car) and a new one (widget)."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    tv = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    checkpoints = root / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(tv.state_dict(), checkpoints / COCO_FILE)
    ann = _coco(root / "data", {17: "person", 3: "car", 44: "widget"}, num_images=2)
    return {"tv": tv, "torch_home": root / "torch", "ann": ann, "root": root}


@pytest.fixture
def offline(monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def _rows(tensor: torch.Tensor, classes: int) -> torch.Tensor:
    """A class conv's (k·classes, ...) weight or bias as (k, classes, ...): anchor-major rows."""
    return tensor.detach().reshape(-1, classes, *tensor.shape[1:])


@torch.no_grad()
def test_coco_detector_fine_tuned_onto_three_classes(coco_detector, monkeypatch, offline, caplog):
    """Built by fit's own _build_model from the cached file: box head and backbone are torchvision's, the background,
    person and car rows of every level's class conv are torchvision's rows 0, 1, 3 (anchor by anchor), widget's
    are the fresh initialisation; the raw outputs for those classes equal torchvision's logits."""
    monkeypatch.setenv("TORCH_HOME", str(coco_detector["torch_home"]))
    tv = coco_detector["tv"]
    ann = coco_detector["ann"]
    cfg = load_config("ssd300-vgg16", [f"data.path={ann}", f"data.val_path={ann}", "data.num_workers=0",
                                       "model.weights=ssd300_vgg16_coco"])
    initial = plan_initial_weights(cfg)
    assert initial.detector == coco_detector["torch_home"] / "hub" / "checkpoints" / COCO_FILE
    splits = build_splits(cfg)
    names = splits.class_names
    assert sorted(names) == ["background", "car", "person", "widget"]
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="multibox.train"):
        model = _build_model(cfg, splits, CPU, DistEnv(), initial).eval()
    torch.manual_seed(7)
    fresh = build_model(cfg)          # the same initialisation, no weights loaded
    coco_row = {"background": 0, "person": 1, "car": 3}
    assert tv.state_dict()["head.classification_head.module_list.0.weight"].shape[0] == 4 * 91

    ours, theirs = model.state_dict(), tv.state_dict()
    for mine, tvs in torchvision_ssd300_pairs():
        if mine.startswith("cls_heads."):
            got, ref, init = _rows(ours[mine], 4), _rows(theirs[tvs], 91), _rows(fresh.state_dict()[mine], 4)
            for label, name in enumerate(names):
                expected = ref[:, coco_row[name]] if name in coco_row else init[:, label]
                assert torch.equal(got[:, label], expected), (mine, name)
        else:   # backbone, L2Norm scale, extras and the box (loc) head: torchvision's
            assert torch.equal(ours[mine], theirs[tvs]), mine
    widget = names.index("widget")
    assert not any(torch.equal(_rows(ours["cls_heads.0.weight"], 4)[:, widget],
                               _rows(theirs["head.classification_head.module_list.0.weight"], 91)[:, c])
                   for c in range(91))
    assert not model.backbone.blocks[0][0].weight.requires_grad and model.backbone.blocks[1][0].weight.requires_grad
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning from")]
    kept = ", ".join(n for n in names if n in ("person", "car"))
    assert len(line) == 1 and f"kept for 2 classes ({kept})" in line[0] and "1 new, initialised fresh (widget)" \
        in line[0]

    x = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(3)) * 60
    ref = tv.head(list(tv.backbone(x).values()))
    loc, cls = model(x)
    tv_cls = ref["cls_logits"]
    for label, name in enumerate(names):
        if name in coco_row:
            a, b = cls[..., label], tv_cls[..., coco_row[name]]
            assert float((a - b).abs().max() / b.abs().max()) < 1e-4, name
    assert float((loc - ref["bbox_regression"]).abs().max() / ref["bbox_regression"].abs().max()) < 1e-4


@pytest.mark.slow
def test_train_with_lr_zero_moves_nothing_and_resumes_without_the_file(coco_detector, monkeypatch, offline, tmp_path):
    """``multibox train --config ssd300-vgg16 --weights ssd300_vgg16_coco --set train.lr=0``: one real epoch (SGD,
    warm-up, weight decay) leaves every parameter where fine-tuning started (torchvision's values in the kept
    places); config.yaml names the weights; a resume with the cache emptied needs no file."""
    monkeypatch.setenv("TORCH_HOME", str(coco_detector["torch_home"]))
    ann, out = coco_detector["ann"], tmp_path / "run"
    settings = [f"--val-data={ann}", "--set", "train.lr=0", "--set", "train.epochs=1", "--set", "train.batch_size=1",
                "--set", "data.num_workers=0", "--set", "train.threads=1", "--set", "train.warmup_epochs=1",
                "--set", "eval.batch_size=2", "--set", "train.checkpoint_every=0"]
    args = ["train", "--config", "ssd300-vgg16", "--data", str(ann), "--out", str(out), "--no-progress",
            "--weights", "ssd300_vgg16_coco", *settings]
    assert main(args) == 0
    state = load_checkpoint(out / "last.pt")
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.model.weights == "ssd300_vgg16_coco"
    torch.manual_seed(cfg.train.seed)    # what fit does before building: the same fresh rows
    splits = build_splits(cfg)
    start = _build_model(cfg, splits, CPU, DistEnv(), plan_initial_weights(cfg)).state_dict()
    assert state["model"].keys() == start.keys()
    for name, value in start.items():
        assert torch.equal(state["model"][name], value), name
    tv = coco_detector["tv"].state_dict()
    assert torch.equal(state["model"]["loc_heads.3.bias"], tv["head.regression_head.module_list.3.bias"])

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert main(["train", "--resume", str(out), "--no-progress", "--set", "train.epochs=2"]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def _tiny_run(ann, out, *extra) -> list[str]:
    args = ["train", "--data", str(ann), "--val-data", str(ann), "--out", str(out), "--no-progress", *extra]
    for item in TINY:
        args += ["--set", item]
    return args


def test_checkpoint_fine_tuned_onto_another_class_set_keeps_matching_rows(tmp_path, offline):
    """A tiny run on (dog, car, bottle), then a run on (dog, zebra, car) from its checkpoint with train.lr=0: the
    new run's weights are the checkpoint's, its dog and car rows the checkpoint's dog and car rows (at other
    labels), zebra's fresh. Its resume needs the checkpoint no more."""
    first = _coco(tmp_path / "a", {17: "dog", 3: "car", 44: "bottle"})
    second = _coco(tmp_path / "b", {17: "dog", 3: "zebra", 44: "car"})
    assert main(_tiny_run(first, tmp_path / "run_a")) == 0
    source = load_checkpoint(tmp_path / "run_a" / "last.pt")
    weights = tmp_path / "source.pt"
    (tmp_path / "run_a" / "last.pt").rename(weights)
    assert main(_tiny_run(second, tmp_path / "run_b", "--weights", str(weights), "--set", "train.lr=0")) == 0
    tuned = load_checkpoint(tmp_path / "run_b" / "last.pt")
    src_names, names = source["class_names"], tuned["class_names"]
    assert set(src_names) == {"background", "dog", "car", "bottle"} and set(names) == {"background", "dog", "zebra",
                                                                                      "car"}
    assert src_names.index("car") != names.index("car")   # the rows move to other labels
    cfg = load_config(str(tmp_path / "run_b" / "config.yaml"))
    torch.manual_seed(cfg.train.seed)   # fit's seed before it builds the model: zebra's fresh rows
    fresh = build_model(cfg).state_dict()
    for name, value in source["model"].items():
        if name.startswith("cls_heads."):   # the tiny preset's conv heads: every cls_heads tensor has class rows
            got, ref, init = _rows(tuned["model"][name], 4), _rows(value, 4), _rows(fresh[name], 4)
            for label, cls in enumerate(names):
                expected = ref[:, src_names.index(cls)] if cls in src_names else init[:, label]
                assert torch.equal(got[:, label], expected), (name, cls)
        elif "running_" not in name and "num_batches_tracked" not in name:   # BN statistics move with lr 0 too
            assert torch.equal(tuned["model"][name], value), name
    weights.unlink()
    assert main(["train", "--resume", str(tmp_path / "run_b"), "--no-progress", "--set", "train.epochs=2"]) == 0


def test_another_arch_or_layout_is_one_clear_error(tmp_path, offline, capsys):
    """A tiny checkpoint given to ssd300-vgg16: one line naming both archs; a tiny checkpoint of other widths: the
    tensors that differ."""
    ann = _coco(tmp_path / "a", {17: "dog", 3: "car", 44: "bottle"})
    assert main(_tiny_run(ann, tmp_path / "run")) == 0
    ckpt = tmp_path / "run" / "last.pt"
    cfg = load_config("ssd300-vgg16", ["model.num_classes=3"])
    with pytest.raises(WeightMappingError, match="a checkpoint of model.arch tiny, and this run builds ssd300_vgg16"):
        load_detector_weights(build_model(cfg), cfg, ckpt, ["background", "dog", "car", "bottle"])
    wide = load_config("tiny", ["model.num_classes=3", "model.widths=[8, 8, 16, 16, 16, 16, 16, 32]"])
    with pytest.raises(WeightMappingError, match=r"does not fit this model .* tensors differ: "
                       r"backbone\.levels\.5\.0\.weight \(16, 16, 3, 3\) -> \(32, 16, 3, 3\)"):
        load_detector_weights(build_model(wide), wide, ckpt, ["background", "dog", "car", "bottle"])
    capsys.readouterr()
    args = ["train", "--config", "ssd300-vgg16", "--data", str(ann), "--val-data", str(ann), "--weights", str(ckpt),
            "--out", str(tmp_path / "run2"), "--no-progress", "--set", "data.num_workers=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --weights {ckpt}: a checkpoint of model.arch tiny") and err.count("\n") == 1
    assert not (tmp_path / "run2").exists()


def test_torchvision_file_fits_ssd300_only(coco_detector, tmp_path):
    path = coco_detector["torch_home"] / "hub" / "checkpoints" / COCO_FILE
    cfg = load_config("ssd512-vgg16", ["model.num_classes=3"])
    with torch.device("meta"):
        model = build_model(cfg)
    with pytest.raises(WeightMappingError, match=r"weights of model.arch ssd300_vgg16 \(--config ssd300-vgg16\), and "
                                                 "this run builds ssd512_vgg16"):
        load_detector_weights(model, cfg, path, ["background", "a", "b", "c"])


def test_imported_checkpoint_predicts_without_any_weights_file(coco_detector, tmp_path, monkeypatch, offline):
    """``multibox import-weights --from torchvision`` writes an ssd300-vgg16 checkpoint (whose config names
    vgg16_features): loading and predicting it reads no backbone file (the cache here is empty)."""
    import multibox

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    src = coco_detector["torch_home"] / "hub" / "checkpoints" / COCO_FILE
    assert main(["import-weights", "--from", "torchvision", str(src), "--out", str(tmp_path / "ckpt.pt")]) == 0
    detector = multibox.load(tmp_path / "ckpt.pt", device="cpu")
    assert detector.cfg.model.backbone_weights == "vgg16_features"
    result = detector.predict(torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8))[0]
    assert result["boxes"].shape[1] == 4 and len(result["scores"]) == len(result["labels"])
