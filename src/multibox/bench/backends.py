"""``multibox bench --backends``: one table of deployment backends, each against torchvision's eager fp32 model on
the same weights, measured in the same process, the systems taking turns (:func:`multibox.bench.suite.paired`).

Backends (:data:`multibox.bench.BACKENDS`):

- ``torch``: multibox's PyTorch :class:`~multibox.inference.detector.Detector`, eager fp32;
- ``torch-bf16``: the same under CPU autocast to bfloat16 (skipped where the CPU has no native bf16);
- ``onnx`` / ``onnx-int8``: the float ONNX export (:func:`multibox.export.onnx.export_onnx`) and its static INT8
  version (:mod:`multibox.export.quantize`) run by onnxruntime;
- ``openvino`` / ``openvino-int8``: the same two files run by OpenVINO (``OnnxDetector(runtime="openvino")``).

Every row has: ``ap`` (COCO AP@[.5:.95] on DATA's evaluation split through the backend's own ``predict``, when
DATA is given; None otherwise), ``ms_b1`` (ms per image, batch 1) and ``img_s_b8`` (images/s, batch 8), both end to
end from 8 JPEG files of 640 x 480 (decoding, preprocessing and postprocessing included), ``size_mb`` (the model
file: the ONNX file, or the float32 weights of a PyTorch model), ``ratio_b1`` / ``ratio_b8`` (speed over
torchvision's: > 1 is faster) and ``stages_ms``: ms per image at batch 1 in ``decode`` (read + JPEG decode),
``preprocess`` (resize, normalise, batch), ``graph`` (the network; an ONNX graph also decodes boxes and runs NMS
inside it) and ``postprocess`` (box decoding + NMS for PyTorch; unpadding and scaling for ONNX). A backend that
cannot run here has ``skipped``: the one-line reason, and no numbers. Every timing of every system (batch 1,
batch 8, the stages) is taken in one loop where they take turns, so that the ratios hold on a shared machine.

INT8: with DATA (and so a checkpoint) :func:`multibox.export.quantize.export_int8` calibrates on DATA and gates on
AP (a refusal skips both INT8 rows with its reason, both AP numbers included); without DATA the float export is
quantized on the bench's 8 JPEGs, ungated: a speed and size measurement only.

Without a checkpoint the weights are random: the arch's torchvision twin's (:data:`~multibox.bench.suite.
TORCHVISION_TWINS`) converted to multibox's layout, or multibox's own initialisation for archs without a twin
(tiny: the reference is torchvision's ``SSD`` around the tiny trunk, random weights of its own). Random weights are
the worst case for NMS (nearly every default box passes the score threshold), the same work in every backend.
"""
from __future__ import annotations

import importlib
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from multibox.bench import BACKENDS
from multibox.config import Config
from multibox.errors import InputError, MultiboxError

logger = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "graph", "postprocess")
NUM_JPEGS = 8
JPEG_HW = (480, 640)
FIELDS = ("backend", "runtime", "ap", "ms_b1", "img_s_b8", "size_mb", "ratio_b1", "ratio_b8", "stages_ms",
          "skipped")


@dataclass
class Subject:
    """The model under test: multibox's config, weights and classes, and torchvision's reference model.
    ``same_weights``: the reference computes the same function (a twin arch), so its AP is comparable."""

    cfg: Config
    state_dict: dict[str, Tensor]
    class_names: list[str]
    category_ids: list[int] | None
    reference: nn.Module
    same_weights: bool
    checkpoint: Path | None = None
    weights: str = "random"


@dataclass
class Candidate:
    """A backend ready to run: its detector (``predict(images, batch_size=...)``), model file and size."""

    name: str
    runtime: str
    detector: object
    size_mb: float
    staged: Callable[[list[str]], dict[str, float]] = field(repr=False, default=None)


# ------------------------------------------------------------------------------------------------ the subject

def _state_mb(state: dict[str, Tensor]) -> float:
    return sum(t.numel() * 4 for t in state.values() if t.is_floating_point()) / 1e6


def _reference_state(arch: str, ours: dict[str, Tensor], theirs: nn.Module) -> dict[str, Tensor]:
    """multibox's weights in torchvision's layout for a twin arch: the interop name pairs, reversed (a pure rename:
    the layouts have the same shapes)."""
    from multibox.interop.torchvision import torchvision_ssd300_pairs, torchvision_ssdlite_pairs

    pairs = torchvision_ssd300_pairs() if arch == "ssd300_vgg16" else torchvision_ssdlite_pairs(list(ours))
    return {their_name: ours[our_name] for our_name, their_name in pairs}


def build_subject(arch: str, preset: str, checkpoint: str | None) -> Subject:
    """The weights to benchmark: a checkpoint's (its own arch and config; torchvision's twin gets the same weights
    where there is one) or random ones (see the module docstring)."""
    from multibox.bench.suite import NUM_CLASSES, TORCHVISION_TWINS, paper_config, torchvision_ssd, twin_weights
    from multibox.models import build_model

    cpu = torch.device("cpu")
    if checkpoint is None:
        cfg = paper_config(preset, arch)
        theirs = torchvision_ssd(cpu, arch).eval()
        state = twin_weights(arch, theirs)
        if state is None:
            state = build_model(cfg).state_dict()
        names = ["background"] + [f"c{i}" for i in range(1, NUM_CLASSES + 1)]
        return Subject(cfg, state, names, None, theirs, arch in TORCHVISION_TWINS)
    from multibox.checkpoint import load_checkpoint
    from multibox.data.categories import category_ids_of

    payload = load_checkpoint(checkpoint)
    cfg = Config.from_dict(payload["config"])
    cfg.eval.precision, cfg.eval.compile = "fp32", False
    names = list(payload["class_names"])
    ids = category_ids_of(names, payload.get("category_ids"), source=str(checkpoint))
    arch = cfg.model.arch
    if arch in TORCHVISION_TWINS:
        theirs = _torchvision_twin(arch, len(names))
        theirs.load_state_dict(_reference_state(arch, payload["model"], theirs))
    else:   # no twin: the bench's usual reference, on random weights of its own
        theirs = torchvision_ssd(cpu, arch).eval()
    return Subject(cfg, payload["model"], names, ids, theirs.eval(), arch in TORCHVISION_TWINS, Path(checkpoint),
                   f"checkpoint {checkpoint}")


def _torchvision_twin(arch: str, num_classes_with_background: int) -> nn.Module:
    from torchvision.models.detection import ssd300_vgg16, ssdlite320_mobilenet_v3_large

    build = ssd300_vgg16 if arch == "ssd300_vgg16" else ssdlite320_mobilenet_v3_large
    return build(weights=None, weights_backbone=None, num_classes=num_classes_with_background)


# ------------------------------------------------------------------------------------------------ availability

def _missing_module(*names: str) -> str | None:
    """The first of ``names`` that cannot be imported, or None."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _bf16_reason() -> str | None:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None or not check():
        return "this CPU has no native bf16 (AVX512-BF16 or AMX): autocast to bf16 would only be slower"
    return None


def skip_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here (one line), or None when it can."""
    needs = {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
    family = name.removesuffix("-int8")
    if name == "torch-bf16":
        return _bf16_reason()
    if family in needs:
        missing = _missing_module(*needs[family])
        if missing:
            return f"{missing} is not installed (pip install 'multibox[export]')"
    return None


def parse_backends(text: str) -> list[str]:
    """``"torch,onnx"`` -> ["torch", "onnx"]; :class:`InputError` naming any unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise InputError(f"unknown --backends {unknown or text!r}; choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------ the backends

class _SkipBackend(MultiboxError):
    """A backend that cannot be built here (its one-line reason)."""


class _Clock:
    """Adds the seconds since the previous call to ``totals[stage]``."""

    def __init__(self, totals: dict[str, float]):
        self.totals, self.last = totals, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.totals[stage] += now - self.last
        self.last = now


def _staged(preprocess: Callable, graph: Callable, postprocess: Callable) -> Callable[[list[str]], dict[str, float]]:
    """``predict(paths, batch_size=1)`` split in :data:`STAGES` (seconds, summed over the paths): decode, then
    ``preprocess([image])``, ``graph(batch)``, ``postprocess(outputs, sizes)`` -- the steps of the backend's own
    predict."""
    from multibox.inference.detector import as_uint8_chw

    @torch.no_grad()
    def run(paths: list[str]) -> dict[str, float]:
        totals = dict.fromkeys(STAGES, 0.0)
        for path in paths:
            clock = _Clock(totals)
            image = as_uint8_chw(path)
            clock("decode")
            batch = preprocess([image])
            clock("preprocess")
            outputs = graph(batch)
            clock("graph")
            postprocess(outputs, [tuple(image.shape[-2:])])
            clock("postprocess")
        return totals

    return run


def _staged_torch(detector) -> Callable[[list[str]], dict[str, float]]:
    """:func:`_staged` of a PyTorch Detector."""
    from multibox.core.postprocess import detections_to_cpu
    from multibox.runtime import autocast

    def graph(batch):
        with autocast(detector.device, detector.dtype):
            return detector.model(batch)

    def postprocess(outputs, sizes):
        loc, cls = outputs
        detections_to_cpu(detector.postprocess(loc, cls, detector.model.anchors_cxcywh, sizes))

    return _staged(detector.preprocess, graph, postprocess)


def _staged_onnx(detector) -> Callable[[list[str]], dict[str, float]]:
    """:func:`_staged` of an OnnxDetector, preprocessed by its ``preprocess`` and mapped back to the image's
    pixels, as its predict is."""
    from multibox.inference.onnx import split_fixed_outputs

    def postprocess(outputs, sizes):
        if detector.has_postprocess:
            split_fixed_outputs(*outputs, sizes, detector.image_hw, detector.resize == "letterbox")
        else:
            detector.postprocess(*(torch.from_numpy(o) for o in outputs), sizes)

    return _staged(detector.preprocess, detector.run, postprocess)


def _torch_candidate(name: str, subject: Subject) -> Candidate:
    from multibox.inference.detector import Detector
    from multibox.models import model_from_state_dict

    cfg = Config.from_dict(subject.cfg.to_dict())
    cfg.eval.precision = "bf16" if name == "torch-bf16" else "fp32"
    detector = Detector(model_from_state_dict(cfg, subject.state_dict), cfg, subject.class_names,
                        torch.device("cpu"), subject.category_ids)
    return Candidate(name, f"torch eager {cfg.eval.precision}", detector, _state_mb(subject.state_dict),
                     _staged_torch(detector))


def write_jpegs(folder: Path, count: int = NUM_JPEGS, seed: int = 2) -> list[str]:
    """``count`` 640 x 480 JPEG files (quality 90) of smooth random pictures with a little grain: photo-like
    entropy, so that decoding costs what it costs on photos (white noise decodes several times slower)."""
    from torchvision.io import encode_jpeg

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        coarse = torch.rand(1, 3, JPEG_HW[0] // 16, JPEG_HW[1] // 16, generator=g) * 255
        image = nn.functional.interpolate(coarse, size=JPEG_HW, mode="bilinear", align_corners=False)[0]
        image = (image + torch.randn(image.shape, generator=g) * 6).clamp(0, 255).to(torch.uint8)
        path = folder / f"{i}.jpg"
        path.write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())
        paths.append(str(path))
    return paths


def _calibration_batches(float_path: Path, paths: list[str]) -> list:
    """The bench's JPEGs as the float graph's inputs, one image per batch."""
    from multibox.export.quantize import calibration_batches
    from multibox.inference.detector import as_uint8_chw
    from multibox.inference.onnx import OnnxDetector

    return calibration_batches([as_uint8_chw(p) for p in paths], OnnxDetector(float_path, runtime="onnxruntime"))


class _ModelFiles:
    """The float export and its INT8 version, each made once and shared by onnxruntime and OpenVINO; a failure to
    make one is remembered and gives every backend of that file the same reason."""

    def __init__(self, subject: Subject, folder: Path, jpegs: list[str], data: str | None):
        self.subject, self.folder, self.jpegs, self.data = subject, folder, jpegs, data
        self.made: dict[str, Path | str] = {}

    def get(self, kind: str) -> Path:
        if kind not in self.made:
            logger.info("backends: making the %s model under %s", kind, self.folder)
            try:
                self.made[kind] = self._float() if kind == "float" else self._int8()
            except MultiboxError as err:   # includes the INT8 accuracy gate's refusal: its reason is the row's
                self.made[kind] = f"{kind} export refused: {err}"
            except (ValueError, RuntimeError) as err:   # the exporter's or the quantizer's failure: one row, logged
                logger.warning("%s export failed", kind, exc_info=True)
                self.made[kind] = f"{kind} export failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if isinstance(self.made[kind], str):
            raise _SkipBackend(self.made[kind])
        return self.made[kind]

    def _float(self) -> Path:
        from multibox.export.onnx import export_onnx
        from multibox.models import model_from_state_dict

        s = self.subject
        return export_onnx(model_from_state_dict(s.cfg, s.state_dict), s.cfg, s.class_names,
                           self.folder / "model.onnx", category_ids=s.category_ids)

    def _int8(self) -> Path:
        """Gated against DATA when it is given (a checkpoint then exists); else calibrated on the bench's JPEGs."""
        from multibox.export import quantize

        out = self.folder / "model-int8.onnx"
        if self.data is not None and self.subject.checkpoint is not None:
            # calibrated on DATA's training images, gated on its evaluation split: the split the rows' AP is of
            report = quantize.export_int8(self.subject.checkpoint, out, self.data)
            logger.info("int8 export %s: AP float %s, int8 %s (gated: %s), %d layers kept in float", report.path,
                        _ap_text(report.ap_float), _ap_text(report.ap_int8), report.gated, len(report.keep_float))
            return Path(report.path)
        float_path = self.get("float")
        return Path(quantize.quantize_onnx(float_path, out, _calibration_batches(float_path, self.jpegs)))


def _ap_text(ap: float | None) -> str:
    return "-" if ap is None else f"{ap:.4f}"


def _onnx_candidate(name: str, files: _ModelFiles, threads: int) -> Candidate:
    from multibox.inference.onnx import OnnxDetector

    path = files.get("int8" if name.endswith("-int8") else "float")
    runtime = "openvino" if name.startswith("openvino") else "onnxruntime"
    detector = OnnxDetector(path, threads=threads, runtime=runtime)
    label = f"{detector.runtime} {'int8' if name.endswith('-int8') else 'fp32'}"
    return Candidate(name, label, detector, path.stat().st_size / 1e6, _staged_onnx(detector))


def build_candidates(names: list[str], subject: Subject, files: _ModelFiles, threads: int
                     ) -> tuple[list[Candidate], dict[str, str]]:
    """(the backends that run here, {backend: why not} for the others)."""
    candidates, skipped = [], {}
    for name in names:
        reason = skip_reason(name)
        if reason is None:
            try:
                candidates.append(_torch_candidate(name, subject) if name.startswith("torch")
                                  else _onnx_candidate(name, files, threads))
            except _SkipBackend as err:
                reason = str(err)
        if reason is not None:
            skipped[name] = reason
            logger.info("backend %s skipped: %s", name, reason)
    return candidates, skipped


# ------------------------------------------------------------------------------------------------ measurements

class TorchvisionPredictor:
    """torchvision's detector with the ``predict(images, batch_size=...)`` of multibox's: uint8 (3, H, W) images
    (or paths) -> per-image ``boxes`` (K, 4) xyxy pixels, ``scores``, ``labels`` (its model resizes by itself)."""

    def __init__(self, model: nn.Module, class_names: list[str], category_ids: list[int] | None):
        self.model, self.class_names, self.category_ids = model.eval(), class_names, category_ids

    @torch.no_grad()
    def predict(self, images, batch_size: int = 8) -> list[dict[str, Tensor]]:
        from torchvision.io import decode_jpeg, read_file

        images = [decode_jpeg(read_file(im)) if isinstance(im, str) else im for im in images]
        results = []
        for start in range(0, len(images), batch_size):
            out = self.model([im.float() / 255.0 for im in images[start:start + batch_size]])
            results += [{k: v.cpu() for k, v in d.items()} for d in out]
        return results


def timed_in_turns(detectors: dict[str, object], candidates: list[Candidate], paths: list[str], warmup: int,
                   iters: int) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """({system: median s of predict(paths, batch_size=1)}, the same at batch 8, {backend: {stage: median ms per
    image at batch 1}}), every measurement of every system taking turns in one :func:`~multibox.bench.suite.paired`
    loop: a load change on a shared machine moves them all alike, the stages included."""
    from multibox.bench.suite import paired

    fns: dict[str, Callable[[], object]] = {}
    for name, detector in detectors.items():
        for batch in (1, NUM_JPEGS):
            fns[f"{name} b{batch}"] = lambda d=detector, b=batch: d.predict(paths, batch_size=b)
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in candidates}
    for c in candidates:
        fns[f"{c.name} stages"] = lambda c=c: runs[c.name].append(c.staged(paths))
    seconds = paired(fns, torch.device("cpu"), warmup, iters)
    stages = {name: {stage: round(1000 * statistics.median(r[stage] for r in timed[warmup:]) / len(paths), 2)
                     for stage in STAGES} for name, timed in runs.items()}
    return ({n: seconds[f"{n} b1"] for n in detectors}, {n: seconds[f"{n} b{NUM_JPEGS}"] for n in detectors},
            stages)


def eval_splits(subject: Subject, data: str):
    """(DATA's splits under the subject's config, that config): ``data.path`` = DATA, so the evaluation split is
    its own validation split or the held-out part of it, as training on DATA draws it."""
    from multibox.data.build import build_splits

    cfg = Config.from_dict(subject.cfg.to_dict())
    cfg.data.path, cfg.data.val_path = data, None
    return build_splits(cfg), cfg


def detector_ap(detector, splits, cfg: Config) -> float:
    """COCO AP@[.5:.95] of ``detector.predict`` on ``splits.val``'s decoded images, every backend through its own
    preprocessing (:func:`multibox.inference.onnx_eval.evaluate_onnx`, batched and scored as ``cfg.eval`` says);
    labels mapped to the data's category ids by (name, id)."""
    from multibox.evaluation.evaluate import category_map_by_name
    from multibox.inference.onnx_eval import evaluate_onnx

    mapping = category_map_by_name(detector.class_names, splits, detector.category_ids)
    return round(float(evaluate_onnx(detector, splits, label_to_category_id=mapping, cfg=cfg).stats["AP"]), 4)


def _row(name: str, runtime: str, seconds_b1: float, seconds_b8: float, reference: dict, **extra) -> dict:
    ms_b1 = 1000 * seconds_b1 / NUM_JPEGS
    img_s_b8 = NUM_JPEGS / seconds_b8
    ratio_b1 = reference["ms_b1"] / ms_b1 if reference else 1.0
    ratio_b8 = img_s_b8 / reference["img_s_b8"] if reference else 1.0
    return {"backend": name, "runtime": runtime, "ms_b1": round(ms_b1, 2), "img_s_b8": round(img_s_b8, 3),
            "ratio_b1": round(ratio_b1, 2), "ratio_b8": round(ratio_b8, 2), "skipped": None, **extra}


def _skipped_row(name: str, reason: str) -> dict:
    return {**dict.fromkeys(FIELDS), "backend": name, "skipped": reason}


def _measure(subject: Subject, candidates: list[Candidate], jpegs: list[str], warmup: int, iters: int,
             data: str | None) -> tuple[dict, list[dict]]:
    """(torchvision's row, one row per candidate): every timing interleaved with torchvision's."""
    reference = TorchvisionPredictor(subject.reference, subject.class_names, subject.category_ids)
    detectors = {"torchvision": reference, **{c.name: c.detector for c in candidates}}
    logger.info("backends: timing %s in turns, %d repetitions after %d warm-up", ", ".join(detectors), iters,
                warmup)
    b1, b8, stages = timed_in_turns(detectors, candidates, jpegs, warmup, iters)
    aps: dict[str, float] = {}
    if data is not None:
        splits, eval_cfg = eval_splits(subject, data)
        for name, detector in detectors.items():
            if name != "torchvision" or subject.same_weights:   # else its AP says nothing of these weights
                aps[name] = detector_ap(detector, splits, eval_cfg)
    ref = _row("torchvision", "torchvision eager fp32", b1["torchvision"], b8["torchvision"], {},
               ap=aps.get("torchvision"), size_mb=round(_state_mb(subject.reference.state_dict()), 1),
               stages_ms=None)
    rows = [_row(c.name, c.runtime, b1[c.name], b8[c.name], ref, ap=aps.get(c.name), size_mb=round(c.size_mb, 1),
                 stages_ms=stages[c.name]) for c in candidates]
    return ref, rows


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("onnxruntime", "openvino"):
        try:
            parts.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            parts.append(f"no {name}")
    return ", ".join(parts)


def bench_backends(names: str | list[str], arch: str = "ssd300_vgg16", preset: str | None = None,
                   checkpoint: str | None = None, data: str | None = None, iters: int = 3, warmup: int = 1,
                   workdir: str | None = None) -> dict:
    """Measure ``names`` (see the module docstring) on the CPU with torch's current thread count (onnxruntime and
    OpenVINO get as many). Returns ``{"title", "reference": torchvision's row, "rows": one per backend in the
    order asked (skipped ones included)}``, each row with the keys of :data:`FIELDS`.

    ``data`` (AP of every backend) needs a trained ``checkpoint``: :class:`InputError` otherwise."""
    from multibox.bench.suite import arch_preset, reference_name

    if data is not None and checkpoint is None:
        raise InputError("--data measures AP, which needs a trained --checkpoint")
    names = parse_backends(names) if isinstance(names, str) else list(names)
    subject = build_subject(arch, preset or arch_preset(arch), checkpoint)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        jpegs = write_jpegs(Path(tmp) / "jpegs")
        candidates, skipped = build_candidates(names, subject, _ModelFiles(subject, Path(tmp), jpegs, data), threads)
        ref, measured = _measure(subject, candidates, jpegs, warmup, iters, data)
    by_name = {r["backend"]: r for r in measured}
    rows = [by_name[n] if n in by_name else _skipped_row(n, skipped[n]) for n in names]
    for r in [ref, *rows]:
        logger.info(format_backend_line(r))
    arch = subject.cfg.model.arch if checkpoint else arch
    title = (f"multibox bench --backends on cpu, {threads} thread{'' if threads == 1 else 's'} ({_versions()}): "
             f"arch {arch}, {subject.weights} weights, end to end from {NUM_JPEGS} JPEGs of {JPEG_HW[1]}x"
             f"{JPEG_HW[0]}, against torchvision's {reference_name(arch)} eager fp32 on "
             f"{'the same weights' if subject.same_weights else 'random weights of its own'}, timed in turns")
    return {"title": title, "reference": ref, "rows": rows}


# ------------------------------------------------------------------------------------------------ formatting

def format_backend_line(r: dict) -> str:
    """One row as a log line."""
    if r["skipped"]:
        return f"backend {r['backend']}: skipped ({r['skipped']})"
    ap = "" if r["ap"] is None else f"AP {r['ap']:.4f}, "
    return (f"backend {r['backend']} ({r['runtime']}): {ap}{r['ms_b1']:.1f} ms/img at batch 1 ({r['ratio_b1']:.2f}x), "
            f"{r['img_s_b8']:.2f} img/s at batch 8 ({r['ratio_b8']:.2f}x), {r['size_mb']:.1f} MB")


def format_backends_table(report: dict) -> str:
    """The table of :func:`bench_backends`, then the stage breakdown of every multibox backend."""
    head = f"{'backend':14s} {'runtime':22s} {'AP':>7s} {'ms b1':>8s} {'ratio':>6s} {'img/s b8':>9s} {'ratio':>6s} " \
           f"{'MB':>7s}"
    lines = [report["title"], head]
    for r in [report["reference"], *report["rows"]]:
        if r["skipped"]:
            lines.append(f"{r['backend']:14s} skipped: {r['skipped']}")
            continue
        ap = "-" if r["ap"] is None else f"{r['ap']:.4f}"
        lines.append(f"{r['backend']:14s} {r['runtime']:22s} {ap:>7s} {r['ms_b1']:8.1f} {r['ratio_b1']:5.2f}x "
                     f"{r['img_s_b8']:9.2f} {r['ratio_b8']:5.2f}x {r['size_mb']:7.1f}")
    lines += ["", "where the time goes: ms per image at batch 1 (an ONNX graph decodes boxes and runs NMS inside; "
                  "its postprocess only unpads and scales)",
              f"{'backend':14s} " + " ".join(f"{s:>11s}" for s in STAGES) + f" {'sum':>8s} {'e2e':>8s}"]
    for r in report["rows"]:
        if not r["skipped"]:
            stages = r["stages_ms"]
            lines.append(f"{r['backend']:14s} " + " ".join(f"{stages[s]:11.1f}" for s in STAGES)
                         + f" {sum(stages.values()):8.1f} {r['ms_b1']:8.1f}")
    return "\n".join(lines)


def backends_report(options) -> dict:
    """:func:`bench_backends` for ``multibox bench``'s :class:`~multibox.bench.suite.BenchOptions` (resolved), with
    its thread count (``options.threads``; the process's setting is restored afterwards). Always on the CPU,
    whatever ``options.device`` the other lines run on: it measures CPU deployment."""
    from multibox.runtime import cpu_threads

    with cpu_threads(options.threads):
        return bench_backends(options.backends, options.arch, options.preset, options.checkpoint, options.data,
                              options.iters, options.warmup, options.workdir)
