"""Published weights by name through torch hub's cache (multibox.models.published; SPEC §3, §4 ``--weights``), the
paper presets' ImageNet requirement, and conv1_x frozen as torchvision freezes it.

No test touches the network: the cache is a temporary ``TORCH_HOME`` holding random-weight files under the published
names, and ``torch.hub.download_url_to_file`` is replaced by a fake (one that fails, or one that writes given bytes).
References: torchvision's own file names and URLs (its documentation's literal values), torch hub's cache layout,
hashlib, and torchvision's ``_vgg_extractor`` for the frozen parameters.
"""
from __future__ import annotations

import hashlib
import json
import types
import urllib.error

import pytest
import torch
from torchvision.models import vgg16
from torchvision.models.detection.ssd import _vgg_extractor

from multibox.cli import main
from multibox.config import ConfigError, load_config
from multibox.engine.optim import build_optimizer
from multibox.engine.schedules import build_lr_schedule
from multibox.interop.torchvision import torchvision_ssd300_pairs
from multibox.models import freeze_backbone, model_skeleton
from multibox.distributed import DistEnv
from multibox.engine import fit as fit_module
from multibox.models.published import (PUBLISHED, WeightsUnavailableError, cache_path, fetch, plan_initial_weights,
                                       resolve_weights, settle_backbone_stages)

# torchvision's files (https://pytorch.org/vision/stable/models.html), written out here as the independent reference.
FILES = {
    "ssd300_vgg16_coco": "ssd300_vgg16_coco-b556d3b4.pth",
    "ssdlite320_mobilenet_v3_large_coco": "ssdlite320_mobilenet_v3_large_coco-a79551df.pth",
    "vgg16_features": "vgg16_features-amdegroot-88682ab5.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
}


class NoNetwork(AssertionError):
    pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache under a temporary TORCH_HOME; a download attempt fails as it does offline and is
    recorded (``hub.calls``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    return types.SimpleNamespace(checkpoints=checkpoints, calls=calls)


def _put(hub, name: str, state_dict: dict | None = None):
    hub.checkpoints.mkdir(parents=True, exist_ok=True)
    path = hub.checkpoints / FILES[name]
    torch.save(state_dict if state_dict is not None else {"w": torch.randn(3)}, path)
    return path


def test_names_are_torchvisions_files_in_torch_hubs_cache(hub):
    assert set(PUBLISHED) == set(FILES)
    for name, file_name in FILES.items():
        assert PUBLISHED[name].file_name == file_name
        assert PUBLISHED[name].url == f"https://download.pytorch.org/models/{file_name}"
        assert cache_path(PUBLISHED[name]) == hub.checkpoints / file_name      # TORCH_HOME honoured
    assert PUBLISHED["vgg16_features"].hash_prefix == "88682ab5"               # past "-amdegroot-", as torch hub
    assert PUBLISHED["ssd300_vgg16_coco"].hash_prefix == "b556d3b4"


def test_a_cached_file_is_used_without_network(hub):
    for name in FILES:   # the mobilenet / ssdlite files resolve too, before their preset exists
        path = _put(hub, name)
        assert resolve_weights(name, "--weights") == path
    assert hub.calls == []


def test_offline_without_the_file_is_one_line_naming_url_and_cache_path(hub):
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights("ssd300_vgg16_coco", "--weights")
    message = str(err.value)
    assert hub.calls == [f"https://download.pytorch.org/models/{FILES['ssd300_vgg16_coco']}"]
    assert "\n" not in message and "URLError" in message
    assert f"put {hub.calls[0]} at {hub.checkpoints / FILES['ssd300_vgg16_coco']}" in message
    assert not hub.checkpoints.exists() or not any(hub.checkpoints.iterdir())   # nothing half-written


def test_a_download_is_kept_only_with_the_published_sha256_prefix(hub, monkeypatch, tmp_path):
    """torch hub's rule: the hex digits in the file name start the file's sha256. A fake URL named after the
    sha256 of the bytes the fake downloader writes is kept; other bytes are refused and leave no file."""
    payload = b"published bytes"
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setattr(type(PUBLISHED["vgg16_features"]), "weights_enum",
                        lambda self: types.SimpleNamespace(url=f"https://example.invalid/m/fake-{prefix}.pth"))
    served = {"bytes": payload}

    def fake_download(url, dst, hash_prefix=None, progress=True):
        with open(dst, "wb") as f:
            f.write(served["bytes"])

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    published = PUBLISHED["vgg16_features"]
    target = tmp_path / "cache" / f"fake-{prefix}.pth"
    served["bytes"] = b"tampered bytes"
    with pytest.raises(WeightsUnavailableError, match=f"not the published file .*expected {prefix}"):
        fetch(published, target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    served["bytes"] = payload
    fetch(published, target)
    assert target.read_bytes() == payload


# --------------------------------------------------------------------------------------------- what a run starts from

def test_paper_presets_start_from_cached_vgg16_features(hub):
    path = _put(hub, "vgg16_features")
    for preset in ("ssd300-vgg16", "ssd512-vgg16"):
        plan = plan_initial_weights(load_config(preset))
        assert plan.backbone == path and plan.detector is None
    assert hub.calls == []


def test_a_detector_brings_its_own_backbone(hub):
    """--weights ssd300_vgg16_coco needs no vgg16_features file (there is none in this cache)."""
    path = _put(hub, "ssd300_vgg16_coco")
    cfg = load_config("ssd300-vgg16", ["model.weights=ssd300_vgg16_coco"])
    plan = plan_initial_weights(cfg)
    assert plan.detector == path and plan.backbone is None and hub.calls == []


def test_from_scratch_needs_nothing_and_contradicts_weights(hub):
    assert plan_initial_weights(load_config("ssd300-vgg16", ["model.from_scratch=true"])).backbone is None
    with pytest.raises(ConfigError, match="contradict"):
        plan_initial_weights(load_config("ssd300-vgg16", ["model.from_scratch=true", "model.weights=x.pt"]))
    with pytest.raises(ConfigError, match="trains from ImageNet weights.*model.from_scratch=true"):
        plan_initial_weights(load_config("ssd300-vgg16", ["model.backbone_weights=null"]))
    assert plan_initial_weights(load_config("tiny")).backbone is None        # the tiny preset trains from scratch
    assert hub.calls == []


@pytest.mark.parametrize("key, name, belongs", [
    ("model.weights", "mobilenet_v3_large", "ssdlite320-mobilenet-v3"),
    ("model.weights", "ssdlite320_mobilenet_v3_large_coco", "ssdlite320-mobilenet-v3"),
    ("model.backbone_weights", "mobilenet_v3_large", "ssdlite320-mobilenet-v3"),
])
def test_weights_of_another_preset_are_refused_before_any_download(hub, key, name, belongs):
    with pytest.raises(ConfigError) as err:
        plan_initial_weights(load_config("ssd300-vgg16", [f"{key}={name}"]))
    assert f"{name}: torchvision's" in str(err.value) and f"of the {belongs} preset" in str(err.value)
    assert "not of model.arch ssd300_vgg16" in str(err.value) and hub.calls == []
    assert f"choose that preset (--config {belongs})" in str(err.value)
    with pytest.raises(ConfigError, match="of the ssd300-vgg16 preset, not of model.arch ssd512_vgg16; choose that "
                                          r"preset \(--config ssd300-vgg16\)"):
        plan_initial_weights(load_config("ssd512-vgg16", ["model.weights=ssd300_vgg16_coco"]))


def test_under_torchrun_rank_0_resolves_the_weights_first(hub, monkeypatch):
    """Rank 0 fetches a missing file alone; the others plan only after hearing its outcome, and raise its error
    instead of each trying the download."""
    order = []
    monkeypatch.setattr(fit_module, "plan_initial_weights", lambda cfg: order.append("plan") or "planned")
    monkeypatch.setattr(fit_module.mbdist, "broadcast_object", lambda obj: order.append("broadcast") or obj)
    cfg = load_config("ssd300-vgg16")
    assert fit_module.plan_weights(cfg, DistEnv(rank=0, world_size=2)) == "planned"
    assert order == ["plan", "broadcast"]            # rank 0 plans once and keeps its result
    order.clear()
    assert fit_module.plan_weights(cfg, DistEnv(rank=1, world_size=2)) == "planned"
    assert order == ["broadcast", "plan"]
    failure = WeightsUnavailableError("model.backbone_weights=vgg16_features is not in torch hub's cache")
    monkeypatch.setattr(fit_module.mbdist, "broadcast_object", lambda obj: failure)
    order.clear()
    with pytest.raises(WeightsUnavailableError, match="not in torch hub's cache"):
        fit_module.plan_weights(cfg, DistEnv(rank=1, world_size=2))
    assert order == []


def _train_args(data: str, *extra: str) -> list[str]:
    return ["train", "--config", "ssd300-vgg16", "--data", data, "--no-progress", *extra]


def test_cli_without_the_backbone_stops_before_reading_data(hub, tmp_path, capsys):
    """One ``error:`` line that says how to fix it; the data path does not exist, so an error about anything but
    the weights would mean the data was read first."""
    out = tmp_path / "run"
    assert main(_train_args(str(tmp_path / "missing.json"), "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.backbone_weights=vgg16_features is not in torch hub's cache") and \
        err.count("\n") == 1
    assert f"put https://download.pytorch.org/models/{FILES['vgg16_features']} at " \
           f"{hub.checkpoints / FILES['vgg16_features']}" in err
    assert "run once with network access" in err and "--set model.from_scratch=true" in err
    assert not out.exists()
    assert main(_train_args(str(tmp_path / "missing.json"), "--weights", "mobilenet_v3_large", "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ssdlite320-mobilenet-v3 preset" in err


def test_cli_weights_and_resume_do_not_mix(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    assert main(["train", "--resume", str(tmp_path / "run"), "--weights", "ssd300_vgg16_coco"]) == 2
    assert capsys.readouterr().err.startswith("error: --weights starts a new run")


# --------------------------------------------------------------------------------------------- frozen stages

def _torchvision_frozen(trainable: int) -> set[str]:
    """Our names of the parameters torchvision's _vgg_extractor(vgg16(), False, trainable) freezes."""
    with torch.device("meta"):
        extractor = _vgg_extractor(vgg16(), False, trainable)
    ours_of = {theirs: ours for ours, theirs in torchvision_ssd300_pairs()}
    return {ours_of[f"backbone.{n}"] for n, p in extractor.named_parameters() if not p.requires_grad}


def _frozen(cfg) -> tuple[set[str], object]:
    model = model_skeleton(cfg)
    frozen = set(freeze_backbone(model, cfg))
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad}
    return frozen, model


@pytest.mark.parametrize("trainable", [0, 1, 2, 3, 4, 5])
def test_frozen_parameters_are_torchvisions(trainable):
    cfg = load_config("ssd300-vgg16", [f"model.trainable_backbone_layers={trainable}"])
    assert _frozen(cfg)[0] == _torchvision_frozen(trainable)


def test_pretrained_runs_freeze_conv1_and_scratch_runs_nothing():
    """torchvision's default with pretrained weights is 4 trainable stages: conv1_1 and conv1_2 frozen."""
    frozen, model = _frozen(load_config("ssd300-vgg16"))
    conv1 = {f"backbone.blocks.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}   # conv1_1, conv1_2
    assert frozen == _torchvision_frozen(4) == conv1
    trainable = {id(p) for group in build_optimizer(load_config("ssd300-vgg16"), model).param_groups
                 for p in group["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}      # frozen ones left out
    assert _frozen(load_config("ssd300-vgg16", ["model.weights=ssd300_vgg16_coco"]))[0] == frozen
    assert _frozen(load_config("ssd512-vgg16"))[0] == frozen
    assert _frozen(load_config("ssd300-vgg16", ["model.from_scratch=true"]))[0] == set()
    assert _frozen(load_config("ssd300-vgg16", ["model.backbone_weights=null"]))[0] == set()
    with pytest.raises(ConfigError, match="trainable_backbone_layers"):
        plan_initial_weights(load_config("ssd300-vgg16", ["model.trainable_backbone_layers=6"]))


def test_a_run_writes_the_stages_it_trains_and_an_older_run_resumes_training_all():
    """config.yaml names the trained stages, so a resume freezes what its run froze; a run saved before frozen
    stages existed (null, with backbone weights) trained all five, and its optimizer state holds them all."""
    def settled(resumed: bool, *overrides: str):
        cfg = load_config("ssd300-vgg16", list(overrides))
        settle_backbone_stages(cfg, resumed)
        return cfg
    assert settled(False).model.trainable_backbone_layers == 4
    assert settled(False, "model.from_scratch=true").model.trainable_backbone_layers == 5
    older = settled(True)
    assert older.model.trainable_backbone_layers == 5 and _frozen(older)[0] == set()
    assert settled(True, "model.trainable_backbone_layers=3").model.trainable_backbone_layers == 3
    ssdlite = load_config("ssdlite320-mobilenet-v3", ["model.weights=mobilenet_v3_large"])
    settle_backbone_stages(ssdlite, False)
    assert ssdlite.model.trainable_backbone_layers is None   # no VGG16 stages to name


@pytest.mark.parametrize("preset", ["ssd300-vgg16", "ssd300-vgg16-seed", "tiny"])
def test_lr_zero_is_zero_at_every_step(preset):
    """No schedule warms up (or cosines down) to a non-zero rate when train.lr is 0."""
    cfg = load_config(preset, ["train.lr=0", "train.warmup_epochs=2", "train.epochs=4"])
    schedule = build_lr_schedule(cfg.train, steps_per_epoch=5)
    assert [schedule(step) for step in range(20)] == [0.0] * 20


def test_saved_config_names_the_weights(tmp_path):
    cfg = load_config("ssd300-vgg16", ["model.weights=ssd300_vgg16_coco"])
    from multibox.config import save_config
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again.model.weights == "ssd300_vgg16_coco" and again.model.backbone_weights == "vgg16_features"
    assert json.loads(json.dumps(again.to_dict()))["model"]["from_scratch"] is False
