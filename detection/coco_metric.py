"""COCO box mAP glue (official google/automl coco_metric.py semantics): fixed-size detections to
the [N, 7] rows the official evaluation writes, a COCO ground-truth dataset built in memory from
padded boxes, and pycocotools' COCOeval run quietly to the 12 named stats.

Host-side NumPy, not jittable. pycocotools is imported only when `coco_metrics` runs, so
`import detection` needs only jax and numpy.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

# COCOeval.stats in order: AP over IoU .50:.05:.95 (all areas, 100 detections), AP at IoU .50 and
# .75, AP for small / medium / large objects, AR with 1 / 10 / 100 detections per image, AR for
# small / medium / large objects (the official coco_metric.py's names).
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                     "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm", "ARl")

_log = logging.getLogger(__name__)


def detections_to_coco(image_ids, boxes, scores, classes, valid=None) -> np.ndarray:
    """Rows [image_id, x, y, w, h, score, class] (float64, [N, 7]) of the valid detections, as the
    official evaluation writes them (x, y = xmin, ymin; w, h = xmax - xmin, ymax - ymin).

    image_ids [B]; boxes [B, M, 4] [ymin, xmin, ymax, xmax] in original-image pixels; scores,
    classes [B, M] (classes are COCO category ids); valid [B, M] bool, None to keep every row.
    Rows keep the image-major, per-image order of the input. For a `Detections` record `d`:
    `detections_to_coco(ids, d.boxes, d.scores, d.classes, d.valid)`. Accepts JAX arrays.
    """
    image_ids = np.asarray(image_ids)
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    classes = np.asarray(classes)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, M, 4] (ymin, xmin, ymax, xmax), got {boxes.shape}")
    batch, num = boxes.shape[:2]
    if image_ids.shape != (batch,):
        raise ValueError(f"image_ids must be [B] = [{batch}], got {image_ids.shape}")
    if scores.shape != (batch, num) or classes.shape != (batch, num):
        raise ValueError(f"scores and classes must be [B, M] = [{batch}, {num}], got "
                         f"{scores.shape} and {classes.shape}")
    valid = (np.ones((batch, num), bool) if valid is None
             else np.broadcast_to(np.asarray(valid, bool), (batch, num)))
    ymin, xmin, ymax, xmax = np.moveaxis(boxes, -1, 0)
    rows = np.stack([np.broadcast_to(image_ids[:, None], (batch, num)).astype(np.float64),
                     xmin, ymin, xmax - xmin, ymax - ymin, scores,
                     classes.astype(np.float64)], axis=-1)
    return rows[valid].reshape(-1, 7)


def ground_truth_dict(image_ids, image_sizes, boxes, labels, is_crowd=None,
                      categories: Sequence[dict] | None = None) -> dict:
    """A COCO instances dataset ({"images", "annotations", "categories"}) built in memory from
    padded arrays, as the official coco_metric.py builds it when no annotation file is given.

    image_ids [B]; image_sizes [B, 2] original (height, width), or None to leave them out (box
    evaluation does not use them); boxes [B, N, 4] [ymin, xmin, ymax, xmax] in original-image
    pixels; labels [B, N] COCO category ids, negative = padding; is_crowd [B, N] (default none).
    Annotation "bbox" is [x, y, w, h] and "area" the box area w * h (the official in-memory
    ground truth; instances json files carry the mask area instead, so AP by object size can
    differ slightly from a run against the json). Annotation ids are 1..n: pycocotools'
    matching treats id 0 as "unmatched". `categories`: [{"id", "name", ...}] to declare (labels
    outside it raise ValueError); default the ids seen, sorted, named by their id. Every image
    is listed, with or without objects. Plain Python numbers: the dict can be `json.dump`ed.
    """
    image_ids = np.asarray(image_ids)
    boxes = np.asarray(boxes, np.float64)
    labels = np.asarray(labels)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, N, 4] (ymin, xmin, ymax, xmax), got {boxes.shape}")
    batch, num = boxes.shape[:2]
    if image_ids.shape != (batch,) or labels.shape != (batch, num):
        raise ValueError(f"image_ids must be [B] and labels [B, N] = [{batch}, {num}], got "
                         f"{image_ids.shape} and {labels.shape}")
    crowd = (np.zeros((batch, num), bool) if is_crowd is None
             else np.broadcast_to(np.asarray(is_crowd).astype(bool), (batch, num)))
    if image_sizes is not None:
        image_sizes = np.asarray(image_sizes)
        if image_sizes.shape != (batch, 2):
            raise ValueError(f"image_sizes must be [B, 2] (height, width), got "
                             f"{image_sizes.shape}")
    if len(set(image_ids.tolist())) != batch:
        raise ValueError("image_ids must be unique")

    images, annotations = [], []
    for b in range(batch):
        image = {"id": int(image_ids[b])}
        if image_sizes is not None:
            image["height"], image["width"] = int(image_sizes[b, 0]), int(image_sizes[b, 1])
        images.append(image)
        for n in np.flatnonzero(labels[b] >= 0):
            ymin, xmin, ymax, xmax = (float(v) for v in boxes[b, n])
            w, h = xmax - xmin, ymax - ymin
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_ids[b]),
                                "category_id": int(labels[b, n]), "bbox": [xmin, ymin, w, h],
                                "area": w * h, "iscrowd": int(crowd[b, n])})
    seen = sorted({a["category_id"] for a in annotations})
    if categories is None:
        categories = [{"id": c, "name": str(c)} for c in seen]
    else:
        categories = [dict(c) for c in categories]
        unknown = sorted(set(seen) - {int(c["id"]) for c in categories})
        if unknown:
            raise ValueError(f"labels {unknown} are not among the given categories")
    return {"images": images, "annotations": annotations, "categories": categories}


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("COCO metrics need pycocotools: pip install pycocotools") from e
    return COCO, COCOeval


def coco_metrics(ground_truth, detections, *, image_ids=None) -> dict[str, float]:
    """COCO box metrics of `detections` against `ground_truth` with pycocotools' COCOeval.

    ground_truth: a dataset dict (`ground_truth_dict`'s, or a loaded instances json) or the path
    of an instances json. detections: [N, 7] rows [image_id, x, y, w, h, score, class]
    (`detections_to_coco`); every image id must be in the ground truth and every class one of
    its categories (ValueError otherwise: pycocotools would silently drop unknown classes, as
    it does the official padding rows of class 0).

    image_ids: the images to evaluate; default every image of the ground truth. The official
    coco_metric.py evaluates the images its evaluation loop saw (it lists those with detection
    rows, and every image gets rows since padding rows are kept); the ground truth it builds in
    memory holds exactly those images, so for `ground_truth_dict`'s output the default is the
    same set, and an image where the model found nothing still counts its objects as missed
    (listing only images with valid detections would hide those misses and drop every image
    when there are no detections). Against a full instances json after evaluating a subset,
    pass the ids of that subset, or the unevaluated images' objects count as misses.

    Returns {name: float} for COCO_METRIC_NAMES (AP, AP50, AP75, APs, APm, APl, ARmax1, ARmax10,
    ARmax100, ARs, ARm, ARl), in [0, 1]; pycocotools' -1 is kept where a stat has no ground
    truth to measure (e.g. APs when no object is small, everything when the evaluated images
    have no objects). No detections give 0 for every stat with objects. pycocotools' printed
    progress and summary table are captured and logged at DEBUG level, not printed.
    """
    coco_cls, cocoeval_cls = _pycocotools()
    detections = np.asarray(detections, np.float64)
    if detections.size == 0:
        detections = detections.reshape(0, 7)
    if detections.ndim != 2 or detections.shape[1] != 7:
        raise ValueError(f"detections must be [N, 7] rows [image_id, x, y, w, h, score, class], "
                         f"got {detections.shape}")

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if isinstance(ground_truth, (str, os.PathLike)):
            with open(ground_truth) as f:
                ground_truth = json.load(f)
        # COCOeval writes an "ignore" key into the ground-truth annotations: work on copies.
        dataset = dict(ground_truth)
        dataset["annotations"] = [dict(a) for a in ground_truth.get("annotations", [])]
        coco_gt = coco_cls()
        coco_gt.dataset = dataset
        coco_gt.createIndex()

    gt_images = set(coco_gt.getImgIds())
    gt_categories = set(coco_gt.getCatIds())
    det_images = set(detections[:, 0].astype(np.int64).tolist())
    det_classes = set(detections[:, 6].astype(np.int64).tolist())
    if det_images - gt_images:
        raise ValueError(f"detections of images not in the ground truth: "
                         f"{sorted(det_images - gt_images)[:10]}")
    if det_classes - gt_categories:
        unknown = sorted(det_classes - gt_categories)
        raise ValueError(f"detections with unknown category ids {unknown}"
                         f" (ground-truth categories: {sorted(gt_categories)}); padding rows "
                         f"must be dropped (detections_to_coco's valid)")
    if image_ids is None:
        image_ids = sorted(gt_images)
    else:
        image_ids = sorted({int(i) for i in np.asarray(image_ids).reshape(-1)})
        if set(image_ids) - gt_images:
            raise ValueError(f"image_ids not in the ground truth: "
                             f"{sorted(set(image_ids) - gt_images)[:10]}")
    if not image_ids:
        # pycocotools reads an empty imgIds as "no filter": it would evaluate every image.
        raise ValueError("no images to evaluate")

    with contextlib.redirect_stdout(out):
        if len(detections):
            coco_dt = coco_gt.loadRes(detections)
        else:
            # loadRes fails on an empty result list; an empty result set scores 0 (not -1).
            coco_dt = coco_cls()
            coco_dt.dataset = {"images": list(dataset.get("images", [])),
                               "categories": list(dataset.get("categories", [])),
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = cocoeval_cls(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    _log.debug("pycocotools output:\n%s", out.getvalue())
    return {name: float(v) for name, v in zip(COCO_METRIC_NAMES, evaluator.stats)}
