"""Data-parallel training: ``train.batch_size`` is the global batch. 2 CPU processes (torchrun, gloo) given
``train.batch_size=B`` take B/2 images each and follow the single-process run with the same setting step for step
(steps per epoch, LR, losses, weights); evaluation is gathered across ranks; rank 0 alone writes the run folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from multibox.cli import main
from multibox.config import load_config
from multibox.data.build import EpochShuffleSampler
from multibox.data.synth import generate_synthetic_coco
from multibox.distributed import DistEnv, per_rank_batch
from multibox.engine.fit import build_train_loader
from multibox.errors import InputError

slow = pytest.mark.slow   # two-process gloo training
NUM_IMAGES, BATCH = 10, 4   # 2 full global batches per epoch, 2 images left over (dropped by every world size)

# A narrow tiny SSD; BatchNorm frozen (train.freeze_bn) so that an image's loss does not depend on its batch
# mates: then the 2 x 2 run and the 1 x 4 run compute the same gradients. No augmentation (the two runs
# would draw different random crops). NCHW layout: its convolutions round the same way at batch 2 and 4, so the two
# runs agree to 1e-6; NHWC (oneDNN's blocked kernels) rounds differently per batch size, which after 4 steps moves
# the weights of this narrow net by ~5e-5 (as NCHW vs NHWC does in one process): a tolerance that loose could hide
# a DDP bug.
COMMON = ["model.widths=[8, 8, 8, 8, 8, 8, 8, 8]", "train.optimizer=sgd", "data.crop_rule=none", "data.flip_p=0", "data.jitter=[0, 0, 0]",
          "data.num_workers=0", "train.epochs=2", "train.lr=0.02", "train.warmup_epochs=1", "train.log_every=1",
          "train.checkpoint_every=0", "train.threads=1", "train.freeze_bn=true", "eval.batch_size=4",
          "train.channels_last=false"]


def _args(ann, out):
    args = ["train", "--data", str(ann), "--val-data", str(ann), "--out", str(out), "--no-progress",
            "--set", f"train.batch_size={BATCH}"]
    for item in COMMON:
        args += ["--set", item]
    return args


def _train_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    ann = generate_synthetic_coco(root / "data", num_images=NUM_IMAGES, seed=11)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "multibox", *_args(ann, root / "two")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert main(_args(ann, root / "one")) == 0   # meanwhile, one process, the same global batch
    log, _ = two.communicate(timeout=300)
    assert two.returncode == 0, log[-4000:]
    return ann, root / "one", root / "two", log


class _Indexed(torch.utils.data.Dataset):
    """Sample i: a blank image whose target names i (what the loader batches, without decoding anything)."""

    def __len__(self):
        return NUM_IMAGES

    def __getitem__(self, i):
        return torch.zeros(3, 2, 2, dtype=torch.uint8), {"image_id": int(i)}


def _global_batches(world: int, batch: int = BATCH, epoch: int = 1) -> list[list[int]]:
    """The image ids of each global step of an epoch: every rank's training loader (``build_train_loader``, as
    ``train`` builds it for that rank) read, and step s of all ranks put together."""
    cfg = load_config("tiny", [f"train.batch_size={batch}", "data.num_workers=0", "data.pipeline=cpu"])
    splits = SimpleNamespace(train=_Indexed())
    per_rank = []
    for rank in range(world):
        sampler, loader = build_train_loader(cfg, splits, DistEnv(rank, rank, world), torch.device("cpu"))
        sampler.set_epoch(epoch)
        per_rank.append([[t["image_id"] for t in targets] for _, targets in loader])
    assert len({len(steps) for steps in per_rank}) == 1, "ranks disagree on the steps of an epoch"
    return [sorted(i for steps in per_rank for i in steps[s]) for s in range(len(per_rank[0]))]


def test_batch_size_is_the_global_batch_for_every_world_size():
    one = _global_batches(1)
    assert len(one) == NUM_IMAGES // BATCH and all(len(b) == BATCH for b in one)
    assert _global_batches(2) == _global_batches(4) == one   # same steps, same images in each: B / N per rank
    # ... and they are the batches of torch's own DataLoader(shuffle=True, drop_last=True) seeded with seed + epoch
    seed = load_config("tiny").train.seed
    reference = torch.utils.data.DataLoader(range(NUM_IMAGES), batch_size=BATCH, shuffle=True, drop_last=True,
                                            generator=torch.Generator().manual_seed(seed + 1))
    assert one == [sorted(b.tolist()) for b in reference]


def test_a_global_batch_that_does_not_divide_is_refused():
    assert per_rank_batch(8, 4) == 2 and per_rank_batch(5, 1) == 5
    with pytest.raises(InputError, match=r"^train.batch_size = 6 is the global batch and must divide by the 4 "
                                         r"processes \(each takes batch_size / 4\): use 4 or 8$"):
        per_rank_batch(6, 4)
    with pytest.raises(InputError, match=r"use 4$"):
        per_rank_batch(2, 4)


def test_sampler_global_batches_do_not_depend_on_world_size():
    one = list(EpochShuffleSampler(10, 1, 0, seed=3))
    parts = [list(EpochShuffleSampler(10, 2, r, seed=3)) for r in (0, 1)]
    for s in range(2):   # per-rank batch 2 <-> global batch 4
        assert sorted(parts[0][2 * s:2 * s + 2] + parts[1][2 * s:2 * s + 2]) == sorted(one[4 * s:4 * s + 4])
    assert not set(parts[0]) & set(parts[1])
    sampler = EpochShuffleSampler(10, 1, 0, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != one and sorted(sampler) == list(range(10))


@slow
def test_two_processes_follow_the_single_process_trajectory(runs):
    _, one, two, log = runs
    assert "2 processes x batch 2 (global batch 4)" in log
    a = [r for r in _train_records(one) if r["kind"] == "train"]
    b = [r for r in _train_records(two) if r["kind"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]   # 2 epochs x 2 steps, both
    epochs_a = [r for r in _train_records(one) if r["kind"] == "epoch"]
    epochs_b = [r for r in _train_records(two) if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs_a] == [r["step"] for r in epochs_b] == [2, 4]
    for ra, rb in zip(a, b):
        assert rb["num_pos"] == ra["num_pos"]                 # global positives
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
        for key in ("loss", "loss_cls", "loss_loc"):
            assert rb[key] == pytest.approx(ra[key], rel=2e-5), (key, ra, rb)
    wa = torch.load(one / "last.pt", weights_only=True)["model"]
    wb = torch.load(two / "last.pt", weights_only=True)["model"]
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
    # ... and the weights did move (4 SGD steps away from the common initialisation)
    from multibox.config import Config
    from multibox.models import build_model
    from multibox.runtime import seed_everything

    state = torch.load(one / "last.pt", weights_only=True)
    seed_everything(0)
    init = build_model(Config.from_dict(state["config"])).state_dict()
    moved = max(float((wa[k] - init[k]).abs().max()) for k in wa if wa[k].is_floating_point())
    assert moved > 1e-3


@slow
def test_rank_zero_writes_and_gathered_eval_equals_single_process_eval(runs, tmp_path):
    ann, _, two, log = runs
    for name in ("config.yaml", "last.pt", "best.pt", "eval.json", "metrics.jsonl", "curves.png"):
        assert (two / name).is_file(), name
    data = [r for r in _train_records(two) if r["kind"] == "data"]
    assert len(data) == 1 and data[0]["world_size"] == 2 and data[0]["global_batch"] == 4
    assert log.count("epoch 1/2") == 1   # printed by rank 0 only
    # The evaluation gathered from 2 ranks (5 images each) equals a 1-process evaluation of the same weights.
    assert main(["eval", "--checkpoint", str(two / "best.pt"), "--out", str(tmp_path), "--data", str(ann)]) == 0
    single = json.loads((tmp_path / "eval.json").read_text())
    gathered = json.loads((two / "eval.json").read_text())
    for key in ("AP", "AP50", "AR100", "ARs"):
        assert gathered[key] == pytest.approx(single[key], abs=1e-9)
