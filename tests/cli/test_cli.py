"""The command line (``multibox.cli``): one module per command, help without heavy imports, typed library errors
as one ``error:`` line with exit status 2, library log lines on stdout (warnings on stderr)."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from multibox.cli import COMMANDS, main

HEAVY = ("torch", "torchvision", "numpy", "matplotlib", "pyarrow", "pycocotools", "faster_coco_eval")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"]])
def test_help_imports_no_heavy_library(argv):
    code = (f"import json, sys\nfrom multibox.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    *help_lines, loaded = done.stdout.strip().splitlines()
    assert "usage: multibox" in help_lines[0]
    assert json.loads(loaded) == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_module_and_its_help(name, capsys):
    module = importlib.import_module(f"multibox.cli.{COMMANDS[name][0]}")
    assert callable(module.add_parser) and callable(module.run)
    parser = module.add_parser(argparse.ArgumentParser(prog="multibox").add_subparsers(dest="command"))
    assert parser.prog == f"multibox {name}"
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: multibox {name} ")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_described(name):
    module = importlib.import_module(f"multibox.cli.{COMMANDS[name][0]}")
    parser = module.add_parser(argparse.ArgumentParser(prog="multibox").add_subparsers(dest="command"))
    undescribed = [action.option_strings or action.dest for action in parser._actions if not action.help]
    assert undescribed == [], f"multibox {name} --help describes no {undescribed}"


def test_precision_names_are_the_runtime_precisions():
    from multibox.config import PRECISION_NAMES
    from multibox.export import INPUT_DTYPE_NAMES
    from multibox.export.onnx import INPUT_DTYPES
    from multibox.runtime import PRECISIONS

    assert tuple(PRECISIONS) == PRECISION_NAMES
    assert sorted(INPUT_DTYPES) == sorted(INPUT_DTYPE_NAMES)


def test_missing_input_is_one_error_line(tmp_path, capsys):
    from multibox.checkpoint import save_checkpoint
    from multibox.config import load_config
    from multibox.models import build_model

    cfg = load_config("tiny", ["model.num_classes=1"])
    ckpt = tmp_path / "model.pt"
    save_checkpoint({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(),
                     "class_names": ["background", "x"]}, ckpt)
    missing = tmp_path / "no-such.jpg"
    assert main(["predict", "--checkpoint", str(ckpt), str(missing), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such file or folder\n"


def test_unknown_bench_line_is_one_error_line(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--only", "train_step,warp", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown --only lines ['warp']; choose from train_step,") and err.count("\n") == 1
    assert not (tmp_path / "b.json").exists()


@pytest.fixture(scope="module")
def synth_ann(tmp_path_factory):
    from multibox.data.synth import generate_synthetic_coco

    return generate_synthetic_coco(tmp_path_factory.mktemp("synth"), num_images=3)


@pytest.mark.parametrize("setup, line", [
    ("", "  shard-00000.arrow: 3 images (0 skipped)"),   # main's own handler: the bare message
    ("import logging; logging.basicConfig(level=logging.INFO, format='LOG %(name)s: %(message)s')",
     "LOG multibox.data.shards:   shard-00000.arrow: 3 images (0 skipped)"),   # the process's logging, not main's
])
@pytest.mark.slow   # a subprocess packing shards
def test_library_progress_is_logged(synth_ann, tmp_path, setup, line):
    done = _python(f"{setup}\nfrom multibox.cli import main\n"
                   f"assert main(['convert', {str(synth_ann)!r}, '--out', {str(tmp_path / 'shards')!r}, '--workers', "
                   f"'1', '--no-check']) == 0\n")
    assert done.returncode == 0, done.stderr
    stream = done.stderr if setup else done.stdout   # logging.basicConfig writes to stderr
    assert [text for text in stream.splitlines() if "shard-00000.arrow" in text] == [line]
    assert "3 images" in done.stdout


def test_log_lines_go_to_stdout_and_warnings_to_stderr():
    done = _python("import logging\nfrom multibox.cli import configure_logging\nconfigure_logging()\n"
                   "logging.getLogger('multibox.train').info('epoch 1/2: loss 1.0')\n"
                   "logging.getLogger('multibox.train').warning('step 3 skipped: non-finite loss')\n"
                   "logging.getLogger('multibox.train').debug('not shown')\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "epoch 1/2: loss 1.0\n"
    assert done.stderr == "step 3 skipped: non-finite loss\n"
