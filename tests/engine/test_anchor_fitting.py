"""anchors.fit and the default-box analysis: the auto rule on COCO-like and long-thin statistics, the analysis
against torchvision's box_iou, and a run whose fitted boxes reach its config, checkpoint, predictions, export and
report, with `multibox anchors` on the same data."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torchvision.ops import box_iou

from multibox.config import ConfigError, load_config
from multibox.core.anchors import anchor_spec, default_boxes_cxcywh
from multibox.core.boxes import cxcywh_to_xyxy, xyxy_to_ltwh
from multibox.data.anchor_fitting import AUTO_FIT_MIN_RECALL, fit_anchors
from multibox.data.objects import ObjectTable
from multibox.evaluation import anchors as analysis_module
from multibox.evaluation.anchors import analyse_anchors, match_objects

from _data_builders import QUICK_TINY_TRAIN


def _table(boxes_cxcywh: torch.Tensor, image_size=(640, 480), per_image: int = 1) -> ObjectTable:
    n = len(boxes_cxcywh)
    image = torch.arange(n) // per_image
    scale = torch.tensor([image_size[0], image_size[1]] * 2, dtype=torch.float64)
    ltwh = xyxy_to_ltwh(cxcywh_to_xyxy(boxes_cxcywh.double()) * scale)
    return ObjectTable(boxes_cxcywh.double(), ltwh, image, torch.arange(n) + 1, torch.ones(n, dtype=torch.long),
                       ltwh[:, 2] * ltwh[:, 3], {int(i): f"img{int(i)}.jpg" for i in image.unique()})


def _coco_like(n: int, seed: int = 0) -> torch.Tensor:
    """Objects with COCO's statistics in 640x480 images: sqrt(area) log-normal with 41 % below 32 px and 24 %
    above 96 px (COCO's small / medium / large shares), aspect ratio log-normal (σ = 0.7)."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(math.log(42) + 1.22 * torch.randn(n, generator=g, dtype=torch.float64))
    aspect = torch.exp(0.7 * torch.randn(n, generator=g, dtype=torch.float64))
    w, h = (side * aspect.sqrt()).clamp(max=640), (side / aspect.sqrt()).clamp(max=480)
    cx = w / 2 + torch.rand(n, generator=g, dtype=torch.float64) * (640 - w)
    cy = h / 2 + torch.rand(n, generator=g, dtype=torch.float64) * (480 - h)
    return torch.stack((cx / 640, cy / 480, w / 640, h / 480), 1)


def _long_thin(n: int, seed: int = 0) -> torch.Tensor:
    """Half the objects 1:5-1:10 or 5:1-10:1 (long side 0.2-0.7 of the image), half COCO-like."""
    g = torch.Generator().manual_seed(seed)
    long_side = torch.empty(n // 2, dtype=torch.float64).uniform_(0.2, 0.7, generator=g)
    ratio = torch.empty(n // 2, dtype=torch.float64).uniform_(5, 10, generator=g)
    wide = torch.rand(n // 2, generator=g) < 0.5
    wh = torch.where(wide[:, None], torch.stack((long_side, long_side / ratio), 1),
                     torch.stack((long_side / ratio, long_side), 1))
    thin = torch.cat((0.15 + 0.7 * torch.rand(n // 2, 2, generator=g, dtype=torch.float64), wh), 1)
    return torch.cat((thin, _coco_like(n - n // 2, seed + 1)))


def test_coco_statistics_sanity():
    side = (_coco_like(20000)[:, 2:].prod(1) * 640 * 480).sqrt()
    assert abs(float((side < 32).double().mean()) - 0.41) < 0.02
    assert abs(float((side > 96).double().mean()) - 0.24) < 0.02


@pytest.mark.parametrize("preset", ["ssd300-vgg16", "ssd512-vgg16", "ssdlite320-mobilenet-v3"])
def test_auto_keeps_the_paper_boxes_on_coco_like_data_and_fits_long_thin_objects(preset):
    cfg = load_config(preset)
    coco = fit_anchors(cfg, _table(_coco_like(3000)))
    assert not coco.fitted, coco.reason
    assert coco.matchable_recall > AUTO_FIT_MIN_RECALL + 0.05   # not a close call
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    assert coco.sizes == [[list(wh) for wh in spec.location_sizes(k)] for k in range(len(spec.feature_sizes))]
    thin = fit_anchors(cfg, _table(_long_thin(3000)))
    assert thin.fitted, thin.reason
    assert thin.matchable_recall < AUTO_FIT_MIN_RECALL
    assert thin.after.recall > thin.before.recall + 0.1 and thin.after.mean_iou > thin.before.mean_iou


def test_thin_objects_smaller_than_every_box_are_fitted():
    # 1:10 objects, long side 0.12-0.2 at 300x300: each smaller in area than the paper's smallest box, and no box
    # of the paper's reaches IoU 0.5 with one, though a box of their own shape could on the 38x38 grid
    g = torch.Generator().manual_seed(8)
    long_side = torch.empty(2000, dtype=torch.float64).uniform_(0.12, 0.2, generator=g)
    gt = torch.cat((0.1 + 0.8 * torch.rand(2000, 2, generator=g, dtype=torch.float64),
                    torch.stack((long_side, long_side / 10), 1)), 1)
    result = fit_anchors(load_config("ssd300-vgg16"), _table(gt))
    assert result.before.recall == 0.0 and result.matchable_recall == 0.0
    assert result.fitted and result.after.recall > 0.4


def test_fit_modes():
    table = _table(_long_thin(3000))
    assert not fit_anchors(load_config("tiny", ["anchors.fit=false"]), table).fitted
    square = _table(_coco_like(3000))
    forced = fit_anchors(load_config("tiny", ["anchors.fit=true"]), square)
    assert forced.fitted and forced.after.value >= forced.before.value
    zoo = load_config("ssd300-mobilenet-v2")       # explicit sizes (the zoo's layout): auto keeps them
    kept = fit_anchors(zoo, table)
    assert not kept.fitted and "sizes" in kept.reason
    tuned = fit_anchors(load_config("tiny"), table, fine_tuning=True)   # a detector's box head regresses from them
    assert not tuned.fitted and "fine-tuning" in tuned.reason
    assert fit_anchors(load_config("tiny"), table).fitted
    assert load_config("ssd300-vgg16-seed").anchors.fit is False      # the tutorial's boxes, as it trains them
    with pytest.raises(ConfigError, match="anchors.fit"):
        load_config("tiny", ["anchors.fit=maybe"])


def test_fit_boxes_sets_the_boxes_per_location():
    from multibox.models import build_model

    table = _table(_long_thin(1000))
    stock = fit_anchors(load_config("tiny", ["anchors.fit=true"]), table)
    cfg = load_config("tiny", ["anchors.fit_boxes=8"])             # auto, told otherwise: fits 8 per location
    wide = fit_anchors(cfg, table)
    assert wide.fitted and "fit_boxes" in wide.reason and [len(level) for level in wide.sizes] == [8] * 6
    assert wide.after.recall > stock.after.recall                   # more shapes reach more long thin objects
    coco = fit_anchors(cfg, _table(_coco_like(1000)))                # auto would keep these; fit_boxes fits
    assert coco.fitted and [len(level) for level in coco.sizes] == [8] * 6
    cfg.anchors.sizes = wide.sizes
    model = build_model(cfg).eval()
    loc, _ = model(torch.zeros(1, 3, 300, 300))
    assert loc.shape[1] == model.anchors_cxcywh.shape[0] == 8 * (38 * 38 + 19 * 19 + 10 * 10 + 5 * 5 + 3 * 3 + 1)
    fewer = fit_anchors(load_config("tiny", ["anchors.fit_boxes=2"]), table)
    assert [len(level) for level in fewer.sizes] == [2] * 6
    with pytest.raises(ConfigError, match="cannot fine-tune"):
        fit_anchors(load_config("tiny", ["anchors.fit_boxes=8"]), table, fine_tuning=True)
    with pytest.raises(ConfigError, match="anchors.fit_boxes"):
        load_config("tiny", ["anchors.fit=false", "anchors.fit_boxes=8"])
    with pytest.raises(ConfigError, match="anchors.fit_boxes"):
        load_config("tiny", ["anchors.fit_boxes=0"])


def test_analysis_against_torchvision_box_iou():
    # One object per image, so no object competes for a default box: under the tutorial's rule an object's
    # positives are the boxes with IoU > 0.5, or its one forced best box when there is none.
    cfg = load_config("tiny")
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    gt = _long_thin(400, seed=7)
    analysis = analyse_anchors(_table(gt), cfg)
    iou = box_iou(cxcywh_to_xyxy(gt), cxcywh_to_xyxy(default_boxes_cxcywh(spec, torch.float64)))
    best = iou.max(dim=1).values
    positives = (iou > 0.5).sum(dim=1).clamp(min=1)
    s = analysis.report["summary"]
    assert s["objects"] == 400 and s["images"] == 400
    assert s["recall"] == pytest.approx(float((best > 0.5).double().mean()), abs=1e-9)
    assert s["mean_best_iou"] == pytest.approx(float(best.mean()), abs=1e-6)
    assert s["mean_positives"] == pytest.approx(float(positives.double().mean()), abs=1e-9)
    assert torch.equal(analysis.matched, best > 0.5)
    assert analysis.report["unmatched"]["count"] == int((best <= 0.5).sum())
    worst = analysis.report["unmatched"]["listed"][0]
    assert worst["best_iou"] == pytest.approx(float(best.min()), abs=1e-4)
    # size buckets by area in image pixels, aspect buckets by w/h at network scale
    area = gt[:, 2] * gt[:, 3] * 640 * 480
    by_size = {r["size"]: r["objects"] for r in analysis.report["by_size"]}
    assert by_size["small"] == int((area < 32 ** 2).sum()) and by_size["large"] == int((area >= 96 ** 2).sum())
    aspect = gt[:, 2] / gt[:, 3]
    by_aspect = {r["aspect"]: r for r in analysis.report["by_aspect"]}
    assert by_aspect["<1:4"]["objects"] == int((aspect < 0.25).sum())
    assert by_aspect[">=4:1"]["objects"] == int((aspect >= 4).sum())
    assert by_aspect[">=4:1"]["recall"] == pytest.approx(float((best[aspect >= 4] > 0.5).double().mean()))


def test_positives_with_objects_competing():
    # Two identical objects in one image. The tutorial's rule: both force the same best box, every box goes to
    # the earlier object on ties, the second gets none. torchvision's: the later object takes the shared best box.
    cfg = load_config("tiny")
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    box = torch.tensor([[0.5, 0.5, 0.3, 0.3]], dtype=torch.float64)
    above = int((box_iou(cxcywh_to_xyxy(box), cxcywh_to_xyxy(default_boxes_cxcywh(spec, torch.float64))) > 0.5)
                .sum())
    table = _table(torch.cat((box, box)), per_image=2)
    assert match_objects(table, spec, 0.5, "tutorial").positives.tolist() == [above, 0]
    assert match_objects(table, spec, 0.5, "torchvision").positives.tolist() == [above - 1, 1]
    assert analyse_anchors(table, cfg).report["summary"]["no_positive"] == 0.5


def test_matching_in_chunks_equals_matching_at_once(monkeypatch):
    cfg = load_config("tiny")
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    gt = _long_thin(120, seed=9)
    counts = [1, 5, 2, 9, 3] * 4 + [0]
    image = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[:120]
    table = _table(gt)
    table = ObjectTable(table.boxes_cxcywh, table.bbox_ltwh, image, table.ann_id, table.labels, table.area_px,
                        {int(i): f"img{int(i)}.jpg" for i in image.unique()})
    whole = match_objects(table, spec, 0.5, "tutorial")
    monkeypatch.setattr(analysis_module, "_MATCH_CHUNK", 3 * 9 * 8732)   # 2-3 images per chunk
    chunked = match_objects(table, spec, 0.5, "tutorial")
    for a, b in ((whole.best_iou, chunked.best_iou), (whole.level, chunked.level),
                 (whole.positives, chunked.positives)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """A one-epoch run on long thin objects (auto fits them), and its data."""
    from multibox.cli import main

    root = tmp_path_factory.mktemp("fitted-run")
    ann = root / "data" / "annotations.json"
    assert main(["synth", "--out", str(ann.parent), "--num-images", "16", "--seed", "3", "--classes", "2",
                 "--objects", "2-3", "--sizes", "0.4-0.8", "--aspect", "0.12-8", "--log-aspect",
                 "--side", "160-200"]) == 0
    args = ["train", "--data", str(ann), "--out", str(root / "run"), "--no-progress"]
    for item in QUICK_TINY_TRAIN:
        args += ["--set", item]
    assert main(args + ["--set", "train.epochs=1"]) == 0
    return ann, root / "run"


def test_a_run_carries_its_fitted_boxes_everywhere(fitted_run, tmp_path):
    import multibox
    from multibox.checkpoint import load_checkpoint
    from multibox.config import Config

    ann, run = fitted_run
    record = json.loads((run / "anchors.json").read_text())
    assert record["fitted"] and record["after"]["summary"]["recall"] > record["before"]["summary"]["recall"]
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.anchors.sizes == record["sizes"]
    payload = load_checkpoint(run / "best.pt")
    assert Config.from_dict(payload["config"]).anchors.sizes == record["sizes"]
    expected = default_boxes_cxcywh(anchor_spec(cfg.anchors, cfg.model.image_size))
    stock = default_boxes_cxcywh(anchor_spec(load_config("tiny").anchors, 300))
    assert not torch.allclose(expected, stock)
    detector = multibox.load(run / "best.pt", device="cpu")
    torch.testing.assert_close(detector.model.anchors_cxcywh, expected)
    # the run's report shows the analysis
    page = (run / "index.html").read_text()
    assert "Default boxes" in page and "anchors.png" in page and (run / "anchors.png").stat().st_size > 1000


def test_export_uses_the_fitted_boxes(fitted_run, tmp_path):
    import multibox
    from multibox.cli import main
    from multibox.data.coco import read_image_rgb

    ann, run = fitted_run
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(out), "--exporter", "torchscript"]) == 0
    images = [read_image_rgb(p) for p in sorted((ann.parent / "images").glob("*.jpg"))[:3]]
    torch_det = multibox.load(run / "best.pt", device="cpu")
    onnx_det = multibox.load(out, runtime="onnxruntime")
    ours = torch_det.predict(images, score=0.05)
    exported = onnx_det.predict(images, score=0.05)
    assert sum(len(d["boxes"]) for d in ours) > 0
    for a, b in zip(ours, exported):
        torch.testing.assert_close(b["boxes"], a["boxes"], atol=0.05, rtol=0)
    # the raw export carries the fitted default boxes themselves
    import onnxruntime

    raw = tmp_path / "raw.onnx"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(raw), "--exporter", "torchscript",
                 "--no-postprocess"]) == 0
    session = onnxruntime.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: _network_input(session)})))
    cfg = load_config(str(run / "config.yaml"))
    fitted = default_boxes_cxcywh(anchor_spec(cfg.anchors, cfg.model.image_size))
    torch.testing.assert_close(torch.from_numpy(outputs["anchors_cxcywh"]).reshape(-1, 4), fitted)


def _network_input(session):
    """A zero batch of one image in the shape and dtype the graph takes."""
    import numpy as np

    spec = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in spec.shape]
    return np.zeros(shape, np.uint8 if "uint8" in spec.type else np.float32)


def test_anchors_command(fitted_run, tmp_path, capsys):
    from multibox.cli import main

    ann, _ = fitted_run
    out = tmp_path / "report"
    assert main(["anchors", str(ann), "--fit", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reach IoU 0.5" in text
    assert "anchors.sizes=" in text and "aspect w:h" in text
    record = json.loads((out / "anchors.json").read_text())
    assert record["after"]["summary"]["recall"] >= record["before"]["summary"]["recall"]
    assert (out / "anchors.png").stat().st_size > 1000 and "Default boxes" in (out / "index.html").read_text()
    sizes = text.split("anchors.sizes=")[1].split("\n")[0]
    refit = load_config("tiny", [f"anchors.sizes={sizes}"])
    assert [len(level) for level in refit.anchors.sizes] == [4, 6, 6, 6, 4, 4]
    # a checkpoint's own boxes: the fitted ones its run recorded (the run analysed its training split only)
    _, run = fitted_run
    assert main(["anchors", str(ann), "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    own = json.loads((tmp_path / "ckpt" / "anchors.json").read_text())["before"]
    ran = json.loads((run / "anchors.json").read_text())["after"]
    assert own["boxes"] == ran["boxes"] and own["summary"]["recall"] > record["before"]["summary"]["recall"]


def test_resume_does_not_fit_and_a_dry_run_builds_the_fitted_model(fitted_run, monkeypatch, tmp_path, capsys):
    from multibox.cli import main
    from multibox.engine import fit as fit_module

    ann, run = fitted_run
    args = ["train", "--data", str(ann), "--out", str(tmp_path / "dry"), "--dry-run"]
    for item in QUICK_TINY_TRAIN:
        args += ["--set", item]
    capsys.readouterr()
    assert main(args + ["--set", "anchors.fit_boxes=8"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["default_boxes"] == 8 * (38 ** 2 + 19 ** 2 + 10 ** 2 + 5 ** 2 + 3 ** 2 + 1)   # 8 per location
    assert not (tmp_path / "dry").exists()
    calls = []
    monkeypatch.setattr(fit_module, "fit_run_anchors", lambda *a, **k: calls.append(a))
    sizes = load_config(str(run / "config.yaml")).anchors.sizes
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert calls == []
    assert load_config(str(run / "config.yaml")).anchors.sizes == sizes
