"""EfficientDet losses (official tf2/train_lib.py and iou_utils.py): sigmoid focal loss, Huber
box loss, optional IoU-family box loss, and the total detection loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from detection import boxes as box_ops
from detection.anchors import flatten_levels
from detection.targets import Targets

# Official defaults (hparams_config.py).
ALPHA = 0.25
GAMMA = 1.5
DELTA = 0.1
BOX_LOSS_WEIGHT = 50.0


def focal_loss(logits, labels, alpha: float = ALPHA, gamma: float = GAMMA,
               label_smoothing: float = 0.0):
    """Elementwise, unnormalised sigmoid focal loss as officially: alpha_t and (1 - p_t)^gamma
    from the hard labels, the cross-entropy on labels smoothed towards 0.5. Not
    optax.sigmoid_focal_loss, which applies smoothed labels to the focal factors too (the same
    only without smoothing)."""
    labels = labels.astype(logits.dtype)
    p = jax.nn.sigmoid(logits)
    p_t = labels * p + (1.0 - labels) * (1.0 - p)
    alpha_t = labels * alpha + (1.0 - labels) * (1.0 - alpha)
    smoothed = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return alpha_t * (1.0 - p_t) ** gamma * optax.sigmoid_binary_cross_entropy(logits, smoothed)


def box_loss(box_outputs, box_targets, normalizer, delta: float = DELTA):
    """Huber (optax's is the same function as Keras' Huber) on each coordinate whose target is
    not 0 (a box equal to its anchor adds nothing but still counts in N), summed over 4N."""
    loss = optax.huber_loss(box_outputs, box_targets, delta=delta)
    return jnp.sum(jnp.where(box_targets != 0.0, loss, 0.0)) / (4.0 * normalizer)


def _divide_no_nan(x, y):
    safe = jnp.where(y == 0, 1.0, y)
    return jnp.where(y == 0, 0.0, x / safe)


def iou_variant(pred, target, kind: str = "iou"):
    """IoU, GIoU, DIoU or CIoU of matching boxes [..., 4] as official iou_utils._iou_per_anchor,
    per box. Differences: officially the DIoU/CIoU distance term takes one tf.linalg.norm over
    all boxes passed at once (a batch-wide sum of squared distances over a sum of squared
    diagonals, also added for every masked-out anchor); here it is per box, as in the paper.
    Kept quirk: officially CIoU's v has a custom gradient that goes to the target's size only,
    so no gradient reaches the prediction through v (it still does through alpha's IoU); the
    prediction side is reproduced, targets being data."""
    if kind not in ("iou", "giou", "diou", "ciou"):
        raise ValueError(f"unknown IoU loss type {kind!r}: expected iou, giou, diou or ciou")
    p_ymin, p_xmin, p_ymax, p_xmax = jnp.moveaxis(pred, -1, 0)
    t_ymin, t_xmin, t_ymax, t_xmax = jnp.moveaxis(target, -1, 0)
    p_w, p_h = jnp.maximum(p_xmax - p_xmin, 0), jnp.maximum(p_ymax - p_ymin, 0)
    t_w, t_h = jnp.maximum(t_xmax - t_xmin, 0), jnp.maximum(t_ymax - t_ymin, 0)
    inter = (jnp.maximum(jnp.minimum(p_xmax, t_xmax) - jnp.maximum(p_xmin, t_xmin), 0)
             * jnp.maximum(jnp.minimum(p_ymax, t_ymax) - jnp.maximum(p_ymin, t_ymin), 0))
    union = p_w * p_h + t_w * t_h - inter
    iou = _divide_no_nan(inter, union)
    if kind == "iou":
        return iou
    enc_h = jnp.maximum(p_ymax, t_ymax) - jnp.minimum(p_ymin, t_ymin)
    enc_w = jnp.maximum(p_xmax, t_xmax) - jnp.minimum(p_xmin, t_xmin)
    if kind == "giou":
        enclose = jnp.maximum(enc_w, 0) * jnp.maximum(enc_h, 0)
        return iou - _divide_no_nan(enclose - union, enclose)
    centre_dist2 = (((t_ymin + t_ymax) - (p_ymin + p_ymax)) / 2) ** 2 + (
        ((t_xmin + t_xmax) - (p_xmin + p_xmax)) / 2) ** 2
    diou = iou - _divide_no_nan(centre_dist2, enc_h ** 2 + enc_w ** 2)
    if kind == "diou":
        return diou
    arctan = (jnp.arctan(_divide_no_nan(jax.lax.stop_gradient(p_w), jax.lax.stop_gradient(p_h)))
              - jnp.arctan(_divide_no_nan(t_w, t_h)))
    v = 4.0 * (arctan / math.pi) ** 2
    alpha = _divide_no_nan(v, (1.0 - iou) + v)
    return diou - alpha * v


def iou_loss(box_outputs, box_targets, anchors, normalizer, kind: str = "iou"):
    """Official BoxIouLoss: codes decoded against their anchors and multiplied elementwise by
    the `codes != 0` mask (so a zero code zeroes the matching corner, as officially); boxes
    whose decoded target has zero area are out; sum of (1 - IoU variant) over 4N. (Officially
    the anchors are tiled image-major against level-major codes, which pairs the wrong anchors
    for batches above 1; here each code uses its own anchor.)"""
    mask = (box_targets != 0.0).astype(box_outputs.dtype)
    pred = box_ops.decode(box_outputs, anchors) * mask
    target = box_ops.decode(box_targets, anchors) * mask
    keep = box_ops.area(target) != 0
    pred = pred * keep[..., None]
    per_box = keep.astype(pred.dtype) - iou_variant(pred, target, kind)
    return jnp.sum(per_box) / (4.0 * normalizer)


class DetectionLoss(NamedTuple):
    total: jax.Array
    cls: jax.Array
    box: jax.Array
    iou: jax.Array


def loss_normalizer(num_positives):
    """Positives + 1. Officially per replica; pass the global batch's `num_positives` (as the
    jitted, batch-sharded step does) for a global-batch normaliser."""
    return jnp.sum(num_positives) + 1.0


def detection_loss(cls_outputs: Sequence, box_outputs: Sequence, targets: Targets,
                   num_classes: int, normalizer=None, *, alpha: float = ALPHA,
                   gamma: float = GAMMA, delta: float = DELTA,
                   box_loss_weight: float = BOX_LOSS_WEIGHT, label_smoothing: float = 0.0,
                   iou_loss_type: str | None = None, iou_loss_weight: float = 1.0,
                   anchors=None) -> DetectionLoss:
    """cls + box_loss_weight * box (+ iou_loss_weight * iou), all in float32.

    cls_outputs / box_outputs: per level [B, H, W, A * num_classes] / [B, H, W, A * 4] (NHWC,
    the model's outputs); targets: batched `Targets` in the global anchor order;
    normalizer: default `loss_normalizer(targets.num_positives)`; anchors [N, 4] only for the
    IoU loss. Weight decay is not included (the optimiser's business)."""
    if normalizer is None:
        normalizer = loss_normalizer(targets.num_positives)
    normalizer = jnp.asarray(normalizer, jnp.float32)
    logits = flatten_levels(cls_outputs, num_classes).astype(jnp.float32)
    codes = flatten_levels(box_outputs, 4).astype(jnp.float32)
    labels = jax.nn.one_hot(targets.cls_targets, num_classes, dtype=jnp.float32)  # -1 -> zeros
    per_class = focal_loss(logits, labels, alpha, gamma, label_smoothing)
    # The official loss also skips anchors labelled -2 (never produced by its matcher).
    per_class = jnp.where((targets.cls_targets != -2)[..., None], per_class, 0.0)
    cls = jnp.sum(per_class) / normalizer
    box = box_loss(codes, targets.box_targets, normalizer, delta)
    total = cls + box_loss_weight * box
    iou = jnp.zeros((), jnp.float32)
    if iou_loss_type:
        if anchors is None:
            raise ValueError("the IoU loss decodes boxes: pass `anchors`")
        iou = iou_loss(codes, targets.box_targets, jnp.asarray(anchors, jnp.float32),
                       normalizer, iou_loss_type)
        total = total + iou_loss_weight * iou
    return DetectionLoss(total, cls, box, iou)
