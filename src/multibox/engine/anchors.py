"""A new run's default boxes: ``anchors.fit`` on the training split, and the run's record of how they fit.

Rank 0 decides and fits; every rank then takes its boxes (the same shapes on every process), or rank 0's error.
Fitted boxes go into ``cfg.anchors.sizes`` before the model is built, so the run's ``config.yaml`` and every
checkpoint carry them, and predict, eval, export and resume rebuild exactly these boxes. Rank 0 analyses the boxes
before and after fitting (:mod:`multibox.evaluation.anchors`) and, once the run has started (a run refused while
it is built leaves no folder), writes ``anchors.json`` and ``anchors.png``, which the run's ``index.html`` shows.
"""
from __future__ import annotations

import logging

from multibox import distributed as mbdist
from multibox.config import Config
from multibox.core.anchor_fit import sample_rows
from multibox.data.anchor_fitting import describe_fit, fit_anchors
from multibox.data.build import DataSplits
from multibox.data.objects import letterbox_input, object_table
from multibox.errors import MultiboxError
from multibox.evaluation.anchors import AnchorReport

logger = logging.getLogger("multibox.train")

# Images of the training split the run's record matches in full (the fit itself uses every image's objects).
RECORD_IMAGES = 2000


def fit_run_anchors(cfg: Config, splits: DataSplits, env: mbdist.DistEnv,
                    fine_tuning: bool) -> AnchorReport | None:
    """Apply ``anchors.fit`` to ``cfg`` (``anchors.sizes`` set when fitted). ``fine_tuning``: the run starts from
    a detector's weights. Returns the run's record on rank 0 (None elsewhere), to write once the run starts."""
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


def _decide(cfg: Config, splits: DataSplits, fine_tuning: bool) -> AnchorReport:
    """Rank 0: the decision on every training object, and its analysis on up to :data:`RECORD_IMAGES` images."""
    indices = splits.train.indices
    table = object_table(splits.train.dataset, indices, letterbox_input(cfg))
    result = fit_anchors(cfg, table, fine_tuning=fine_tuning)
    logger.info(describe_fit(result))
    recorded = [indices[i] for i in sample_rows(len(indices), RECORD_IMAGES, cfg.train.seed).tolist()]
    return AnchorReport.of(cfg, table.of_images(recorded), result)
