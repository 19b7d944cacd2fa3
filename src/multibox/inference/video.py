"""Reading and writing videos frame by frame with PyAV (FFmpeg's libraries; ``pip install 'multibox[video]'``).

Frames are uint8 (3, H, W) RGB tensors, as images everywhere else in multibox. A video that cannot be opened or
decoded raises :class:`VideoError` naming the file; without PyAV, reading or writing raises
:class:`~multibox.errors.MultiboxError`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from multibox.errors import MultiboxError

__all__ = ["VIDEO_SUFFIXES", "VideoError", "VideoInfo", "VideoWriter", "is_video", "read_frames", "video_info"]

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"}


class VideoError(MultiboxError, OSError):
    """A video file that cannot be opened (not a video, no video stream, missing) or decoded to its end."""


def _av():
    try:
        import av
    except ImportError:
        raise MultiboxError("reading and writing videos needs PyAV: pip install 'multibox[video]' "
                            "(or: pip install av)") from None
    return av


def _why(err: Exception) -> str:
    """FFmpeg's own words for a failure (its messages repeat the file name, which ours already give)."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    """num_frames: the container's frame count (0 when it does not say); fps: average frame rate."""

    width: int
    height: int
    fps: Fraction
    num_frames: int


def _open(av, path: str | os.PathLike):
    """(container, its first video stream); :class:`VideoError` when the file has none or is no video."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: cannot open video ({_why(err)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: cannot open video (no video stream)")
    return container, container.streams.video[0]


def video_info(path: str | os.PathLike) -> VideoInfo:
    container, stream = _open(_av(), path)
    with container:
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        return VideoInfo(int(stream.codec_context.width), int(stream.codec_context.height), Fraction(fps),
                         int(stream.frames or 0))


def read_frames(path: str | os.PathLike) -> Iterator[tuple[int, float, Tensor]]:
    """Yield ``(frame index, time in seconds, uint8 (3, H, W) RGB frame)`` in presentation order.

    Raises :class:`VideoError` when decoding fails part-way (the frames before it have been yielded)."""
    av = _av()
    container, stream = _open(av, path)
    index = -1
    with container:
        stream.thread_type = "AUTO"      # frame-parallel decoding; the order of yielded frames is unchanged
        try:
            for index, frame in enumerate(container.decode(stream)):
                seconds = float(frame.time) if frame.time is not None else float("nan")
                rgb = frame.to_ndarray(format="rgb24")                       # (H, W, 3) uint8
                yield index, seconds, torch.from_numpy(rgb).permute(2, 0, 1)
        except av.FFmpegError as err:
            raise VideoError(f"{path}: cannot decode video after {index + 1} frames ({_why(err)})") from None


class VideoWriter:
    """Encode uint8 (3, H, W) RGB frames to a video file (H.264 when FFmpeg has libx264, else MPEG-4 Part 2).

    4:2:0 chroma needs even sides: an odd width or height is padded by one replicated pixel column/row.
    Use as a context manager; ``close()`` flushes the encoder.
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, width: int, height: int,
                 codec: str | None = None, crf: int = 23):
        av = _av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height = int(width), int(height)
        self.container = av.open(str(self.path), mode="w")
        codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        rate = Fraction(fps).limit_denominator(1001 * 1000) if fps else Fraction(25)
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width = self.width + self.width % 2
        self.stream.height = self.height + self.height % 2
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": str(crf)}
        self.frames_written = 0
        self._av = av

    def write(self, frame: Tensor) -> None:
        if tuple(frame.shape) != (3, self.height, self.width) or frame.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 (3, {self.height}, {self.width}) frame, got {tuple(frame.shape)} "
                             f"{frame.dtype}")
        rgb = frame.permute(1, 2, 0).numpy()
        pad_h, pad_w = self.stream.height - self.height, self.stream.width - self.width
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        av_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        av_frame.pts = self.frames_written
        for packet in self.stream.encode(av_frame):
            self.container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        if self.container is None:
            return
        for packet in self.stream.encode(None):   # flush frames the encoder still holds (B-frames, look-ahead)
            self.container.mux(packet)
        self.container.close()
        self.container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
