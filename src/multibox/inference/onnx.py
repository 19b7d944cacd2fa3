"""An exported multibox model (``multibox export``) run by onnxruntime or OpenVINO, with the API of the PyTorch
:class:`~multibox.inference.detector.Detector`; the graph's inputs and outputs are described in
:mod:`multibox.export.onnx`. :func:`multibox.load` gives one for a ``.onnx`` file (:func:`load_onnx`).

Runtimes (``runtime=``): ``onnxruntime``, ``openvino`` (CPU only) and ``auto``: OpenVINO where it is importable and
the model runs on the CPU, else onnxruntime (said at debug level). Why, measured on a shared 2-core AMD EPYC
(AVX512-VNNI), both runtimes interleaved in one process, random-weight exports with NMS inside, model only,
OpenVINO's speed over onnxruntime's in 2-4 runs: SSD300-VGG16 float 1.06-1.22x (batch 1 and 8), QDQ int8
1.1-1.6x (3.4-3.6x on a QDQ graph that onnxruntime cannot fuse); SSDLite320 float 1.2-1.7x at batch 8 and
0.8-1.2x at batch 1, QDQ int8 1.3-2.2x at batch 8 and 0.8-1.2x at batch 1 -- small batches of the small network
are the one case where onnxruntime can be as fast or faster. OpenVINO runs QDQ convolutions in u8 and float layers
in float32 (``INFERENCE_PRECISION_HINT`` f32: its CPU default on bfloat16-capable processors is bf16, silently less
exact). Threads: both runtimes' defaults (one per physical core); on a machine shared with other work, fewer
(``threads=1``) or ``spin=False`` (onnxruntime) can be faster.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from multibox.config import RESIZE_MODES, Config
from multibox.core.postprocess import build_postprocessor
from multibox.core.resize import as_hw, detections_to_pixels, letterbox_fill, letterbox_uint8
from multibox.data.categories import category_ids_of, label_to_category_id
from multibox.errors import InputError, MultiboxError
from multibox.inference.detector import ImageLike, check_limits, image_batches, with_limits

__all__ = ["RUNTIMES", "OnnxDetector", "OnnxModelError", "OpenVinoSession", "OrtSession", "load_onnx", "open_session",
           "resize_batch", "resize_for_model", "resolve_runtime", "split_fixed_outputs"]

log = logging.getLogger(__name__)


class OnnxModelError(MultiboxError, ValueError):
    """An ONNX file that cannot be used: missing, unreadable by onnxruntime, or not written by ``multibox export``."""


RUNTIMES = ("auto", "onnxruntime", "openvino")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MultiboxError("running an exported model needs onnxruntime: pip install 'multibox[export]' "
                            "(or: pip install onnxruntime)") from None
    return onnxruntime


def _openvino():
    """The openvino module, or None when it is not importable."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def load_onnx(path: str | os.PathLike, device: str = "auto", precision: str | None = None,
              compile: bool | None = None, threads: int = 0, runtime: str = "auto") -> "OnnxDetector":
    """:class:`OnnxDetector` of an exported model, with the arguments of :func:`multibox.inference.detector.load`:
    ``device`` "auto" or "cpu" (the CPU), "cuda[:i]" (onnxruntime-gpu's CUDA provider; onnxruntime only).
    ``precision`` and ``compile`` belong to checkpoints: an exported graph runs in the precision it was exported in.
    ``runtime``: auto | onnxruntime | openvino (see the module docstring); ``threads``: 0 = the runtime's default."""
    if precision not in (None, "auto") or compile:
        raise InputError(f"{path}: precision and compile apply to checkpoints; an exported ONNX model runs as it "
                         f"was exported")
    if device in ("auto", "cpu"):
        providers: list = ["CPUExecutionProvider"]
    elif device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if runtime == "openvino":
            raise InputError(f"{path}: the openvino runtime runs on the CPU here; use device cpu or runtime "
                             f"onnxruntime for {device}")
        index = int(device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        runtime = "onnxruntime"
    else:
        raise InputError(f"unknown device {device!r} for an ONNX model: auto, cpu or cuda[:i]")
    return OnnxDetector(path, providers=providers, threads=threads, runtime=runtime)


def resize_for_model(image: Tensor, size: int | Sequence[int], resize: str = "antialias",
                     fill: Sequence[int] | None = None) -> Tensor:
    """(3, h, w) uint8 -> (3, H, W) contiguous, as the exported graph expects it, the resize of
    :class:`multibox.data.transforms.EvalTransform` (``size``: S for S x S, or (H, W)):

    - "antialias" -> uint8 (antialiased bilinear of the uint8 image, each axis scaled on its own);
    - "torchvision" -> float32 in 0..255 (bilinear of the float image, no antialiasing; EvalTransform normalises
      first and resizes then, the same linear maps in the other order);
    - "letterbox" -> uint8: one scale for both axes, centred and padded with ``fill`` (the data's mean colour,
      :func:`multibox.core.resize.letterbox_fill`; :attr:`OnnxDetector.letterbox_fill`), see
      :func:`multibox.core.resize.letterbox_uint8`.
    """
    return _resized_view(image, as_hw(size), resize, fill).contiguous()


def resize_batch(images: Sequence[Tensor], size: int | Sequence[int], resize: str = "antialias",
                 fill: Sequence[int] | None = None) -> Tensor:
    """uint8 (3, h_i, w_i) images -> (N, 3, H, W) contiguous batch of :func:`resize_for_model` images, each written
    straight into the batch (no per-image copy, no stack)."""
    hw = as_hw(size)
    dtype = torch.float32 if resize == "torchvision" else torch.uint8
    batch = torch.empty((len(images), 3, *hw), dtype=dtype)
    for row, image in zip(batch, images):
        row.copy_(_resized_view(image, hw, resize, fill))
    return batch


def _resized_view(image: Tensor, hw: tuple[int, int], resize: str, fill: Sequence[int] | None) -> Tensor:
    """:func:`resize_for_model`'s values, in whatever memory layout came out of the resize. The stretching resizes
    run on the channels-last (h, w, 3) layout, which the decoders produce: bilinear of a float image is ~4x faster
    there than on planar channels, and gives the same values."""
    from torchvision.transforms.v2 import functional as F
    if resize not in RESIZE_MODES:
        raise InputError(f"unknown resize {resize!r}: {', '.join(RESIZE_MODES)}")
    if resize == "letterbox":
        if fill is None:
            raise InputError("resize letterbox needs the fill colour (letterbox_fill of the data's mean)")
        return letterbox_uint8(image, hw, fill)
    if tuple(image.shape[-2:]) == hw:
        return image.float() if resize == "torchvision" else image
    x = image[None].contiguous(memory_format=torch.channels_last)
    if resize == "torchvision":
        x = torch.nn.functional.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False)
    else:
        x = F.resize(x, list(hw), antialias=True)
    return x[0]


class OnnxDetector:
    """An exported multibox model run by onnxruntime or OpenVINO, with the API of
    :class:`multibox.inference.detector.Detector`.

    Args:
        path: the ``.onnx`` file written by :func:`multibox.export.onnx.export_onnx` (with or without postprocessing).
        providers: onnxruntime execution providers (default: CPU); a provider other than the CPU's means onnxruntime.
        threads: threads of one inference (0 = the runtime's default: one per physical core).
        spin: let onnxruntime's idle worker threads spin (lowest latency on a free machine; turn it off on shared
            cores, where spinning threads take CPU time from the others). OpenVINO's workers do not spin.
        runtime: "auto" | "onnxruntime" | "openvino" (see the module docstring).

    Attributes: ``runtime`` (the one that runs: "onnxruntime" or "openvino"), ``session`` (its compiled model: see
    :class:`OrtSession`), ``cfg``, ``class_names``, ``category_ids`` (the data's id of each label 1..C),
    ``image_hw`` (the graph's input (H, W)), ``image_size`` (``model.image_size`` as configured: S, or (H, W)),
    ``resize`` (the ``data.resize`` the input needs), ``letterbox_fill`` (the uint8 padding colour of a letterbox
    export, else None), ``has_postprocess``, ``max_detections`` (K of the graph), and ``postprocess``: for a graph
    without postprocessing, the PyTorch PostProcessor applied to its raw outputs (adjustable like the torch
    backend's; it maps the boxes back to each image's pixels itself); None otherwise.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0,
                 spin: bool = True, runtime: str = "auto"):
        self.path = Path(path)
        providers = list(providers or ["CPUExecutionProvider"])
        self.session = open_session(self.path, runtime, providers, threads, spin)
        self.runtime: str = self.session.name
        meta = self.session.metadata
        if "multibox.config" not in meta:
            raise OnnxModelError(f"{path}: not a multibox export (no multibox.config metadata; `multibox export` "
                                 f"writes it)")
        self.cfg = Config.from_dict(json.loads(meta["multibox.config"]))
        self.class_names: list[str] = json.loads(meta["multibox.class_names"])
        self.category_ids = _category_ids(meta, self.class_names, self.path)
        self.image_hw: tuple[int, int] = as_hw(self.cfg.model.image_size)
        size = self.cfg.model.image_size
        self.image_size: int | tuple[int, int] = int(size) if isinstance(size, int) else self.image_hw
        self.has_postprocess = meta.get("multibox.postprocess") == "1"
        self.max_detections = int(meta.get("multibox.max_detections", 0)) if self.has_postprocess else None
        self.input_name = self.session.input_name
        self.input_dtype = self.session.input_dtype
        self.resize = meta.get("multibox.resize", getattr(self.cfg.data, "resize", "antialias"))
        self.letterbox_fill = _letterbox_fill(meta, self.cfg, self.path) if self.resize == "letterbox" else None
        self.postprocess = None if self.has_postprocess else build_postprocessor(self.cfg)
        self.device = torch.device("cpu")
        self._warned: set[str] = set()

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """``{label: category id}``: what ``detections.json`` writes for each predicted label."""
        return label_to_category_id(self.category_ids)

    @property
    def score_threshold(self) -> float:
        """The model's own score threshold, which ``predict(score=None)`` applies (fixed in a graph with NMS)."""
        return self.postprocess.score_threshold if self.postprocess is not None else self.cfg.eval.score_threshold

    def run(self, batch: Tensor | np.ndarray) -> list[np.ndarray]:
        """(N, 3, H, W) resized images (uint8 or float, 0..255; :meth:`preprocess`) -> the graph's outputs, in its
        output order."""
        if isinstance(batch, Tensor):
            if self.input_dtype == np.uint8 and batch.dtype != torch.uint8:
                batch = batch.round().clamp(0, 255).to(torch.uint8)
            batch = batch.numpy()
        elif self.input_dtype == np.uint8 and batch.dtype != np.uint8:
            batch = np.clip(np.round(batch), 0, 255)
        return self.session.run(np.ascontiguousarray(batch, dtype=self.input_dtype))

    def preprocess(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 (3, h_i, w_i) images -> the (N, 3, H, W) graph input: :func:`resize_batch` with this model's
        size, resize and letterbox fill."""
        return resize_batch(images, self.image_hw, self.resize, self.letterbox_fill)

    def predict(self, images: ImageLike | Iterable[ImageLike], score: float | None = None, *, batch_size: int = 16,
                max_det: int | None = None) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (K, 4) xyxy in the image's pixels, ``scores`` (K,), ``labels`` (K,);
        the arguments of :meth:`multibox.inference.detector.Detector.predict`.

        A graph with NMS inside has its threshold and K fixed: a higher ``score`` or a smaller ``max_det`` gives
        exactly what the graph would give with them; a lower threshold or a larger cap cannot be honoured
        (logged once)."""
        check_limits(score, max_det)
        if self.has_postprocess:
            self._warn_unhonoured(score, max_det)
        else:
            postprocess = with_limits(self.postprocess, score, max_det)
        results: list[dict[str, Tensor]] = []
        for batch, sizes in image_batches(images, batch_size):
            outputs = self.run(self.preprocess(batch))
            if self.has_postprocess:
                results += [_limit(det, score, max_det) for det in
                            split_fixed_outputs(*outputs, sizes, self.image_hw, self.resize == "letterbox")]
            else:
                loc, cls_logits, anchors = (torch.from_numpy(o) for o in outputs)
                results += postprocess(loc, cls_logits, anchors, sizes)
        return results

    def _warn_unhonoured(self, score: float | None, max_det: int | None) -> None:
        """Log, once each, a threshold below or a cap above the ones fixed in the graph."""
        notes = []
        if score is not None and score < self.score_threshold:
            notes.append(f"score threshold {score} is below the exported model's {self.score_threshold}: detections "
                         f"between the two are not in its output")
        if max_det is not None and max_det > self.max_detections:
            notes.append(f"max_det {max_det} exceeds the exported model's {self.max_detections} detections per image")
        for note in notes:
            if note not in self._warned:
                self._warned.add(note)
                log.warning("%s: %s", self.path, note)


def _category_ids(meta: dict[str, str], class_names: list[str], path: Path) -> list[int]:
    """The export's ``multibox.category_ids`` (absent in exports written before they were stored: the fallback of
    :func:`multibox.data.categories.category_ids_of`)."""
    stored = meta.get("multibox.category_ids")
    if stored is not None:
        try:
            stored = json.loads(stored)
        except ValueError:
            raise OnnxModelError(f"{path}: metadata multibox.category_ids is not JSON") from None
    return category_ids_of(class_names, stored, source=f"{path}: metadata multibox.category_ids")


def _letterbox_fill(meta: dict[str, str], cfg: Config, path: Path) -> list[int]:
    """The padding colour of a letterbox export: its ``multibox.letterbox_fill`` (three uint8 values), else the
    one of its config's ``data.mean`` (:func:`multibox.core.resize.letterbox_fill`)."""
    stored = meta.get("multibox.letterbox_fill")
    if stored is None:
        return letterbox_fill(cfg.data.mean)
    try:
        fill = json.loads(stored)
    except ValueError:
        fill = None
    if not (isinstance(fill, list) and len(fill) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in fill)):
        raise OnnxModelError(f"{path}: metadata multibox.letterbox_fill is not three uint8 values: {stored!r}")
    return fill


def open_session(path: Path, runtime: str, providers: Sequence, threads: int,
                 spin: bool) -> "OrtSession | OpenVinoSession":
    """The compiled model of ``path`` in ``runtime`` ("auto": OpenVINO for the CPU where it is importable, else
    onnxruntime, see the module docstring): an :class:`OrtSession` or an :class:`OpenVinoSession`."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}: {', '.join(RUNTIMES)}")
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX model file")
    cpu_only = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in providers)
    if runtime == "openvino" and not cpu_only:
        raise InputError(f"{path}: onnxruntime providers {list(providers)} given with runtime openvino")
    runtime = resolve_runtime(runtime, cpu_only)
    if runtime == "openvino":
        return OpenVinoSession(path, threads)
    return OrtSession(path, providers, threads, spin)


def resolve_runtime(runtime: str, cpu_only: bool = True) -> str:
    """The runtime that runs for ``runtime`` ("auto": OpenVINO for the CPU where it is importable, else
    onnxruntime, see the module docstring)."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}: {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    if not cpu_only:
        return "onnxruntime"
    if _openvino() is None:
        log.debug("openvino is not importable; running with onnxruntime")
        return "onnxruntime"
    return "openvino"


class OrtSession:
    """An onnxruntime session of an ONNX file. ``name`` (the runtime's), ``input_name``, ``input_dtype`` (np.uint8 or
    np.float32), ``output_names`` (the graph's order), ``metadata`` (``metadata_props``), :meth:`run`."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: Sequence, threads: int = 0, spin: bool = True):
        ort = _onnxruntime()
        available = ort.get_available_providers()
        missing = [p for p in providers if (p if isinstance(p, str) else p[0]) not in available]
        if missing:
            raise InputError(f"onnxruntime has no {missing[0]!r} here (available: {', '.join(available)})")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as err:   # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) have no base
            raise OnnxModelError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
        image_input = self.session.get_inputs()[0]
        self.input_name = image_input.name
        self.input_dtype = np.uint8 if image_input.type == "tensor(uint8)" else np.float32
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """(N, 3, H, W) array of ``input_dtype`` -> the outputs, in ``output_names`` order."""
        return self.session.run(None, {self.input_name: batch})


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO for the CPU, with the interface of :class:`OrtSession`.

    Float layers run in float32 (``INFERENCE_PRECISION_HINT`` f32, not the bf16 that OpenVINO's CPU plugin
    defaults to where the processor has it); a QDQ graph's quantized layers run in int8 all the same. One stream
    with the latency hint: :meth:`run` is one synchronous inference of the whole batch (N is dynamic)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int = 0, precision: str = "f32"):
        ov = _openvino()
        if ov is None:
            raise MultiboxError("runtime openvino needs OpenVINO: pip install 'multibox[export]' "
                                "(or: pip install openvino)")
        try:
            import onnx   # the model's metadata, which OpenVINO does not keep
        except ImportError:
            raise MultiboxError("runtime openvino needs onnx: pip install 'multibox[export]' (or: pip install onnx)") \
                from None

        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            proto = onnx.load(str(path), load_external_data=False)
            compiled = _ov_core().compile_model(_ov_core().read_model(str(path)), "CPU", config)
        except Exception as err:   # onnx's DecodeError and OpenVINO's RuntimeError subclasses, no common base
            raise OnnxModelError(f"{path}: not a readable ONNX model (OpenVINO: {_first_line(err)})") from None
        self.metadata = {entry.key: entry.value for entry in proto.metadata_props}   # OpenVINO drops them
        self.compiled, self.request = compiled, compiled.create_infer_request()
        self.input_name = compiled.inputs[0].get_any_name()
        self.input_dtype = np.uint8 if compiled.inputs[0].get_element_type() == ov.Type.u8 else np.float32
        self.output_names = [value.name for value in proto.graph.output]
        by_name = {name: port for port in compiled.outputs for name in port.get_names()}
        self._outputs = [by_name[name] for name in self.output_names]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """(N, 3, H, W) array of ``input_dtype`` -> the outputs, in ``output_names`` order (copies: the request
        reuses its buffers)."""
        self.request.infer({0: batch}, share_inputs=True)
        return [self.request.get_tensor(port).data.copy() for port in self._outputs]

    def layer_precisions(self, layer_type: str = "Convolution") -> Counter:
        """``{precision: count}`` of the compiled layers of ``layer_type`` ("f32", "u8", "i8", "bf16", ...): what
        actually runs (a QDQ graph's quantized convolutions: "u8"/"i8"; a float graph's: "f32")."""
        counts: Counter = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == layer_type:
                counts[info["runtimePrecision"].astype(str)] += 1
        return counts


@functools.lru_cache(maxsize=1)
def _ov_core():
    """One OpenVINO Core per process (it holds the plugins and their thread pools)."""
    return _openvino().Core()


def _first_line(err: Exception) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), or its type's name."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:300]


def _limit(det: dict[str, Tensor], score: float | None, max_det: int | None) -> dict[str, Tensor]:
    """One image's detections (sorted by score) above ``score`` and at most ``max_det`` of them."""
    n = len(det["scores"]) if score is None else int((det["scores"] > score).sum())
    n = n if max_det is None else min(n, max_det)
    return {key: value[:n] for key, value in det.items()}


def split_fixed_outputs(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                        sizes: Sequence[tuple[int, int]], input_hw: Sequence[int] | None = None,
                        letterbox: bool = False) -> list[dict[str, Tensor]]:
    """Fixed-size graph outputs -> per-image dicts with boxes in each image's pixels.

    Args:
        boxes: (N, K, 4) xyxy normalised to the (H, W) input; scores: (N, K); labels: (N, K); counts: (N,).
        sizes: N (h, w) image sizes.
        input_hw, letterbox: the graph's input and whether the images were letterboxed into it; the boxes map back
            with :func:`multibox.core.resize.detections_to_pixels`, as :class:`~multibox.core.postprocess
            .PostProcessor`'s do (stretched: times (w, h, w, h); letterboxed: clipped to the image, those wholly in
            the padding dropped).
    """
    if letterbox and input_hw is None:
        raise InputError("split_fixed_outputs: letterboxed boxes need the input (H, W) to map back")
    out = []
    for i, hw in enumerate(sizes):
        n = int(counts[i])
        pixels, keep = detections_to_pixels(torch.from_numpy(boxes[i, :n].copy()), torch.zeros(n, dtype=torch.long),
                                            [hw], input_hw or (1, 1), letterbox)
        out.append({"boxes": pixels[keep], "scores": torch.from_numpy(scores[i, :n].copy())[keep],
                    "labels": torch.from_numpy(labels[i, :n].astype(np.int64))[keep]})
    return out
