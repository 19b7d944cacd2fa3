"""Non-finite loss or gradient: the step is skipped (no update, BatchNorm statistics restored), logged, and after
``train.max_nonfinite_steps`` consecutive ones training stops with a clear error, ``last.pt`` left as the last good
state. NaN is injected three ways: NaN images, a NaN loss, a finite loss with a NaN gradient."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import multibox.engine.fit as train_module
from multibox.checkpoint import load_checkpoint
from multibox.cli import main
from multibox.config import load_config
from multibox.data.coco import Batch
from multibox.data.synth import generate_synthetic_coco
from multibox.engine.loop import EpochProgress, NonFiniteTrainingError, StepOptions, StepParts, train_one_epoch
from multibox.engine.fit import fit

# ------------------------------------------------------------------------------------------- the engine, a toy model


class Toy(nn.Module):
    """(B, 3, 2, 2) images -> (loc, cls) through BatchNorm (running statistics) and a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(3)
        self.lin = nn.Linear(3, 2)

    def forward(self, images):
        out = self.lin(self.bn(images.mean(dim=(2, 3))))
        return out, out


class Scripted(nn.Module):
    """A criterion following a plan per call: "ok", "nan_loss" (NaN value) or "nan_grad" (value 0, gradient NaN:
    d sqrt(x)/dx at 0 is inf, times 0)."""

    def __init__(self, plan):
        super().__init__()
        self.plan, self.calls = list(plan), 0

    def forward(self, loc, cls, loc_targets, labels):
        kind = self.plan[self.calls]
        self.calls += 1
        loss = (loc - 1.0).pow(2).mean()
        if kind == "nan_loss":
            loss = loss * float("nan")
        elif kind == "nan_grad":
            loss = loss + torch.sqrt((loc * 0.0).sum())
            assert math.isfinite(float(loss.detach()))
        return {"loss": loss, "loss_cls": loss / 2, "loss_loc": loss / 2, "num_pos": torch.tensor(1.0)}


def _batches(kinds):
    g = torch.Generator().manual_seed(1)
    out = []
    for kind in kinds:
        images = torch.randn(4, 3, 2, 2, generator=g) + 3.0
        if kind == "nan_input":
            images[1, 0, 0, 0] = float("nan")
        targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "labels": torch.tensor([1])} for _ in range(4)]
        out.append(Batch(images, targets))
    return out


def _run(kinds, max_nonfinite=0, state=None, scaler=None):
    """Train the toy over one batch per plan entry; returns (result, records, snapshots after each batch, model)."""
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = Scripted(["ok" if k == "nan_input" else k for k in kinds])
    records, snapshots = [], []

    def after_batch(progress, next_step):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    parts = StepParts(model, criterion, lambda b, lab: (b, lab), optimizer, lambda step: 0.1, torch.device("cpu"),
                      scaler=scaler, options=StepOptions(log_every=1, max_nonfinite=max_nonfinite))
    result = train_one_epoch(parts, _batches(kinds), 0, state=state, log=records.append, after_batch=after_batch)
    return result, records, snapshots, model


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_bad_steps_change_nothing_and_are_logged():
    kinds = ["ok", "nan_input", "nan_loss", "nan_grad", "ok"]
    result, records, snaps, model = _run(kinds)
    assert _same(snaps[0], snaps[1]) and _same(snaps[1], snaps[2]) and _same(snaps[2], snaps[3])
    assert not _same(snaps[3], snaps[4])
    assert all(torch.isfinite(v.float()).all() for v in snaps[1].values())   # NaN images left no NaN statistics
    assert int(snaps[3]["bn.num_batches_tracked"]) == 1                     # skipped forwards did not count
    bad = [r for r in records if r["kind"] == "nonfinite"]
    assert [(r["step"], r["reason"], r["consecutive"]) for r in bad] == [(1, "loss", 1), (2, "loss", 2), (3, "grad", 3)]
    assert bad[0]["loss"] == "nan" and bad[2]["grad_norm"] == "nan" and math.isfinite(bad[2]["loss"])
    assert [r["step"] for r in records if r["kind"] == "train"] == [0, 4]
    json.loads(json.dumps(bad, allow_nan=False))   # strict JSON: no NaN literals in metrics.jsonl
    assert result["skipped_steps"] == 3 and result["nonfinite_streak"] == 0 and result["next_step"] == 5
    # Independent reference: the same model trained on the two good batches only ends identically.
    ref_model = Toy()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    good = [b for b, k in zip(_batches(kinds), kinds) if k == "ok"]
    train_one_epoch(StepParts(ref_model, Scripted(["ok", "ok"]), lambda b, lab: (b, lab), ref_opt, lambda s: 0.1,
                              torch.device("cpu")), good, 0)
    assert _same(ref_model.state_dict(), model.state_dict())


def test_stops_after_k_consecutive_and_not_before():
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive steps had a non-finite loss.*max_nonfinite_steps"):
        _run(["ok", "nan_loss", "nan_input", "nan_loss", "ok"], max_nonfinite=3)
    # intermittent: the counter resets on every good step
    result, records, _, _ = _run(["nan_loss", "nan_grad", "ok", "nan_loss", "nan_loss", "ok"], max_nonfinite=3)
    assert result["skipped_steps"] == 4 and result["nonfinite_streak"] == 0
    # the streak carries over an epoch boundary (EpochProgress from the previous epoch / a checkpoint)
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive"):
        _run(["nan_grad", "ok"], max_nonfinite=2, state=EpochProgress(nonfinite_streak=1))


def test_loss_scaler_backs_off_on_overflow_and_updates_like_fp32():
    """The fp16 path (GradScaler; a CPU one here, the CUDA one in training): a NaN gradient is skipped and halves
    the scale; the other updates equal those without a scaler (power-of-two scaling is exact)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    kinds = ["ok", "nan_grad", "ok", "nan_input", "ok"]
    result, records, snaps, model = _run(kinds, scaler=scaler)
    assert result["skipped_steps"] == 2 and scaler.get_scale() == 2.0 ** 11   # loss NaN: no backward, no backoff
    assert [r["reason"] for r in records if r["kind"] == "nonfinite"] == ["grad", "loss"]
    _, _, _, plain = _run(kinds)
    assert _same(plain.state_dict(), model.state_dict())


# ------------------------------------------------------------------------------------------- a real run

TINY = ["model.widths=[8, 8, 16, 16, 16, 16, 16, 16]", "train.batch_size=2", "train.log_every=1",
        "train.checkpoint_every=0", "eval.batch_size=4", "data.num_workers=0", "train.threads=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synthetic_coco(tmp_path_factory.mktemp("nonfinite") / "data", num_images=8, seed=2)


class NaNFrom(nn.Module):
    """The real criterion, whose losses become NaN from call ``start`` on (one call per step)."""

    def __init__(self, inner, start):
        super().__init__()
        self.inner, self.start, self.calls = inner, start, 0

    def forward(self, *args):
        out = self.inner(*args)
        self.calls += 1
        if self.calls > self.start:
            out = {**out, **{k: out[k] * float("nan") for k in ("loss", "loss_cls", "loss_loc")}}
        return out


@pytest.mark.slow
def test_run_stops_with_last_good_checkpoint_then_resumes(data, tmp_path, monkeypatch):
    cfg = load_config("tiny", [*TINY, f"data.path={data}", f"data.val_path={data}", "train.epochs=3",
                               "train.checkpoint_every_steps=1", "train.max_nonfinite_steps=3"])
    real = train_module.build_criterion
    monkeypatch.setattr(train_module, "build_criterion", lambda c: NaNFrom(real(c), start=5))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError) as info:
        fit(cfg, out, progress=False)
    message = str(info.value)
    assert "3 consecutive steps had a non-finite loss" in message and "stopped at step 7" in message
    assert f"{out / 'last.pt'} holds the last good state" in message and "--resume" in message
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step"], state["progress"]["batch"]) == (1, 5, 1)   # right after good step 4
    assert state["progress"]["nonfinite_streak"] == 0
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "nonfinite"] == [5, 6, 7]
    assert records[-1]["kind"] == "stopped"
    # the cause fixed, the run continues from last.pt and finishes
    monkeypatch.setattr(train_module, "build_criterion", real)
    final = fit(cfg, out, resume=True, progress=False)
    assert math.isfinite(final["AP"])
    assert load_checkpoint(out / "last.pt")["step"] == 12
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(12))   # rewound, then continued
    assert not [r for r in records if r["kind"] == "nonfinite"]


@pytest.mark.slow
def test_cli_nan_inputs_exit_nonzero_and_leave_last_pt_untouched(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--val-data", str(data), "--out", str(out), "--no-progress",
            "--set", "train.epochs=1", "--set", "train.checkpoint_every_steps=1"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    digest = hashlib.sha256((out / "last.pt").read_bytes()).hexdigest()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "multibox", "train", "--resume", str(out), "--no-progress",
                           "--set", "train.epochs=2", "--set", "data.mean=[.nan, .nan, .nan]",
                           "--set", "train.max_nonfinite_steps=2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "NonFiniteTrainingError" in done.stderr or "error" in done.stderr.lower()
    assert "2 consecutive steps had a non-finite loss" in done.stderr, done.stderr[-3000:]
    assert hashlib.sha256((out / "last.pt").read_bytes()).hexdigest() == digest   # the good checkpoint, untouched
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "nonfinite"] == [4, 5]
