"""How long a run trains: `train.epochs: auto` and the `--time` budget (engine/budget.py, engine/fit.py)."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from multibox.cli import main
from multibox.config import ConfigError, load_config
from multibox.data.synth import generate_synthetic_coco
from multibox.engine import budget, fit
from multibox.engine.budget import auto_epochs, fit_epochs_to_budget, parse_minutes
from multibox.engine.schedules import warmup_cosine_lr
from multibox.errors import InputError

TINY = ["model.widths=[8, 8, 8, 8, 8, 8, 8, 8]", "data.num_workers=0", "train.batch_size=2", "train.log_every=1",
        "train.checkpoint_every_minutes=0", "eval.batch_size=4"]


@pytest.mark.parametrize("text, minutes", [("15m", 15), ("90s", 1.5), ("1.5h", 90), ("20", 20), (" 2 min", 2),
                                           (".5m", 0.5)])
def test_durations_are_read_as_minutes(text, minutes):
    assert parse_minutes(text) == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["", "fast", "0m", "-3m", "5 days", "1e3"])
def test_a_duration_that_is_none_is_one_line(text):
    with pytest.raises(InputError, match="--time expects a duration"):
        parse_minutes(text)


def test_auto_epochs_show_about_the_target_images():
    assert auto_epochs(600, 30000, 300) == 50           # 30000 / 600
    assert auto_epochs(7000, 30000, 300) == 5           # ceil(4.29)
    assert auto_epochs(100_000, 30000, 300) == 1        # a large set: at least once
    assert auto_epochs(10, 30000, 300) == 300           # a handful of images: capped


def test_budget_fit_by_hand():
    # 100 steps timed in 20 s (0.2 s/step, batch 8: 0.025 s per image); 30 s of the 600 s budget gone.
    # Evaluation estimate: 200 images x 0.025 s x 0.5 + 20 s = 22.5 s. Left for training: 600 - 30 - 22.5 =
    # 547.5 s; an epoch of 50 steps takes 10 s: 2 epochs done + 54.75 more -> 56 epochs.
    fitted = fit_epochs_to_budget(600, 30, 20, 100, 100, 50, 8, 200, eval_every=0)
    assert fitted.step_seconds == pytest.approx(0.2)
    assert fitted.eval_seconds == pytest.approx(22.5)
    assert fitted.epochs == 56
    # Evaluating every 5 epochs: each epoch also carries a fifth of an evaluation (10 + 4.5 s).
    assert fit_epochs_to_budget(600, 30, 20, 100, 100, 50, 8, 200, eval_every=5).epochs == math.floor(2 + 547.5 / 14.5)


def test_a_budget_shorter_than_the_epoch_in_progress_finishes_that_epoch():
    assert fit_epochs_to_budget(60, 59, 50, 30, 30, 100, 8, 50, eval_every=0).epochs == 1
    assert fit_epochs_to_budget(60, 120, 100, 150, 150, 100, 8, 50, eval_every=0).epochs == 2


def test_epochs_take_auto_or_a_positive_number_and_time_a_positive_one():
    assert load_config("tiny", ["train.epochs=auto"]).train.epochs == "auto"
    assert load_config("tiny", ["train.time=2.5"]).train.time == 2.5
    for bad in ("train.epochs=soon", "train.time=0", "train.time=-1", "train.auto_images=0"):
        with pytest.raises(ConfigError):
            load_config("tiny", [bad])
    # Milestones are epochs of a run of known length: a paper schedule sized by the data is refused, not left with
    # milestones past its end.
    with pytest.raises(ConfigError, match="multistep takes its milestones in epochs"):
        load_config("ssd300-vgg16", ["train.epochs=auto"])
    assert load_config("ssd300-vgg16", ["train.epochs=auto", "train.schedule=warmup_cosine"]).train.epochs == "auto"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synthetic_coco(tmp_path_factory.mktemp("budget") / "data", num_images=8, seed=4, min_side=128, max_side=160)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_auto_epochs_are_settled_from_the_data_and_saved(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--val-data", str(data), "--out", str(out), "--no-progress",
            "--set", "train.epochs=auto", "--set", "train.auto_images=20"]
    assert main(args + [a for item in TINY for a in ("--set", item)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3                                 # ceil(20 / 8 images)
    assert [r["epoch"] for r in _records(out) if r["kind"] == "epoch"] == [1, 2, 3]


def test_a_time_budget_settles_the_epochs_and_the_schedule_ends_on_time(data, tmp_path, monkeypatch):
    # Fitted after the first timed batch; a generous budget for 8 images must then give many epochs, and the LR
    # schedule, rebuilt for them, must reach lr_end at the last step.
    monkeypatch.setattr(fit, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(budget, "EVAL_FIXED_SECONDS", 0.0)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--val-data", str(data), "--out", str(out), "--no-progress",
            "--time", "10s", "--set", "train.epochs=1", "--set", "train.lr_end=1e-5"]
    assert main(args + [a for item in TINY for a in ("--set", item)]) == 0
    records = _records(out)
    fitted = [r for r in records if r["kind"] == "budget"]
    assert len(fitted) == 1 and fitted[0]["minutes"] == pytest.approx(1 / 6)
    epochs = fitted[0]["epochs"]
    assert epochs > 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == epochs and saved["train"]["time"] is None
    assert max(r["epoch"] for r in records if r["kind"] == "epoch") == epochs
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == epochs * 4                                        # 8 images, batch 2
    # The schedule was rebuilt for the settled length: its cosine ends at the last step, not at the configured 1.
    end = warmup_cosine_lr(steps[-1]["step"], epochs * 4, 4, saved["train"]["lr_init"], saved["train"]["lr"], 1e-5)
    assert steps[-1]["lr"] == pytest.approx(end) and end < 1e-4


def test_a_resumed_run_counts_the_epochs_it_had_done_before():
    # Resumed at step 3000 (60 epochs of 50 steps), 100 steps timed since: 60 + 2 + 54.75 epochs, not 2 + 54.75.
    assert fit_epochs_to_budget(600, 30, 20, 100, 3100, 50, 8, 200, eval_every=0).epochs == 116
