"""The design notes' anchor-free point head (efficientdet_spec.md §18, issue 20): targets, loss
and decoding for `nets.efficientdet.EfficientDet(points_per_cell=P)`.

A point is (y, x) in input pixels (y first, as boxes everywhere in this package) with a class;
classes -1 pad. On a level of stride s, a point lies in cell (i, j) = floor((y, x) / s) at the
in-cell offset (y, x) / s - (i, j) in [0, 1). Each cell has P slots; a slot predicts a presence
logit per class and two offset logits, decoded as ((i, j) + sigmoid(offset logits)) * s.

Collisions: the points of one cell take its slots in raster order of their positions (top to
bottom, then left to right; equal positions in input order), so that a slot means the same
thing in every image and the head can learn it; points beyond the P-th of a cell are dropped
and counted (`num_dropped`, with points outside the image). Two points of one class at one spot
take two slots.

Every function is jittable on fixed shapes: points are padded to a fixed N, outputs are fixed
size with a valid mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from detection.losses import ALPHA, GAMMA, focal_loss, loss_normalizer

# CenterNet's demo visualisation threshold (xingyizhou/CenterNet, opts.vis_thresh).
SCORE_THRESHOLD = 0.3
MAX_POINTS = 100


class KeypointTargets(NamedTuple):
    """One level's targets (a leading batch axis when batched)."""

    presence: jax.Array     # [H, W, P, C] 1.0 where the slot holds a point of that class
    offsets: jax.Array      # [H, W, P, 2] the (y, x) in-cell offsets in [0, 1); 0 where empty
    mask: jax.Array         # [H, W, P] the slot holds a point
    num_points: jax.Array   # [] points given a slot
    num_dropped: jax.Array  # [] valid points without one (cell full or outside the image)


@partial(jax.jit, static_argnums=(2, 3, 4, 5))
def encode_points(points, classes, grid_size: tuple[int, int], stride: float,
                  points_per_cell: int, num_classes: int) -> KeypointTargets:
    """Targets of one image on one level: points [N, 2] (y, x) pixels, classes [N] (-1 pads),
    the level's (H, W) and stride."""
    height, width = grid_size
    points = jnp.asarray(points, jnp.float32)
    classes = jnp.asarray(classes, jnp.int32)
    scaled = points / stride
    cell = jnp.floor(scaled).astype(jnp.int32)
    offsets = scaled - cell
    valid = classes >= 0
    inside = valid & jnp.all((cell >= 0) & (cell < jnp.array([height, width])), axis=-1)
    flat = cell[:, 0] * width + cell[:, 1]
    # earlier[n, m]: point m comes before point n in its cell's raster order
    y, x, index = points[:, 0], points[:, 1], jnp.arange(points.shape[0])
    earlier = (y[None] < y[:, None]) | ((y[None] == y[:, None]) & (
        (x[None] < x[:, None]) | ((x[None] == x[:, None]) & (index[None] < index[:, None]))))
    same_cell = inside[:, None] & inside[None] & (flat[:, None] == flat[None])
    slot = jnp.sum(same_cell & earlier, axis=1)
    kept = inside & (slot < points_per_cell)
    row = jnp.where(kept, flat, height * width)  # out of range: dropped by the scatters
    slot = jnp.minimum(slot, points_per_cell - 1)
    shape = (height * width, points_per_cell)
    presence = jnp.zeros((*shape, num_classes), jnp.float32).at[
        row, slot, jnp.maximum(classes, 0)].set(1.0, mode="drop")
    offset_map = jnp.zeros((*shape, 2), jnp.float32).at[row, slot].set(offsets, mode="drop")
    mask = jnp.zeros(shape, bool).at[row, slot].set(True, mode="drop")
    return KeypointTargets(presence.reshape(height, width, points_per_cell, num_classes),
                           offset_map.reshape(height, width, points_per_cell, 2),
                           mask.reshape(height, width, points_per_cell),
                           jnp.sum(kept), jnp.sum(valid & ~kept))


def encode_batch(points, classes, grid_sizes: Sequence[tuple[int, int]],
                 strides: Sequence[float], points_per_cell: int,
                 num_classes: int) -> list[KeypointTargets]:
    """Batched targets [B, ...] on each level: every point is encoded on every level given
    (the registry's keypoint row uses one, P3)."""
    return [jax.vmap(lambda p, c, g=tuple(g), s=s: encode_points(
        p, c, g, s, points_per_cell, num_classes))(points, classes)
            for g, s in zip(grid_sizes, strides)]


def _split(output, points_per_cell: int):
    """[B, H, W, P * K] -> [B, H, W, P, K] (slot-major channels)."""
    return output.reshape(*output.shape[:-1], points_per_cell, -1).astype(jnp.float32)


class KeypointLoss(NamedTuple):
    total: jax.Array
    presence: jax.Array
    offset: jax.Array


def offset_loss(logits, offsets):
    """BCE with logits against the in-cell offsets minus the targets' own entropy: the same
    gradient (sigmoid - target), but 0 at a perfect prediction rather than the entropy of a soft
    target (spec §18's caveat)."""
    entropy = jax.scipy.special.entr(offsets) + jax.scipy.special.entr(1.0 - offsets)
    return optax.sigmoid_binary_cross_entropy(logits, offsets) - entropy


def keypoint_loss(class_outputs: Sequence, point_outputs: Sequence,
                  targets: Sequence[KeypointTargets], points_per_cell: int, normalizer=None, *,
                  alpha: float = ALPHA, gamma: float = GAMMA,
                  offset_weight: float = 1.0) -> KeypointLoss:
    """presence + offset_weight * offset over the levels given, in float32.

    class_outputs / point_outputs: the model's outputs on the levels `targets` encode,
    [B, H, W, P * C] / [B, H, W, P * 2]. Presence: focal loss (EfficientDet's alpha 0.25, gamma
    1.5) on every slot and class of every cell, no ignore band (a point is in a cell or not);
    offset: `offset_loss` on both coordinates of the slots holding a point. Both are sums
    divided by the normaliser, default the batch's points + 1 (EfficientDet's positives + 1;
    pass the global batch's for a sharded step)."""
    if normalizer is None:
        normalizer = loss_normalizer(sum(jnp.sum(t.num_points) for t in targets))
    normalizer = jnp.asarray(normalizer, jnp.float32)
    presence = offset = jnp.zeros((), jnp.float32)
    for logits, codes, t in zip(class_outputs, point_outputs, targets):
        presence += jnp.sum(focal_loss(_split(logits, points_per_cell), t.presence, alpha,
                                       gamma))
        per_coord = offset_loss(_split(codes, points_per_cell), t.offsets)
        offset += jnp.sum(jnp.where(t.mask[..., None], per_coord, 0.0))
    presence, offset = presence / normalizer, offset / normalizer
    return KeypointLoss(presence + offset_weight * offset, presence, offset)


def cell_positions(offsets, stride: float):
    """Pixel positions ((i, j) + offsets) * stride of in-cell offsets [..., H, W, P, 2]."""
    height, width = offsets.shape[-4:-2]
    ij = jnp.stack(jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij"), -1)
    return (ij[:, :, None, :].astype(offsets.dtype) + offsets) * stride


class Keypoints(NamedTuple):
    points: jax.Array   # [B, K, 2] (y, x) pixels; 0 where not valid
    classes: jax.Array  # [B, K] -1 where not valid
    scores: jax.Array   # [B, K] presence probabilities, best first; 0 where not valid
    valid: jax.Array    # [B, K]


def decode_keypoints(class_outputs: Sequence, point_outputs: Sequence,
                     strides: Sequence[float], points_per_cell: int, *,
                     score_threshold: float = SCORE_THRESHOLD, max_points: int = MAX_POINTS,
                     peak_window: int = 3) -> Keypoints:
    """The best `max_points` (slot, class) presences over the levels given that reach
    `score_threshold` and are peaks: the maximum of their slot and class over a
    peak_window x peak_window neighbourhood of cells (CenterNet's 3x3 max-pool; 1 turns it off,
    which keeps points of one class in neighbouring cells)."""
    scores, points, classes = [], [], []
    for logits, codes, stride in zip(class_outputs, point_outputs, strides):
        probs = jax.nn.sigmoid(_split(logits, points_per_cell))        # [B, H, W, P, C]
        if peak_window > 1:
            pooled = jax.lax.reduce_window(probs, -jnp.inf, jax.lax.max,
                                           (1, peak_window, peak_window, 1, 1), (1,) * 5,
                                           "SAME")
            probs = jnp.where(probs == pooled, probs, 0.0)
        xy = cell_positions(jax.nn.sigmoid(_split(codes, points_per_cell)), stride)
        batch, num_classes = probs.shape[0], probs.shape[-1]
        scores.append(probs.reshape(batch, -1))
        points.append(jnp.broadcast_to(xy[..., None, :], (*probs.shape, 2)).reshape(
            batch, -1, 2))
        classes.append(jnp.broadcast_to(jnp.arange(num_classes), probs.shape).reshape(
            batch, -1))
    scores, points, classes = (jnp.concatenate(a, axis=1) for a in (scores, points, classes))
    k = min(max_points, scores.shape[1])
    top, index = jax.lax.top_k(scores, k)
    valid = top >= score_threshold
    pad = [(0, 0), (0, max_points - k)]
    points = jnp.take_along_axis(points, index[..., None], axis=1)
    return Keypoints(jnp.pad(jnp.where(valid[..., None], points, 0.0), [*pad, (0, 0)]),
                     jnp.pad(jnp.where(valid, jnp.take_along_axis(classes, index, axis=1), -1),
                             pad, constant_values=-1),
                     jnp.pad(jnp.where(valid, top, 0.0), pad), jnp.pad(valid, pad))
