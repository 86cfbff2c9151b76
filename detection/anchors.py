"""EfficientDet / RetinaNet anchors and the anchor order shared by head outputs and targets.

Boxes are [ymin, xmin, ymax, xmax] in input-image pixels. Global order (official tf2/anchors.py,
which the flattened head outputs follow): level min..max, then row, then column, then the
anchors of a cell, scale-major (index = scale_idx * len(aspect_ratios) + aspect_idx).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# Current official convention: w/h ratios, multipliers (sqrt(r), 1/sqrt(r)).
ASPECT_RATIOS = (1.0, 2.0, 0.5)
# First-release convention (until Sep 2020), kept by effdet's `tf_` ports and the weights
# converted from them: explicit (x, y) multipliers.
ASPECT_RATIO_PAIRS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def feature_sizes(image_size, min_level: int = 3, max_level: int = 7) -> list[tuple[int, int]]:
    """(H_l, W_l) for each level: the image size ceil-halved l times (SAME stride-2 convs)."""
    h, w = _pair(image_size)
    sizes = []
    for level in range(max_level + 1):
        if level >= min_level:
            sizes.append((h, w))
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return sizes


def anchors_per_cell(num_scales: int = 3, aspect_ratios: Sequence = ASPECT_RATIOS) -> int:
    return num_scales * len(aspect_ratios)


def _multipliers(aspect) -> tuple[float, float]:
    if isinstance(aspect, (tuple, list)):
        return float(aspect[0]), float(aspect[1])
    x = float(np.sqrt(aspect))
    return x, 1.0 / x


def generate_anchors(image_size, min_level: int = 3, max_level: int = 7, num_scales: int = 3,
                     aspect_ratios: Sequence = ASPECT_RATIOS,
                     anchor_scale: float | Sequence[float] = 4.0) -> np.ndarray:
    """All anchors [sum_l H_l * W_l * num_scales * len(aspect_ratios), 4], float32.

    `aspect_ratios` holds floats (w/h, the current official convention) or (x, y) multiplier
    pairs (the first-release / effdet convention); `anchor_scale` is one number or one per
    level. Computed in float64 NumPy like the reference, then rounded once to float32: they are
    constants of the input size, so they are built at trace time.
    """
    h, w = _pair(image_size)
    levels = range(min_level, max_level + 1)
    scales = (list(anchor_scale) if isinstance(anchor_scale, (tuple, list))
              else [anchor_scale] * len(levels))
    out = []
    for (fh, fw), level_scale in zip(feature_sizes((h, w), min_level, max_level), scales):
        # The stride is a float for sizes that do not divide (official: image / feature size).
        stride_y, stride_x = h / fh, w / fw
        cy = (np.arange(fh) + 0.5) * stride_y
        cx = (np.arange(fw) + 0.5) * stride_x
        half = []
        for octave in range(num_scales):
            for aspect in aspect_ratios:
                mx, my = _multipliers(aspect)
                base = level_scale * 2.0 ** (octave / num_scales)
                half.append((base * stride_y * my / 2.0, base * stride_x * mx / 2.0))
        half = np.asarray(half)  # [A, 2] (half height, half width)
        yy, xx = np.meshgrid(cy, cx, indexing="ij")
        centres = np.stack([yy, xx], -1)[:, :, None, :]  # [H, W, 1, 2]
        boxes = np.concatenate([centres - half, centres + half], -1)  # [H, W, A, 4]
        out.append(boxes.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def flatten_levels(per_level: Sequence, last_dim: int):
    """Per-level NHWC head outputs [B, H, W, A * last_dim] -> [B, sum H*W*A, last_dim], in the
    global anchor order (the channel layout is anchor-major, then class or coordinate)."""
    return jnp.concatenate(
        [jnp.reshape(x, (x.shape[0], -1, last_dim)) for x in per_level], axis=1)


def split_levels(flat, image_size, min_level: int = 3, max_level: int = 7,
                 num_anchors: int = 9) -> list:
    """The inverse of `flatten_levels` for targets: [B, N, ...] -> per level [B, H, W, A * ...]
    (class targets [B, N] -> [B, H, W, A], as effdet's and the official labeller return them)."""
    out, start = [], 0
    for fh, fw in feature_sizes(image_size, min_level, max_level):
        count = fh * fw * num_anchors
        part = flat[:, start:start + count]
        out.append(jnp.reshape(part, (flat.shape[0], fh, fw, -1)))
        start += count
    return out
