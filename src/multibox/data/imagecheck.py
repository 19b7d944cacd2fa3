"""Checks of one encoded image, and the worker pool that runs them over a dataset: used by ``multibox check-data``
(:mod:`multibox.data.validate`) and ``multibox convert`` (:mod:`multibox.data.shards`).

Torch-free on purpose: the worker processes import this module (and :mod:`multibox.data.validate`), not
:mod:`multibox.data.coco`, and stay ~600 MB smaller for it.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from multibox.config import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["decode_cleanly_all", "decodes_cleanly", "image_check_pool", "inspect_image_bytes",
           "training_decode_problem", "worker_count"]

_UNUSABLE = ("unreadable_image", "truncated_image", "oversized_image")

_MODE_KIND = {"L": "grayscale_image", "LA": "grayscale_image", "1": "grayscale_image", "P": "palette_image",
              "PA": "palette_image", "RGBA": "rgba_image", "CMYK": "cmyk_image", "I;16": "16bit_image",
              "I;16B": "16bit_image", "I;16L": "16bit_image", "I": "16bit_image", "F": "16bit_image"}


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 25 and data[12:16] == b"IHDR":
        return data[24]
    return None


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    return bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)


# Formats whose DCT-scaled decode (PIL ``draft``: libjpeg at 1/8 scale) is as strict as the full decode: it reads
# and Huffman-decodes every entropy-coded segment and only skips most of the inverse DCT and the colour conversion,
# so a truncated or corrupted file fails exactly as it does at full size (tests/data/test_validate.py proves it
# on a corpus of damaged files). ~25 % less CPU on 640x480 photos here; every other format is decoded in full.
_DRAFT_FORMATS = ("JPEG", "MPO")


def inspect_image_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, full_decode: bool = False
                        ) -> tuple[dict, list[tuple[str, str]]]:
    """Open and decode ``data`` with PIL. Returns (info, [(kind, message)]).

    info: ``format``, ``mode``, ``raw_size`` (w, h as stored), ``size`` (w, h as displayed, EXIF applied),
    ``orientation``. An image whose header declares more than ``max_pixels`` pixels is reported as
    ``oversized_image`` and not decoded. JPEGs are decoded at 1/8 scale (as strict, see ``_DRAFT_FORMATS``)
    unless ``full_decode``.
    """
    import io

    from PIL import Image

    if len(data) == 0:
        return {}, [("unreadable_image", "empty file (0 bytes)")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own limit decides
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return {}, [("oversized_image", f"refused before decoding: {err}")]
    except Exception as err:  # UnidentifiedImageError, and assorted errors from broken headers
        hint = "; the file holds text" if _looks_like_text(data) else ""
        why = "unknown format" if isinstance(err, Image.UnidentifiedImageError) else f"{type(err).__name__}: {err}"
        return {}, [("unreadable_image", f"not a readable image ({why}){hint}")]
    with im:
        raw_w, raw_h = im.size
        if max_pixels is not None and raw_w * raw_h > max_pixels:
            return {"format": im.format, "mode": im.mode, "raw_size": (raw_w, raw_h)}, [(
                "oversized_image", f"the header declares {raw_w}x{raw_h} = {raw_w * raw_h / 1e6:.1f} Mpx, above "
                f"the limit of {max_pixels / 1e6:.1f} Mpx (data.max_image_pixels): refused before decoding")]
        info = {"format": im.format, "mode": im.mode, "raw_size": (raw_w, raw_h)}
        # Decode before reading EXIF: for a PNG, getexif() decodes the image itself, and a decoding error swallowed
        # there would let the broken image pass as readable.
        try:
            if not full_decode and im.format in _DRAFT_FORMATS:
                im.draft(im.mode, (max(1, raw_w // 8), max(1, raw_h // 8)))   # mode kept: only the scale changes
            im.load()
        except OSError as err:
            kind = "truncated_image" if "truncated" in str(err).lower() else "unreadable_image"
            return info, [(kind, f"cannot decode ({err})")]
        except Exception as err:  # decoders raise assorted errors on corrupt data
            return info, [("unreadable_image", f"cannot decode ({type(err).__name__}: {err})")]
        try:
            orientation = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:  # a broken EXIF block must not hide the image's other problems
            orientation = 1
        info.update(orientation=orientation, size=(raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h))
    return info, _conversion_notes(data, info)


def _conversion_notes(data: bytes, info: dict) -> list[tuple[str, str]]:
    """[(kind, message)] of what reading a decodable image converts: bit depth, colour mode, EXIF rotation."""
    notes: list[tuple[str, str]] = []
    mode = info["mode"]
    if _png_bit_depth(data) == 16 and mode not in ("I;16", "I;16B", "I;16L", "I"):
        notes.append(("16bit_image", f"16-bit PNG (mode {mode}); scaled to 8 bit"))
    elif mode in _MODE_KIND:
        how = "scaled to 8-bit RGB (x / 256)" if _MODE_KIND[mode] == "16bit_image" else "converted to 8-bit RGB"
        notes.append((_MODE_KIND[mode], f"colour mode {mode}; {how}"))
    elif mode != "RGB":
        notes.append(("grayscale_image" if mode.startswith("L") else "palette_image",
                      f"colour mode {mode}; converted to 8-bit RGB"))
    if info["orientation"] != 1:
        (raw_w, raw_h), (w, h) = info["raw_size"], info["size"]
        notes.append(("exif_rotated", f"EXIF orientation {info['orientation']}: stored {raw_w}x{raw_h}, used as "
                                      f"{w}x{h}"))
    return notes


def worker_count(workers: int) -> int:
    """``workers`` as asked, or for 0 (or less) every core this process may run on (its affinity mask;
    ``os.cpu_count()`` where that is unknown)."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def image_check_pool(workers: int, picklable: bool):
    """A process pool when the jobs can travel (PIL releases the GIL while decoding, but its per-image Python work,
    header parsing and EXIF, holds it), else a thread pool (jobs that read from an open shard). ``forkserver``: the
    workers fork from a small server that imported this module once (no torch), not from this process with its
    parsed annotations. As with any process pool, a script calling this needs an ``if __name__ == "__main__":``
    guard."""
    import multiprocessing

    if not picklable:
        return ThreadPoolExecutor(workers)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["multibox.data.imagecheck", "multibox.data.validate"])
    return ProcessPoolExecutor(workers, mp_context=context)


def decodes_cleanly(blob: bytes) -> bool:
    """Whether ``blob`` is a JPEG that :func:`inspect_image_bytes` reads without an error: then the training decoder
    (:func:`multibox.data.coco.decode_image_rgb`) decodes it too, since its fallback, PIL's full decode, is no
    stricter than the 1/8-scale decode (``_DRAFT_FORMATS``). False says nothing: decode it to know."""
    if blob[:2] != b"\xff\xd8":   # JPEG's SOI marker
        return False
    info, found = inspect_image_bytes(blob)
    return info.get("format") == "JPEG" and not any(k in _UNUSABLE for k, _ in found)


def decode_cleanly_all(items: list[bytes | str]) -> list[bool]:
    """:func:`decodes_cleanly` of each item: the bytes, or the path of the file (read here, so that the bytes need
    not travel between processes; unreadable here: False). Runs in a worker process, which need not import torch."""
    out = []
    for item in items:
        try:
            out.append(decodes_cleanly(item if isinstance(item, bytes) else Path(item).read_bytes()))
        except OSError:
            out.append(False)   # the caller read it: it decides, with the training decoder
    return out


def training_decode_problem(blob: bytes, name: str, clean: bool | None = None) -> str | None:
    """Why training could not decode ``blob`` (its decoder's error message), or None when it can (``multibox
    convert`` leaves such images out). Only what :func:`decodes_cleanly` does not vouch for (``clean``: its answer,
    when known) goes through the training decoder itself, for the verdict and its message."""
    if clean if clean is not None else decodes_cleanly(blob):
        return None
    from multibox.data.coco import ImageDecodeError, decode_image_rgb

    try:
        decode_image_rgb(blob, name)
        return None
    except (OSError, ImageDecodeError) as err:
        return str(err)
