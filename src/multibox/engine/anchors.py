"""A new run's default boxes: ``anchors.fit`` on the training split, and the run's record of how they fit.

Rank 0 decides and fits; every rank then takes its boxes (the same shapes on every process), or rank 0's error.
Fitted boxes go into ``cfg.anchors.sizes`` before the model is built, so the run's ``config.yaml`` and every
checkpoint carry them, and predict, eval, export and resume rebuild exactly these boxes. Rank 0 analyses the boxes
before and after fitting (:mod:`multibox.evaluation.anchors`) and, once the run has started (a run refused while
it is built leaves no folder), writes ``anchors.json`` and ``anchors.png``, which the run's ``index.html`` shows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from multibox import distributed as mbdist
from multibox.config import Config
from multibox.core.anchor_fit import sample_rows
from multibox.core.anchors import anchor_spec
from multibox.data.anchor_fitting import describe_fit, fit_anchors
from multibox.data.build import DataSplits
from multibox.data.objects import ObjectTable, object_table
from multibox.errors import MultiboxError
from multibox.evaluation.anchors import AnchorAnalysis, analyse_anchors, anchor_record, write_anchor_record

logger = logging.getLogger("multibox.train")

# Images of the training split the run's record matches in full (the fit itself uses every image's objects).
RECORD_IMAGES = 2000


@dataclass(frozen=True)
class RunRecord:
    """A run's ``anchors.json`` / ``anchors.png``, computed before the model is built, written once it starts."""

    record: dict
    table: ObjectTable
    before: AnchorAnalysis
    after: AnchorAnalysis | None

    def write(self, out: Path) -> None:
        write_anchor_record(out, self.record, self.table, self.before, self.after)


def fit_run_anchors(cfg: Config, splits: DataSplits, env: mbdist.DistEnv, fine_tuning: bool) -> RunRecord | None:
    """Apply ``anchors.fit`` to ``cfg`` (``anchors.sizes`` set when fitted). ``fine_tuning``: the run starts from
    a detector's weights. Returns the run's record on rank 0 (None elsewhere)."""
    pending, failure = None, None
    if env.is_main:
        try:
            pending = _decide(cfg, splits, fine_tuning)
        except MultiboxError as err:
            failure = err
    decided = (pending.record["fitted"], pending.record["sizes"]) if pending is not None else None
    if env.distributed:
        decided, failure = mbdist.broadcast_object((decided, failure))
    if failure is not None:
        raise failure
    fitted, sizes = decided
    if fitted:
        cfg.anchors.sizes = sizes
    return pending


def _decide(cfg: Config, splits: DataSplits, fine_tuning: bool) -> RunRecord:
    """Rank 0: the decision on every training object, and its analysis on up to :data:`RECORD_IMAGES` images."""
    dataset, indices = splits.train.dataset, splits.train.indices
    result = fit_anchors(cfg, object_table(dataset, indices), fine_tuning=fine_tuning)
    logger.info(describe_fit(result))
    table = object_table(dataset, [indices[i] for i in sample_rows(len(indices), RECORD_IMAGES,
                                                                   cfg.train.seed).tolist()])
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    before = analyse_anchors(table, cfg, spec)
    after = analyse_anchors(table, cfg, result.spec(spec)) if result.fitted else None
    return RunRecord(anchor_record(cfg, result, before, after), table, before, after)
