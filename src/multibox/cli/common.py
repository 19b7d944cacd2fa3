"""Options shared by several commands."""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

from multibox.config import PRECISION_NAMES

# Exit statuses of every command (README, "Exit status"): 0 = all done; 2 = an error stopped the command (one
# ``error:`` line); 3 = the command finished but skipped inputs it could not read (each named in a warning, counted
# in its summary).
EXIT_OK, EXIT_ERROR, EXIT_SKIPPED = 0, 2, 3


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--compile`` for the commands that run a trained network (eval, predict)."""
    parser.add_argument("--precision", choices=["auto", *PRECISION_NAMES],
                        help="inference autocast (default: the checkpoint's eval.precision, usually auto)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the network (worth it for many images of one size)")


@contextlib.contextmanager
def progress_callback(enabled: bool, desc: str, unit: str = "img") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback for the library's long passes, shown as one progress bar on stderr
    (:func:`multibox.io.progress_bar`: quiet off a terminal or when not ``enabled``)."""
    from multibox.io import progress_bar

    with progress_bar(total=0, enabled=enabled, desc=desc, unit=unit) as bar:
        def show(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        yield show
