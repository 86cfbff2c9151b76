"""Box coding (Faster R-CNN style, no scale factors) and IoU; boxes [ymin, xmin, ymax, xmax]."""

from __future__ import annotations

import jax.numpy as jnp

# Official faster_rcnn_box_coder.py floors sizes at 1e-8 (tf.maximum); effdet adds 1e-7
# instead, which only changes codes of zero-size boxes (never positives).
_SIZE_FLOOR = 1e-8


def _centre_size(boxes):
    ymin, xmin, ymax, xmax = jnp.moveaxis(boxes, -1, 0)
    h, w = ymax - ymin, xmax - xmin
    return ymin + 0.5 * h, xmin + 0.5 * w, h, w


def encode(boxes, anchors):
    """(ty, tx, th, tw) of `boxes` relative to `anchors` (broadcasting over leading axes).
    EfficientDet uses no (10, 10, 5, 5) scale factors, hence its Huber delta of 0.1."""
    ya, xa, ha, wa = _centre_size(anchors)
    y, x, h, w = _centre_size(boxes)
    ha, wa = jnp.maximum(ha, _SIZE_FLOOR), jnp.maximum(wa, _SIZE_FLOOR)
    h, w = jnp.maximum(h, _SIZE_FLOOR), jnp.maximum(w, _SIZE_FLOOR)
    return jnp.stack([(y - ya) / ha, (x - xa) / wa, jnp.log(h / ha), jnp.log(w / wa)], -1)


def decode(codes, anchors):
    """The inverse of `encode`; th and tw are not clamped (as officially)."""
    ya, xa, ha, wa = _centre_size(anchors)
    ty, tx, th, tw = jnp.moveaxis(codes, -1, 0)
    h, w = jnp.exp(th) * ha, jnp.exp(tw) * wa
    y, x = ty * ha + ya, tx * wa + xa
    return jnp.stack([y - h / 2.0, x - w / 2.0, y + h / 2.0, x + w / 2.0], -1)


def area(boxes):
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1, boxes2):
    """[N, M] IoU as the official matcher computes it (box_list_ops.iou): 0 where the
    intersection is 0, otherwise intersection / union."""
    b1, b2 = boxes1[:, None, :], boxes2[None, :, :]
    ih = jnp.maximum(jnp.minimum(b1[..., 2], b2[..., 2]) - jnp.maximum(b1[..., 0], b2[..., 0]), 0)
    iw = jnp.maximum(jnp.minimum(b1[..., 3], b2[..., 3]) - jnp.maximum(b1[..., 1], b2[..., 1]), 0)
    inter = ih * iw
    union = area(boxes1)[:, None] + area(boxes2)[None, :] - inter
    safe_union = jnp.where(inter == 0, 1.0, union)
    return jnp.where(inter == 0, 0.0, inter / safe_union)


def clip_boxes(boxes, image_size):
    """Clip to [0, H] x [0, W] (official postprocess.clip_boxes)."""
    h, w = image_size
    limit = jnp.asarray([h, w, h, w], boxes.dtype)
    return jnp.clip(boxes, 0, limit)
