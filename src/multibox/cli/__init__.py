"""``multibox``: the one command-line entry point.

Each command is a module of this package with ``add_parser(subparsers)`` and ``run(args) -> int``; it imports the
library inside ``run``. :func:`main` imports only the module of the command being run (the others get a
placeholder sub-parser with their help line), so that ``multibox --help`` and ``multibox <command> --help`` start
in a blink: they import neither torch nor any other heavy library.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from multibox.errors import MultiboxError

__all__ = ["COMMANDS", "build_parser", "main"]

# name -> (module of multibox.cli, one-line help), in the order of ``multibox --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a detector (default: the tiny preset on the synthetic demo data)"),
    "eval": ("eval", "COCO evaluation of a checkpoint"),
    "synth": ("synth", "write the synthetic COCO-format demo dataset"),
    "predict": ("predict", "detect objects in images, folders or videos"),
    "export": ("export", "export a checkpoint to ONNX (normalisation, network, decoding and NMS in one graph)"),
    "convert": ("convert", "pack COCO / VOC / custom COCO-format data (or tutorial MindRecord files) into Arrow "
                           "shards"),
    "check-data": ("check_data", "validate a dataset: every problem with its file and annotation id"),
    "import-weights": ("import_weights", "convert torchvision (SSD300, SSDLite) or MindSpore (tutorial, model zoo) "
                                         "weights into a checkpoint, recognising the network"),
    "anchors": ("anchors", "how well a model's default boxes fit a dataset (and fitting them to it)"),
    "bench": ("bench", "benchmark multibox against torchvision's SSD300 (or the arch's twin) in one process"),
}


def command_module(name: str):
    """The module of command ``name`` (imported now)."""
    return importlib.import_module(f"multibox.cli.{COMMANDS[name][0]}")


def command_help(name: str) -> str:
    """The one-line help of command ``name`` (``multibox --help`` lists them)."""
    return COMMANDS[name][1]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``multibox`` parser: the full sub-parser of ``command`` (imported), a placeholder with its help line for
    every other command (all of them when ``command`` is None)."""
    parser = argparse.ArgumentParser(prog="multibox", description="SSD object detectors: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        if name == command:
            command_module(name).add_parser(sub)
        else:
            sub.add_parser(name, help=command_help(name))
    return parser


def _requested_command(argv: list[str]) -> str | None:
    """The command named in ``argv``: its first word that is not an option (``multibox`` has no options of its own
    but ``--help``), if it is a command."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMANDS else None


class _ConsoleHandler(logging.StreamHandler):
    """Writes INFO records to ``sys.stdout`` and WARNING and up to ``sys.stderr``, as they are when a line is
    logged (a redirection or capture made later included): the library's progress lines go where the command's
    own output goes, its warnings where errors go."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self._record_level = logging.INFO

    def emit(self, record: logging.LogRecord) -> None:
        self._record_level = record.levelno
        super().emit(record)

    @property
    def stream(self):
        return sys.stderr if self._record_level >= logging.WARNING else sys.stdout


def configure_logging() -> None:
    """Let the library's log lines (logger ``multibox``, INFO and up) reach the user as plain lines: INFO on
    stdout, warnings on stderr. Does nothing where logging is already configured (the process's own handlers, or
    an earlier call)."""
    logger = logging.getLogger("multibox")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one ``multibox`` command; returns its exit status. A :class:`~multibox.errors.MultiboxError` or a missing
    file becomes one ``error: <message>`` line on stderr and status 2, Ctrl-C status 130 (see README, "Exit
    status")."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_requested_command(argv)).parse_args(argv)
    configure_logging()
    try:
        return command_module(args.command).run(args)
    except (MultiboxError, FileNotFoundError) as err:
        # Expected failures on bad input get one clear line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C outside a training loop (which saves and stops by itself)
        print("interrupted", file=sys.stderr)
        return 130

