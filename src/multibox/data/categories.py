"""Which ``category_id`` each model label stands for: the one home of the label -> category-id map.

A model predicts labels 1..C (0 = background): label i is the data's i-th category by increasing id
(:class:`multibox.data.coco.DetectionDataset`). Every COCO results file (``detections.json`` of ``multibox
predict``, the evaluation's results) names the data's own ``category_id`` instead, so the map travels with the
model:

* a checkpoint holds ``category_ids``, C integers beside ``class_names`` (``category_ids[i - 1]`` is label i's id):
  training writes its data's, ``multibox import-weights --from torchvision`` COCO's 91-slot layout (label = COCO
  category id, the unused "N/A" slots included, as torchvision itself reports them);
* an exported ONNX model holds the same list as JSON in its metadata (``multibox.category_ids``);
* :func:`category_ids_of` reads it back (checked), and for a checkpoint or export written before the ids were
  stored falls back to the COCO 2017 ids when the class names are COCO's 80 in id order (the MindSpore tutorial's
  list, a multibox run on COCO 2017), else to the labels themselves (1..C: right for torchvision's 91-slot layout,
  the synthetic and VOC data; not for a custom set whose ids are not 1..C, whose old checkpoints name labels).

Evaluating a model on data whose categories are not its own matches them by (name, id), then by name
(:func:`match_categories`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from multibox.errors import MultiboxError

__all__ = ["COCO_CATEGORIES", "CategoryIdsError", "category_ids_of", "label_to_category_id", "match_categories"]

#: COCO 2017's 80 detection categories, (category id, name), by increasing id (ids 12, 26, 29, 30, 45, 66, 68, 69,
#: 71 and 83 are unused).
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"),
    (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"),
    (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"),
    (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"),
    (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)


class CategoryIdsError(MultiboxError, ValueError):
    """Stored category ids that do not fit the class names (not C distinct integers)."""


def label_to_category_id(category_ids: Sequence[int]) -> dict[int, int]:
    """``[id of label 1, ..., id of label C]`` -> ``{label: category id}``."""
    return {label: int(cid) for label, cid in enumerate(category_ids, start=1)}


def _fallback_ids(class_names: Sequence[str]) -> list[int]:
    """The ids of a model stored without them: COCO's when its classes are COCO's 80 in id order, else 1..C."""
    if list(class_names[1:]) == [name for _, name in COCO_CATEGORIES]:
        return [cid for cid, _ in COCO_CATEGORIES]
    return list(range(1, len(class_names)))


def category_ids_of(class_names: Sequence[str], stored: Any = None, source: str = "the model") -> list[int]:
    """The category ids of labels 1..C of a model with ``class_names`` (index 0 = background).

    ``stored``: the checkpoint's ``category_ids`` (or the export's metadata), which must be C distinct integers
    (:class:`CategoryIdsError` naming ``source`` otherwise); None: a model saved before they were stored, see the
    module docstring for the fallback.
    """
    num_classes = len(class_names) - 1
    if stored is None:
        return _fallback_ids(class_names)
    if not isinstance(stored, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                        for c in stored):
        raise CategoryIdsError(f"{source}: category_ids must be a list of integers, got {stored!r:.80}")
    if len(stored) != num_classes:
        raise CategoryIdsError(f"{source}: {len(stored)} category_ids for {num_classes} classes")
    if len(set(stored)) != len(stored):
        raise CategoryIdsError(f"{source}: category_ids repeat an id ({list(stored)!r:.80})")
    return [int(c) for c in stored]


def match_categories(model_names: Sequence[str], model_ids: Sequence[int], data_names: Sequence[str],
                     data_label_to_id: Mapping[int, int]) -> dict[int, int | None]:
    """Model label -> the evaluated data's category id (None: a class the data does not have; its detections are
    not scored). Names lists have background at index 0; ``model_ids[label - 1]`` is the model's id of a label.

    A label goes to the data category with the same name and id, else to the one not yet taken with the same name
    (a model trained on other ids of the same classes; torchvision's 91 slots on a COCO-format subset). Every class
    of the data must be reached (ValueError naming those that are not).
    """
    data = {(str(name), int(data_label_to_id[label])) for label, name in enumerate(data_names) if label}
    model = list(zip(model_names[1:], (int(c) for c in model_ids)))
    out: dict[int, int | None] = {label: (cid if (name, cid) in data else None)
                                  for label, (name, cid) in enumerate(model, start=1)}
    taken = set(out.values())
    free = {pair for pair in data if pair[1] not in taken}
    for label, (name, _) in enumerate(model, start=1):
        same_name = sorted(cid for n, cid in free if n == name)
        if out[label] is None and same_name:
            out[label] = same_name[0]
            free.discard((name, same_name[0]))
    missing = sorted(name for name, _ in free)
    if missing:
        raise ValueError(f"the data's classes {missing} are not classes of the model "
                         f"({', '.join(map(str, model_names[1:]))})")
    return out
