"""Anchor target assignment (official ArgMaxMatcher + TargetAssigner + AnchorLabeler), in jnp
on ground truth padded to a fixed number of rows, so that it runs inside the jitted step.

Ground truth of one image: `gt_boxes` [G, 4] in input pixels, `gt_labels` [G] int with the
official label convention (>= 1; the labeller subtracts 1, so COCO id 1 is head class 0). A row
takes part only if its label is > -1 (padding rows carry -1, effdet's filter), it is not a crowd
box (`is_crowd`; officially crowd boxes are dropped before labelling) and it has positive area
(the official input pipeline drops zero-area boxes; an all-zero IoU row would otherwise
force-match anchor 0). As officially, a label-0 row yields class target -1 (background) on
anchors that still count as positives and get box targets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from detection import boxes as box_ops


class Targets(NamedTuple):
    """Per anchor, in the global anchor order (split with `anchors.split_levels`).

    cls_targets: int32 [..., A]: matched label - 1, -1 for negatives and ignored anchors.
    box_targets: float32 [..., A, 4]: encoded matched box, zeros elsewhere.
    num_positives: float32 [...]: anchors matched to a box.
    matches: int32 [..., A]: matched row, -1 negative, -2 ignored (between the thresholds;
      never produced with EfficientDet's 0.5 / 0.5).
    """
    cls_targets: jax.Array
    box_targets: jax.Array
    num_positives: jax.Array
    matches: jax.Array


def valid_rows(gt_boxes, gt_labels, is_crowd=None):
    """The rows that take part in matching (see the module docstring)."""
    valid = ((gt_labels > -1) & (gt_boxes[:, 2] > gt_boxes[:, 0])
             & (gt_boxes[:, 3] > gt_boxes[:, 1]))
    if is_crowd is not None:
        valid &= ~is_crowd.astype(bool)
    return valid


def match(iou, valid, matched_threshold: float = 0.5, unmatched_threshold: float = 0.5):
    """Official ArgMaxMatcher (negatives_lower_than_unmatched, force_match_for_each_row) on an
    IoU matrix [G, A] whose rows `valid` [G] take part: each anchor takes its best row (first
    row on ties) if the IoU >= matched_threshold, is negative (-1) below unmatched_threshold and
    ignored (-2) in between; then every valid row claims the first anchor of its maximal IoU,
    overriding that anchor's own match, the lower row winning when two claim one anchor."""
    num_rows, num_anchors = iou.shape
    # Valid IoUs are >= 0, so padded rows at -1 never win an anchor's argmax.
    masked = jnp.where(valid[:, None], iou, -1.0)
    best = jnp.max(masked, axis=0)
    matches = jnp.argmax(masked, axis=0).astype(jnp.int32)
    matches = jnp.where(best >= matched_threshold, matches,
                        jnp.where(best < unmatched_threshold, -1, -2))
    # Force match as a scatter-min of row ids onto each row's best anchor (no [G, A] one-hot).
    best_anchor = jnp.argmax(iou, axis=1)
    rows = jnp.where(valid, jnp.arange(num_rows, dtype=jnp.int32), num_rows)
    claimed = jnp.full((num_anchors,), num_rows, jnp.int32).at[best_anchor].min(rows)
    return jnp.where(claimed < num_rows, claimed, matches)


def assign_targets(anchors, gt_boxes, gt_labels, is_crowd=None,
                   matched_threshold: float = 0.5, unmatched_threshold: float = 0.5) -> Targets:
    """Targets of one image; `jax.vmap` it (or use `assign_targets_batch`) for a batch."""
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_labels = jnp.asarray(gt_labels, jnp.int32)
    valid = valid_rows(gt_boxes, gt_labels, is_crowd)
    iou = box_ops.pairwise_iou(gt_boxes, anchors)
    matches = match(iou, valid, matched_threshold, unmatched_threshold)
    positive = matches >= 0
    row = jnp.maximum(matches, 0)
    cls_targets = jnp.where(positive, gt_labels[row], 0) - 1
    box_targets = jnp.where(positive[:, None], box_ops.encode(gt_boxes[row], anchors), 0.0)
    return Targets(cls_targets.astype(jnp.int32), box_targets,
                   jnp.sum(positive).astype(jnp.float32), matches)


def assign_targets_batch(anchors, gt_boxes, gt_labels, is_crowd=None, **kwargs) -> Targets:
    """`assign_targets` over a leading batch axis of the ground truth."""
    def one(boxes, labels, crowd):
        return assign_targets(anchors, boxes, labels, crowd, **kwargs)

    return jax.vmap(one)(gt_boxes, gt_labels, is_crowd)
