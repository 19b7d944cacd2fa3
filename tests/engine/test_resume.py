"""Exact resume: a run killed with SIGKILL at a random step and resumed with ``--resume`` ends with the same weights
(bit for bit), optimizer state, metrics and evaluation as an uninterrupted run (deterministic CPU mode), with 0 and
1 DataLoader workers; and the pieces that make it so (per-sample augmentation keys, the sampler's in-epoch start)."""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multibox.data.build import EpochShuffleSampler, SampleIndex, TransformedSubset
from multibox.data.synth import generate_synthetic_coco
from multibox.data.transforms import TrainTransform

pytestmark = pytest.mark.slow   # kills and resumes real training runs

# 8 images, batch 2: 4 steps per epoch, 12 steps; a checkpoint after every step.
SETTINGS = ["model.widths=[8, 8, 16, 16, 16, 16, 16, 16]", "train.batch_size=2", "train.epochs=3",
            "train.checkpoint_every_steps=1", "train.deterministic=true", "train.log_every=1",
            "train.checkpoint_every=0", "eval.batch_size=4", "train.seed=7"]
TOTAL_STEPS = 12


def _command(ann: Path, out: Path, workers: int, pipeline: str = "cpu") -> list[str]:
    cmd = [sys.executable, "-m", "multibox", "train", "--data", str(ann), "--val-data", str(ann), "--out", str(out),
           "--no-progress", "--set", f"data.num_workers={workers}", "--set", f"data.pipeline={pipeline}"]
    for item in SETTINGS:
        cmd += ["--set", item]
    return cmd


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _train_steps(out: Path) -> list[int]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:   # a line being written
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_synthetic_coco(tmp_path_factory.mktemp("resume") / "data", num_images=8, seed=5)


PIPELINES = ("cpu", "batched")


@pytest.fixture(scope="module")
def references(data, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs with 0 workers, one per data.pipeline (both at once: two processes)."""
    outs = {p: tmp_path_factory.mktemp(f"reference-{p}") / "run" for p in PIPELINES}
    procs = {p: subprocess.Popen(_command(data, outs[p], 0, p), env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for p in PIPELINES}
    for p, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert _train_steps(outs[p]) == list(range(TOTAL_STEPS))
    return outs


# The references ran with 0 workers: augmentation keyed by (seed, epoch, index) makes the worker count irrelevant
# (CPU pipeline, killed and resumed with 1 worker); the batched pipeline draws its parameters the same way.
@pytest.mark.parametrize("workers, pipeline", [(1, "cpu"), (0, "batched")])
def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(data, references, tmp_path, workers, pipeline):
    reference = references[pipeline]
    out = tmp_path / "run"
    kill_after = random.Random().randint(1, TOTAL_STEPS - 3)   # random per run; reported on failure
    proc = subprocess.Popen(_command(data, out, workers, pipeline), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = _train_steps(out)
        if steps and max(steps) >= kill_after and (out / "last.pt").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}, kill_after {kill_after}): {err}"
    reached = max(_train_steps(out))
    assert reached < TOTAL_STEPS - 1, "killed too late to test anything"
    killed_at = torch.load(out / "last.pt", weights_only=True)

    done = subprocess.run([sys.executable, "-m", "multibox", "train", "--resume", str(out), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    where = f"(killed after step {reached}, last.pt at step {killed_at['step']}, workers {workers}, {pipeline})"
    assert f"step {killed_at['step']}" in done.stdout, done.stdout[-2000:]   # it did resume from there

    a = torch.load(reference / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == TOTAL_STEPS and a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"{name} differs {where}"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]   # momenta / Adam moments and steps
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for k in state_a:
        assert state_a[k].keys() == state_b[k].keys()
        assert all(torch.equal(state_a[k][n], state_b[k][n]) for n in state_a[k]), f"optimizer state differs {where}"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert _records(reference) == _records(out), f"metrics.jsonl differs {where}"
    assert json.loads((reference / "eval.json").read_text()) == json.loads((out / "eval.json").read_text())
    assert not list(out.glob(".*.tmp"))   # no temporary file left behind by the kill


def test_sampler_skips_the_batches_done_and_keys_samples():
    full = list(EpochShuffleSampler(11, 1, 0, seed=4))
    sampler = EpochShuffleSampler(11, 1, 0, seed=4, keyed=True)
    sampler.set_epoch(0, start=6)
    rest = list(sampler)
    assert rest == full[6:] and len(sampler) == 5
    assert all(isinstance(i, SampleIndex) and i.epoch == 0 and i.seed == 4 for i in rest)
    sampler.set_epoch(1)
    assert len(sampler) == 11 and sorted(sampler) == list(range(11))   # set_epoch resets the start
    two = EpochShuffleSampler(11, 2, 1, seed=4)
    two.set_epoch(0, start=2)
    assert list(two) == full[:10][1::2][2:]
    with pytest.raises(ValueError):
        sampler.set_epoch(0, start=12)
    index = pickle.loads(pickle.dumps(SampleIndex(3, 2, 9)))   # as DataLoader workers receive it
    assert (int(index), index.epoch, index.seed) == (3, 2, 9) and [10, 11, 12, 13][index] == 13


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=g)
    target = {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [30.0, 20.0, 70.0, 55.0]]),
              "labels": torch.tensor([1, 2]), "image_id": 0, "orig_size": (60, 80)}

    class Same:
        def __getitem__(self, i):
            return image, target

    subset = TransformedSubset(Same(), range(10), TrainTransform(64))
    keys = [SampleIndex(i, e, 3) for e in (0, 1) for i in range(5)]
    first = {(int(k), k.epoch): subset[k] for k in keys}
    again = {(int(k), k.epoch): subset[k] for k in reversed(keys)}   # other order, other history
    for key, (x, t) in first.items():
        assert torch.equal(x, again[key][0]) and torch.equal(t["boxes"], again[key][1]["boxes"]), key
    distinct = {first[(i, e)][0].sum().item() for i in range(5) for e in (0, 1)}
    assert len(distinct) > 5   # different keys, different augmentations
    other_seed = subset[SampleIndex(0, 0, 4)][0]
    assert not torch.equal(other_seed, first[(0, 0)][0])


def test_restore_training_state_round_trip_and_refusals(tmp_path):
    """Everything a resume restores (model, optimizer, fp16 loss scaler, RNGs, in-epoch progress), and the clear
    errors for a checkpoint that cannot be continued."""
    from torch import nn

    from multibox.checkpoint import CheckpointError, save_checkpoint
    from multibox.config import Config
    from multibox.engine.loop import EpochProgress
    from multibox.engine.state import _rng_state, checkpoint_payload, restore_training_state

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        return model, torch.optim.AdamW(model.parameters(), lr=0.01), torch.amp.GradScaler("cpu", init_scale=8.0)

    model, optimizer, scaler = make()
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scaler.scale(torch.ones(()))
    scaler.update(2.0)
    geometry = {"steps_per_epoch": 7, "world_size": 1, "batch_size": 2}
    progress = EpochProgress(batch=3, totals={"loss": 1.5, "loss_cls": 1.0, "loss_loc": 0.5}, count=3,
                             skipped=1, skipped_images=2, nonfinite_streak=1)
    rng = _rng_state(torch.device("cpu"))
    expected_draw = torch.rand(3)
    path = tmp_path / "last.pt"
    save_checkpoint(checkpoint_payload(Config(), model, ["background", "a"], optimizer=optimizer.state_dict(),
                                       scaler=scaler.state_dict(), epoch=2, step=17, best={"AP": 0.25}, rng=rng,
                                       progress=progress.to_dict(), **geometry), path)

    fresh, fresh_opt, fresh_scaler = make()
    torch.manual_seed(123)
    state, restored = restore_training_state(path, fresh, fresh_opt, fresh_scaler, torch.device("cpu"), 0, geometry)
    assert (state["epoch"], state["step"], state["best"]) == (2, 17, {"AP": 0.25})
    assert restored == progress and fresh_scaler.get_scale() == 2.0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)   # the RNG continues where the checkpoint left it

    with pytest.raises(CheckpointError, match="stopped inside epoch 3 .*batch 3.*same data, batch size"):
        restore_training_state(path, *make(), torch.device("cpu"), 0, {**geometry, "batch_size": 4})
    other = nn.Sequential(nn.Linear(3, 5))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        restore_training_state(path, other, torch.optim.SGD(other.parameters(), lr=0.1), None,
                               torch.device("cpu"), 0, geometry)
    best = tmp_path / "best.pt"   # an evaluation checkpoint: no optimizer
    save_checkpoint(checkpoint_payload(Config(), model, ["background", "a"], epoch=2, metrics={}), best)
    with pytest.raises(CheckpointError, match="field 'optimizer'"):
        restore_training_state(best, *make(), torch.device("cpu"), 0, geometry)


def _stop_with(proc: subprocess.Popen, out: Path, sig: int, group: bool) -> str:
    """Send ``sig`` once training has done two steps (to the process group: as a terminal's Ctrl-C reaches the
    DataLoader workers too); returns the process's stderr."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if max(_train_steps(out), default=-1) >= 1:
            (os.killpg(proc.pid, sig) if group else proc.send_signal(sig))
            break
        time.sleep(0.002)
    return proc.communicate(timeout=120)[1]


# No step- or time-based checkpoints: only the signal saves. SIGINT as a terminal sends it, to the whole process
# group (DataLoader workers included), SIGTERM as a scheduler or torchrun sends it, to the main process.
@pytest.mark.parametrize("sig, workers, group", [(signal.SIGINT, 1, True), (signal.SIGTERM, 0, False)])
def test_a_signal_saves_a_resumable_checkpoint_and_the_resume_is_exact(data, references, tmp_path, sig, workers,
                                                                       group):
    out = tmp_path / "run"
    cmd = _command(data, out, workers) + ["--set", "train.checkpoint_every_steps=0",
                                          "--set", "train.checkpoint_every_minutes=0"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    err = _stop_with(proc, out, sig, group)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("stopped: interrupted at ") and f"--resume {out}" in err
    saved = torch.load(out / "last.pt", weights_only=True)
    assert 2 <= saved["step"] < TOTAL_STEPS
    assert saved["progress"]["batch"] == saved["step"] - 4 * saved["epoch"]   # mid-epoch position (or 0 at an end)

    done = subprocess.run([sys.executable, "-m", "multibox", "train", "--resume", str(out), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(references["cpu"] / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == TOTAL_STEPS
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"{name} differs (stopped at step {saved['step']})"
    assert _records(references["cpu"]) == _records(out)
