"""Detections from head outputs (official tf2/postprocess.py): pre-NMS top-k, decoding, hard or
Gaussian soft NMS with TF NonMaxSuppressionV5 semantics, per class or class-agnostic, fixed-size
padded outputs (jittable and exportable)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from detection import boxes as box_ops
from detection.anchors import flatten_levels

# Official defaults: nms_configs (hparams_config.py) and MAX_DETECTION_POINTS (COCO eval).
MAX_NMS_INPUTS = 5000
MAX_DETECTIONS = 100
SOFT_NMS_SIGMA = 0.5
SOFT_NMS_SCORE_THRESHOLD = 0.001
IOU_THRESHOLD = 0.5


def _nms_iou(box, boxes):
    """IoU of one box with each of `boxes` exactly as TF's NMS kernel: corners put in order,
    0 when either area is not positive."""
    def ordered(b):
        return (jnp.minimum(b[..., 0], b[..., 2]), jnp.minimum(b[..., 1], b[..., 3]),
                jnp.maximum(b[..., 0], b[..., 2]), jnp.maximum(b[..., 1], b[..., 3]))

    ymin1, xmin1, ymax1, xmax1 = ordered(box)
    ymin2, xmin2, ymax2, xmax2 = ordered(boxes)
    area1 = (ymax1 - ymin1) * (xmax1 - xmin1)
    area2 = (ymax2 - ymin2) * (xmax2 - xmin2)
    inter = (jnp.maximum(jnp.minimum(ymax1, ymax2) - jnp.maximum(ymin1, ymin2), 0.0)
             * jnp.maximum(jnp.minimum(xmax1, xmax2) - jnp.maximum(xmin1, xmin2), 0.0))
    union = area1 + area2 - inter
    positive = (area1 > 0) & (area2 > 0)
    return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def non_max_suppression(boxes, scores, max_output_size: int,
                        iou_threshold: float = IOU_THRESHOLD,
                        score_threshold: float = float("-inf"), sigma: float = 0.0,
                        classes=None):
    """Greedy NMS of one image, as tf.raw_ops.NonMaxSuppressionV5.

    boxes [N, 4], scores [N]. Candidates need score > score_threshold. Hard (sigma 0): a
    candidate is dropped when its IoU with a selected box exceeds iou_threshold. Gaussian soft
    NMS (sigma > 0, the paper's sigma: TF's op is given sigma / 2): every remaining score is
    multiplied by exp(-IoU^2 / sigma) after each selection and dropped once <= score_threshold;
    iou_threshold is unused, as in TF. Each step takes the highest current score, the lower
    index on ties (TF's queue order; its lazy re-scoring selects the same boxes).

    With `classes` [N], suppression acts only within a class: the selection order is then the
    merge of independent per-class NMS runs by score, so its first `max_output_size` rows are
    the official per-class NMS followed by the top `max_output_size` of the union (no per-class
    cap binds). Costs max_output_size passes over N, no [N, N] matrix.

    Returns (indices [M] int32, -1 past the end; scores [M] at selection, 0 past the end;
    valid [M] bool), M = max_output_size.
    """
    scores = jnp.asarray(scores, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    classes = None if classes is None else jnp.asarray(classes)
    current = jnp.where(scores > score_threshold, scores, -jnp.inf)

    def step(i, state):
        current, indices, selected_scores = state
        j = jnp.argmax(current)
        found = current[j] > -jnp.inf
        iou = _nms_iou(boxes[j], boxes)
        same = True if classes is None else classes == classes[j]
        if sigma > 0:
            decayed = current * jnp.where(same, jnp.exp(-iou * iou / sigma), 1.0)
            current_next = jnp.where(decayed > score_threshold, decayed, -jnp.inf)
        else:
            current_next = jnp.where(same & (iou > iou_threshold), -jnp.inf, current)
        current_next = current_next.at[j].set(-jnp.inf)
        indices = indices.at[i].set(jnp.where(found, j, -1).astype(jnp.int32))
        selected_scores = selected_scores.at[i].set(jnp.where(found, current[j], 0.0))
        return jnp.where(found, current_next, current), indices, selected_scores

    state = (current, jnp.full((max_output_size,), -1, jnp.int32),
             jnp.zeros((max_output_size,), jnp.float32))
    _, indices, selected_scores = jax.lax.fori_loop(0, max_output_size, step, state)
    return indices, selected_scores, indices >= 0


class Detections(NamedTuple):
    """Fixed-size detections, best first; rows past `num_detections` are zeros (class 0, which
    is no COCO category, as the official padding) and `valid` False.

    boxes: [B, M, 4] [ymin, xmin, ymax, xmax] in original-image pixels (input pixels times the
    image scale). classes: [B, M] int32, head class index + 1 (COCO ids for the 90-way head).
    """
    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array
    num_detections: jax.Array


def generate_detections(cls_outputs: Sequence, box_outputs: Sequence, anchors, num_classes: int,
                        image_scales=None, *, method: str = "gaussian",
                        max_nms_inputs: int = MAX_NMS_INPUTS,
                        max_detections: int = MAX_DETECTIONS,
                        iou_threshold: float = IOU_THRESHOLD, sigma: float = SOFT_NMS_SIGMA,
                        score_threshold: float | None = None, per_class: bool = True,
                        image_size=None) -> Detections:
    """Official post-processing of per-level NHWC outputs ([B, H, W, A*K], [B, H, W, A*4]).

    Evaluation (the defaults): the top `max_nms_inputs` (anchor, class) logits of each image,
    per-class NMS (`method` "gaussian": sigma 0.5, score threshold 0.001; "hard": IoU 0.5, no
    score threshold), the best `max_detections`, boxes times `image_scales` [B].
    Inference ("global" mode, `per_class=False`, officially with `max_nms_inputs=0`: each
    anchor keeps its best class): one class-agnostic NMS, boxes clipped to `image_size` (the
    input's (H, W)) before scaling.
    """
    if method == "gaussian":
        nms_sigma = sigma
        threshold = SOFT_NMS_SCORE_THRESHOLD if score_threshold is None else score_threshold
    elif method == "hard":
        nms_sigma = 0.0
        threshold = float("-inf") if score_threshold is None else score_threshold
    else:
        raise ValueError(f"unknown NMS method {method!r}: expected 'gaussian' or 'hard'")
    if not per_class and image_size is None:
        raise ValueError("class-agnostic (global) post-processing clips boxes: pass image_size")
    logits = flatten_levels(cls_outputs, num_classes).astype(jnp.float32)
    codes = flatten_levels(box_outputs, 4).astype(jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    num_anchors = logits.shape[1]

    def one_image(logits, codes):
        if max_nms_inputs > 0:
            k = min(max_nms_inputs, num_anchors * num_classes)
            top, flat = jax.lax.top_k(jnp.reshape(logits, (-1,)), k)
            anchor_idx, classes = flat // num_classes, flat % num_classes
        else:
            top, classes = jnp.max(logits, -1), jnp.argmax(logits, -1)
            anchor_idx = jnp.arange(num_anchors)
        boxes = box_ops.decode(codes[anchor_idx], anchors[anchor_idx])
        indices, scores, valid = non_max_suppression(
            boxes, jax.nn.sigmoid(top), max_detections, iou_threshold, threshold, nms_sigma,
            classes if per_class else None)
        safe = jnp.maximum(indices, 0)
        boxes = jnp.where(valid[:, None], boxes[safe], 0.0)
        if not per_class:
            boxes = box_ops.clip_boxes(boxes, image_size)
        labels = jnp.where(valid, classes[safe] + 1, 0).astype(jnp.int32)
        return boxes, scores, labels, valid

    boxes, scores, labels, valid = jax.vmap(one_image)(logits, codes)
    if image_scales is not None:
        boxes = boxes * jnp.asarray(image_scales, jnp.float32)[:, None, None]
    return Detections(boxes, scores, labels, valid, jnp.sum(valid, -1).astype(jnp.int32))
