"""Work survives interruption: a signal becomes a stop request honoured after the batch in progress (with a saved
``last.pt``), and inside an epoch ``last.pt`` is written every ``train.checkpoint_every_minutes``.
(The exact resume after SIGINT / SIGTERM of a real process: tests/engine/test_resume.py.)"""
from __future__ import annotations

import signal

import pytest
import torch

from multibox.config import load_config
from multibox.data.synth import generate_synthetic_coco
from multibox.engine import fit as fit_module
from multibox.engine import loop
from multibox.engine.interrupt import StopRequest, TrainingInterrupted

# 8 images, batch 2, no held-out split: 4 steps per epoch.
SETTINGS = ["model.widths=[8, 8, 16, 16, 16, 16, 16, 16]", "train.batch_size=2", "train.epochs=2",
            "data.num_workers=0", "train.checkpoint_every=0", "train.checkpoint_every_steps=0", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    return generate_synthetic_coco(tmp_path_factory.mktemp("interrupt") / "data", num_images=8, seed=2)


def _config(ann, *extra):
    return load_config("tiny", [*SETTINGS, f"data.path={ann}", f"data.val_path={ann}", *extra])


@pytest.fixture
def saved(monkeypatch):
    """The (file name, position in the epoch) of every checkpoint the run writes."""
    writes: list[tuple[str, int]] = []
    real = fit_module.save_checkpoint

    def record(state, path):
        writes.append((path.name, state.get("progress", {}).get("batch", -1)))
        real(state, path)

    monkeypatch.setattr(fit_module, "save_checkpoint", record)
    return writes


@pytest.mark.parametrize("minutes, mid_epoch", [(1e-9, [1, 2, 3]), (0, []), (60, [])])
def test_last_pt_inside_an_epoch_every_so_many_minutes(ann, tmp_path, saved, minutes, mid_epoch):
    fit_module.fit(_config(ann, f"train.checkpoint_every_minutes={minutes}"), tmp_path / "run", progress=False)
    last = [batch for name, batch in saved if name == "last.pt"]
    assert last == [*mid_epoch, 0, *mid_epoch, 0]   # 0: the epoch ends


def test_a_signal_during_a_batch_saves_that_batch_and_stops(ann, tmp_path, saved, monkeypatch):
    real_step = loop.train_step
    steps = []

    def step_then_signal(parts, batch, step):
        steps.append(step)
        if step == 5:   # epoch 2, batch 2: the signal arrives while the step runs
            signal.raise_signal(signal.SIGTERM)
        return real_step(parts, batch, step)

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        fit_module.fit(_config(ann, "train.checkpoint_every_minutes=0"), out, progress=False)
    assert steps == [0, 1, 2, 3, 4, 5]   # the batch in progress was finished, no other started
    assert stopped.value.exit_status == 128 + signal.SIGTERM
    assert str(stopped.value) == (f"interrupted at epoch 2, batch 2/4; {out / 'last.pt'} holds the state to "
                                  f"continue from: multibox train --resume {out}")
    assert saved[-1] == ("last.pt", 2)
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 6)
    assert signal.getsignal(signal.SIGTERM) is handler   # the run's handlers are gone


def test_stop_request_first_signal_asks_second_sigint_forces():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
