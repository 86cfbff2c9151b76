"""Image resizing as the two reference pipelines do it.

- `tf_bicubic`: TensorFlow 2's `tf.image.resize(..., "bicubic")` (no antialiasing, half-pixel
  centres, Keys cubic with a = -0.5 read from a 1024-entry table, taps outside the image dropped
  and the rest renormalised), returning float32 without clamping - the NFNet and EfficientNet
  pipelines feed these overshooting values on (the spec measured [-51.1, 336.6]).
- `pil`: PIL's resampling (antialiased when shrinking, uint8), what torchvision's transforms use.
"""

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_KEYS_A = -0.5
_TABLE_SIZE = 1024


def _resample(interpolation: str) -> Image.Resampling:
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; choose from {sorted(INTERPOLATIONS)}"
        ) from None


def pil(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """Resizes an HWC uint8 image with PIL. (A crop is cut out first, as torchvision does:
    PIL's own `box` argument would let the filter read pixels outside the crop.)"""
    resized = Image.fromarray(image).resize((width, height), _resample(interpolation))
    return np.asarray(resized)


def _keys(distance: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel at |distance| <= 2."""
    a = _KEYS_A
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    return np.where(distance <= 1, near, far)


def _tf_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out_size, 4): the input pixels each output pixel reads."""
    scale = np.float32(in_size / out_size)
    centre = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    first = np.floor(centre).astype(np.int64)
    # TF reads the kernel from a table at 1/1024 steps of the fractional position.
    fraction = np.rint((centre - first) * _TABLE_SIZE) / _TABLE_SIZE
    offsets = np.arange(-1, 3)
    indices = first[:, None] + offsets
    weights = _keys(np.abs(fraction[:, None] - offsets)).astype(np.float32)
    inside = (indices >= 0) & (indices < in_size)
    weights = np.where(inside, weights, np.float32(0))
    weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(indices, 0, in_size - 1), weights


def tf_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """HWC image -> (height, width, C) float32, as tf.image.resize(..., "bicubic")."""
    rows, row_weights = _tf_bicubic_taps(image.shape[0], height)
    cols, col_weights = _tf_bicubic_taps(image.shape[1], width)
    # Four taps per axis: weighted sums of gathered rows, then of gathered columns (on the
    # transposed array, so each gather reads contiguous memory). A dense resampling matrix
    # would be ~50x the arithmetic.
    vertical = row_weights[:, 0, None, None] * image[rows[:, 0]]
    for k in range(1, 4):
        vertical += row_weights[:, k, None, None] * image[rows[:, k]]
    columns_first = np.ascontiguousarray(vertical.transpose(1, 0, 2))
    out = col_weights[:, 0, None, None] * columns_first[cols[:, 0]]
    for k in range(1, 4):
        out += col_weights[:, k, None, None] * columns_first[cols[:, k]]
    return out.transpose(1, 0, 2)
