"""A training run that cannot do what was asked stops before it starts, with one ``error:`` line and status 2:
impossible settings, a device that is not there, a run folder that already holds a run, a resume without
``last.pt``; and it leaves no folder behind (nor does a dry run)."""
from __future__ import annotations

import logging

import pytest
import torch

from multibox.cli import main
from multibox.data.synth import generate_synthetic_coco

TINY = ["model.widths=[8, 8, 16, 16, 16, 16, 16, 16]", "train.batch_size=2", "train.epochs=1",
        "data.num_workers=0", "train.checkpoint_every=0", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    return generate_synthetic_coco(tmp_path_factory.mktemp("guards") / "data", num_images=4, seed=1)


def _train(ann, out, *extra, settings=TINY) -> list[str]:
    args = ["train", "--data", str(ann), "--val-data", str(ann), "--out", str(out), "--no-progress", *extra]
    for item in settings:
        args += ["--set", item]
    return args


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("setting, message", [
    ("train.batch_size=0", "config key 'train.batch_size' = 0 is out of range: it must be >= 1"),
    ("train.epochs=0", "config key 'train.epochs' = 0 is out of range: it must be >= 1"),
    ("train.lr=-1", "config key 'train.lr' = -1.0 is out of range: it must be >= 0"),
    ("data.val_fraction=1.5", "config key 'data.val_fraction' = 1.5 is out of range: it must be >= 0 and < 1"),
    ("eval.nms_threshold=0", "config key 'eval.nms_threshold' = 0.0 is out of range: it must be > 0 and <= 1"),
])
def test_impossible_settings_are_one_line_before_anything_runs(ann, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert main(_train(ann, out, settings=[*TINY, setting])) == 2
    assert _one_error_line(capsys) == f"error: {message}\n"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_there_is_one_line(ann, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(ann, out, settings=[*TINY, "train.device=cuda"])) == 2
    assert _one_error_line(capsys).startswith("error: device 'cuda': no CUDA GPU is available here")
    assert not out.exists()


def test_resolve_device_names_what_is_wrong():
    from multibox.runtime import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="'gpu' is not a device"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match=r"cuda:\d+"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")


def test_a_folder_holding_a_run_is_refused_unless_asked(ann, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"an earlier run's checkpoint")
    assert main(_train(ann, out)) == 2
    err = _one_error_line(capsys)
    assert f"{out} already holds a run (last.pt)" in err and f"--resume {out}" in err and "--exist-ok" in err
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]   # nothing written, nothing replaced
    assert (out / "last.pt").read_bytes() == b"an earlier run's checkpoint"
    assert main(_train(ann, out, "--exist-ok")) == 0
    assert {"config.yaml", "metrics.jsonl", "best.pt", "eval.json"} <= {p.name for p in out.iterdir()}
    assert (out / "last.pt").read_bytes() != b"an earlier run's checkpoint"


def test_resume_without_last_pt_says_why(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in _one_error_line(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {epochs: 1}\n")
    assert main(["train", "--resume", str(run)]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: cannot resume {run}: it has no last.pt (it holds config.yaml)")
    assert "on Ctrl-C" in err


def test_a_dry_run_and_a_failed_run_leave_no_folder(ann, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(_train(ann, out, "--dry-run")) == 0
    assert not out.exists()
    missing = tmp_path / "missing.json"
    failed = tmp_path / "failed"
    assert main(["train", "--data", str(missing), "--out", str(failed), "--no-progress"]) == 2
    assert str(missing) in _one_error_line(capsys)
    assert not failed.exists()


def test_a_run_that_skipped_images_says_so_in_its_exit_status(tmp_path, caplog):
    """One image of six missing: batches of two keep a single image, which the tiny preset's BatchNorm cannot
    train on (a 1 x 1 feature map): that step is skipped rather than the run crashing."""
    ann = generate_synthetic_coco(tmp_path / "data", num_images=6, seed=3)
    (ann.parent / "images" / "synth_000002.jpg").unlink()
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="multibox"):
        assert main(_train(ann, out)) == 3   # done, but not on every image
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 of its 6 images not found" in w for w in warnings)
    assert warnings[-1].startswith("1 unreadable or missing images were skipped while training")
    assert (out / "best.pt").is_file()


def test_one_image_per_step_with_batchnorm_on_a_1x1_map_is_one_line(ann, tmp_path, capsys):
    """tiny's last level (1x1) has BatchNorm: one image per step cannot train it (PyTorch would raise mid-step);
    with train.freeze_bn the running statistics serve and the step runs."""
    out = tmp_path / "run"
    assert main(_train(ann, out, settings=[*TINY, "train.batch_size=1"])) == 2
    err = _one_error_line(capsys)
    assert "needs at least 2 images per step" in err and "train.freeze_bn=true" in err
    assert not out.exists()
    assert main(_train(ann, tmp_path / "frozen", settings=[*TINY, "train.batch_size=1", "train.freeze_bn=true"])) == 0
