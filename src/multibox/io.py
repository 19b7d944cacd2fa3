"""Output that must not mislead: atomic file writes (a reader, or a crash, a kill, a full disk mid-write, never
sees a partial file), progress bars that appear on a terminal only, and the sha256 of a file.

Every writer goes the same way: a temporary file in the destination's own folder (``.{name}.XXXX.tmp``, so the
final rename never crosses a file system), write, flush, fsync, :func:`os.replace` over the destination, fsync
of the folder (which makes the rename itself durable). On any exception, ``KeyboardInterrupt`` and ``SystemExit``
included, the temporary file is removed and the previous file at the destination is left as it was.

The new file gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask), not
``mkstemp``'s private ``0o600``: datasets, reports and checkpoints are meant to be shared like any other output.

Foundation layer: imports only the standard library (and tqdm when a bar is asked for).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "file_sha256", "progress_bar",
           "remove_leftover_temporaries"]


def _current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can only swap it, and
    a swap would be visible to other threads creating files meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(path: Path) -> tuple[int, Path]:
    """Create the temporary file beside ``path``: (open descriptor, its path), with plain-file permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


def remove_leftover_temporaries(folder: str | os.PathLike, name_glob: str = "*") -> None:
    """Remove the temporary files that a write into ``folder`` cut short by a kill left behind (the
    ``.{name}.XXXX.tmp`` of destinations matching ``name_glob``); the renamed files are never touched. For a
    writer that resumes work in ``folder``, where no other writer runs."""
    for stale in Path(folder).glob(f".{name_glob}.*.tmp"):
        stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path`` as a Path.

    The folder must exist. Writes through ``os.fdopen`` of the temporary file's descriptor (tests replace
    ``os.fdopen`` to simulate a disk that fills part-way through).
    """
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # KeyboardInterrupt and SystemExit too: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding`` (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that want a file name rather than bytes (``onnx.save``, a pyarrow sink): yield the path of an
    empty temporary file beside ``path``; when the block ends normally, fsync it and rename it over ``path``.

    When the block raises, the temporary file is removed and ``path`` is untouched. The folder must exist.
    """
    path = Path(path)
    fd, tmp = _temp_file(path)
    os.close(fd)   # the writer opens the file by name (and may replace it: fsync below reopens it)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def progress_bar(iterable=None, enabled: bool = True, **tqdm_kwargs):
    """A tqdm bar over ``iterable`` that draws only when ``enabled`` and stderr is a terminal: a log file or a
    pipe gets no bar frames. Disabled, it still iterates and accepts ``update`` / ``set_postfix`` (as no-ops)."""
    from tqdm import tqdm

    on_terminal = sys.stderr is not None and sys.stderr.isatty()
    return tqdm(iterable, disable=not (enabled and on_terminal), dynamic_ncols=True, **tqdm_kwargs)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of the file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
