from __future__ import annotations

import pytest

from multibox.config import Config, ConfigError, load_config, preset_names, save_config


def test_presets_are_shipped():
    assert {"tiny", "ssd300-vgg16-seed"} <= set(preset_names())


def test_seed_preset_matches_the_tutorial():
    cfg = load_config("ssd300-vgg16-seed")
    assert cfg.model.num_classes == 80 and cfg.model.image_size == 300 and cfg.model.head == "separable"
    assert cfg.loss.kind == "focal" and cfg.loss.alpha == 0.75 and cfg.loss.gamma == 2.0
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.lr_init) == (5, 60, 0.05, 0.001)
    assert cfg.train.lr_end == pytest.approx(0.001 * 0.05)
    assert (cfg.train.momentum, cfg.train.weight_decay) == (0.9, 1.5e-4)
    assert (cfg.eval.score_threshold, cfg.eval.nms_threshold, cfg.eval.max_per_class) == (0.1, 0.6, 100)


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["train.epochs=3", "train.lr=1e-2", "eval.max_per_image=null",
                               "anchors.aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]", "data.path=x.json"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(0.01)
    assert cfg.eval.max_per_image is None and cfg.data.path == "x.json"


@pytest.mark.parametrize("bad", ["train.epoch=3", "nosection.x=1", "train=3", "train.epochs.x=1", "train.lr=[1",
                                 "train.lr"])
def test_unknown_or_malformed_keys_are_errors(bad):
    with pytest.raises(ConfigError):
        load_config("tiny", [bad])


def test_missing_preset_lists_available():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-preset")


def test_cli_reports_config_errors_in_one_line(capsys):
    from multibox.cli import main

    assert main(["train", "--set", "train.epochz=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown config key 'train.epochz'"
    assert main(["train", "--data", "no-such-file.json"]) == 2
    assert capsys.readouterr().err.startswith("error: data source 'no-such-file.json': not a COCO JSON file")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("ssd300-vgg16-seed", ["train.epochs=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_numeric_fields_reject_words():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("tiny", ["train.lr=fast"])
