from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from _data_builders import FailingFile
from multibox.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_round_trip(tmp_path):
    save_checkpoint({"model": {"w": torch.arange(3.0)}, "config": {"a": 1}, "class_names": ["background", "x"]},
                    tmp_path / "c.pt")
    payload = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(payload["model"]["w"], torch.arange(3.0)) and payload["class_names"][1] == "x"


def test_refuses_code_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "multibox-checkpoint", "version": 1, "model": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_failure_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temporary file left behind


@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_unreadable_or_foreign_files(tmp_path, content):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"state_dict": {}}, path)   # a plain torch file, not ours
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------- failures while writing

@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(5, "Input/output error"),
                                   KeyboardInterrupt()])
def test_failure_part_way_through_the_write_keeps_previous(tmp_path, monkeypatch, error):
    import multibox.checkpoint as ckpt

    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}, "step": 1}, path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: FailingFile(real_fdopen(fd, mode), 3000, error))
    with pytest.raises(type(error)) as info:
        save_checkpoint({"model": {"w": torch.zeros(100_000)}, "step": 2}, path)
    if isinstance(error, OSError):
        assert isinstance(info.value, CheckpointWriteError) and error.strerror in str(info.value)
        assert "unchanged" in str(info.value) and info.value.errno == error.errno
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_real_write_limit_in_the_kernel_keeps_previous(tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the write (EFBIG) as a full disk fails it (ENOSPC)."""
    script = f"""
import resource, signal, torch
from multibox.checkpoint import save_checkpoint, CheckpointWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
save_checkpoint({{"model": {{"w": torch.ones(1000)}}, "step": 1}}, {str(tmp_path / 'last.pt')!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
try:
    save_checkpoint({{"model": {{"w": torch.zeros(200_000)}}, "step": 2}}, {str(tmp_path / 'last.pt')!r})
except CheckpointWriteError as err:
    print("REFUSED", err.errno, err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "REFUSED 27" in done.stdout, done.stdout + done.stderr   # EFBIG
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_sigkill_during_writes_never_leaves_a_broken_checkpoint(tmp_path):
    """A process rewriting a 4 MB checkpoint in a loop is killed at random moments, 4 times: last.pt always loads,
    holds one whole step's payload, and its step only moves forward."""
    script = f"""
import sys, torch
from multibox.checkpoint import save_checkpoint
for k in range(int(sys.argv[1]), 100000):
    save_checkpoint({{"model": {{"w": torch.full((1_000_000,), float(k))}}, "step": k}}, {str(tmp_path / 'last.pt')!r})
    print(k, flush=True)
"""
    rng, last = random.Random(), 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script, str(last + 1)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()   # at least one checkpoint written
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        state = load_checkpoint(tmp_path / "last.pt")
        assert state["step"] > last and bool((state["model"]["w"] == state["step"]).all())
        last = state["step"]


# ------------------------------------------------------------------------------------- hostile files

def test_compressed_records_legacy_pickles_and_forged_fields_are_refused(tmp_path):
    import zipfile

    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.zeros(10)}}, good)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match="compressed"):
        load_checkpoint(bomb)
    legacy = tmp_path / "legacy.pt"
    torch.save({"format": "multibox-checkpoint", "version": 1, "model": {}}, legacy,
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_checkpoint(legacy)
    for field, value, match in [("model", {"w": [1, 2]}, "'model'"), ("class_names", "abc", "'class_names'"),
                                ("config", [1], "'config'"), ("version", "1", "'version'")]:
        forged = tmp_path / f"forged_{field}.pt"
        save_checkpoint({"model": {"w": torch.zeros(1)}}, forged)
        payload = torch.load(forged, weights_only=True)
        payload[field] = value
        torch.save(payload, forged)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(forged)


def test_refuses_other_code_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Eval:
        def __reduce__(self):
            return (eval, ("__import__('os').system('touch pwned-eval')",))

    class Exec:
        def __reduce__(self):
            return (exec, ("open('pwned-exec', 'w').close()",))

    for evil in (Eval(), Exec()):
        torch.save({"format": "multibox-checkpoint", "version": 1, "model": {}, "x": evil}, tmp_path / "e.pt")
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(tmp_path / "e.pt")
    assert not list(tmp_path.glob("pwned*"))


# ------------------------------------------------------------------------------------- a full disk during training

@pytest.mark.slow
def test_full_disk_during_training_loses_nothing(tmp_path, monkeypatch):
    """The 7th checkpoint write fails (full disk): the run stops with the error, last.pt is the 6th; resumed
    after "freeing space", it ends with the same weights as a run that never failed."""
    import multibox.engine.fit as train_module
    from multibox.config import load_config
    from multibox.data.synth import generate_synthetic_coco
    from multibox.engine.fit import fit

    ann = generate_synthetic_coco(tmp_path / "data", num_images=6, seed=1)
    cfg = load_config("tiny", ["model.widths=[8, 8, 8, 8, 8, 8, 8, 8]", f"data.path={ann}", f"data.val_path={ann}",
                               "train.batch_size=2", "train.epochs=3", "train.checkpoint_every_steps=1",
                               "train.deterministic=true", "train.checkpoint_every=0", "data.num_workers=0",
                               "eval.batch_size=6", "train.log_every=1"])
    fit(cfg, tmp_path / "reference", progress=False)

    real, calls = train_module.save_checkpoint, []

    def flaky(payload, path):
        calls.append(path)
        if len(calls) == 7:
            raise CheckpointWriteError(28, f"{path}: could not write the checkpoint (No space left on device)")
        return real(payload, path)

    monkeypatch.setattr(train_module, "save_checkpoint", flaky)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="No space left"):
        fit(cfg, out, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["step"] == 6   # checkpoints after steps 1..6 (3 per epoch)
    fit(cfg, out, resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "reference" / "last.pt"), load_checkpoint(out / "last.pt")
    assert a["step"] == b["step"] == 9
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
