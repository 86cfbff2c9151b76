"""RandAugment (Cubuk et al. 2020) as the TF1 AutoAugment code defines it, in NumPy.

This is the version the NFNet recipe trains with (`../shared/reference/nfnet_spec.md` §12): every
layer picks one of 16 operations uniformly and always applies it at the fixed magnitude M, with
`MAX_LEVEL = 10` so M = 15 goes past the nominal maximum. Images are uint8 HWC in and out.

The TF1 definitions are kept where they differ from the paper's intent, because they are what the
published models saw:
- Contrast blends towards a constant grey of (number of pixels / 256), clipped to 255 (the TF1
  code divides the histogram's total instead of its weighted sum), not the mean grey level.
- Solarize's threshold is int(M / 10 * 256): at M >= 10 no pixel reaches it, so it is the
  identity.
- Posterize keeps int(M / 10 * 4) bits: a larger magnitude posterizes less; 8 or more bits is
  the identity (TF clamps the negative shift).
- Geometric ops use nearest-neighbour sampling and fill uncovered pixels with FILL (128).
"""

import functools
import math

import numpy as np

MAX_LEVEL = 10.0
TRANSLATE_CONSTANT = 100     # pixels at level MAX_LEVEL
CUTOUT_CONSTANT = 40         # half-side in pixels at level MAX_LEVEL
FILL = 128
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)   # tf.image.rgb_to_grayscale


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """TF's float -> uint8 cast: clip to the range, then truncate toward zero."""
    return np.clip(values, 0.0, 255.0).astype(np.uint8)


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """image1 + factor * (image2 - image1): 0 gives image1, 1 image2, > 1 extrapolates."""
    if factor == 0.0:
        return image1.copy()
    if factor == 1.0:
        return image2.copy()
    image1 = image1.astype(np.float32)
    mixed = image1 + np.float32(factor) * (image2.astype(np.float32) - image1)
    return _to_uint8(mixed)


def grayscale(image: np.ndarray) -> np.ndarray:
    """HW uint8 luma as tf.image.rgb_to_grayscale computes it (scaled by 255.5, truncated)."""
    luma = (image.astype(np.float32) / np.float32(255.0)) @ GRAY_WEIGHTS
    return (luma * np.float32(255.5)).astype(np.uint8)


def _gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


# Pixel ops.


def auto_contrast(image: np.ndarray) -> np.ndarray:
    """Stretches each channel's [min, max] to [0, 255]; a flat channel is left alone."""
    out = image.copy()
    for c in range(image.shape[2]):
        channel = image[:, :, c].astype(np.float32)
        low, high = channel.min(), channel.max()
        if high > low:
            scale = np.float32(255.0) / (high - low)
            out[:, :, c] = _to_uint8(channel * scale - low * scale)
    return out


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation per channel, PIL's algorithm (the last occupied bin is not
    counted in the step)."""
    out = image.copy()
    for c in range(image.shape[2]):
        channel = image[:, :, c]
        histogram = np.bincount(channel.ravel(), minlength=256)
        occupied = histogram[histogram > 0]
        step = (occupied.sum() - occupied[-1]) // 255
        if step == 0:
            continue
        lut = (np.cumsum(histogram) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
        out[:, :, c] = lut[channel]
    return out


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - image


def posterize_shift(bits: int) -> np.uint8:
    return np.uint8(min(max(8 - bits, 0), 7))   # TF clamps shift counts to [0, 7] for uint8


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    shift = posterize_shift(bits)
    return (image >> shift) << shift


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
    return np.where(image < threshold, image, 255 - image)


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
    added = np.clip(image.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return np.where(image < threshold, added, image)


def color(image: np.ndarray, factor: float) -> np.ndarray:
    return blend(_gray_rgb(grayscale(image)), image, factor)


def contrast_grey(height: int, width: int) -> np.uint8:
    """TF1's "mean": the histogram's total count / 256 (see the module docstring)."""
    return np.uint8(min(height * width / 256.0, 255.0))


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    degenerate = np.full(image.shape, contrast_grey(*image.shape[:2]), np.uint8)
    return blend(degenerate, image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return blend(np.zeros_like(image), image, factor)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blends with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside the 1-pixel
    border; the border keeps its pixels."""
    pixels = image.astype(np.float32)
    height, width = image.shape[:2]
    smooth = 4.0 * pixels[1:-1, 1:-1]    # centre weight 5 = this + the 3x3 sum's own 1
    for dy in range(3):
        for dx in range(3):
            smooth = smooth + pixels[dy:dy + height - 2, dx:dx + width - 2]
    degenerate = image.copy()
    degenerate[1:-1, 1:-1] = _to_uint8(smooth / np.float32(13.0))
    return blend(degenerate, image, factor)


def cutout(image: np.ndarray, centre_y: int, centre_x: int, half_side: int,
           fill: int = FILL) -> np.ndarray:
    """Fills a square of side 2 * half_side (clipped to the image) centred at the given pixel."""
    height, width = image.shape[:2]
    out = image.copy()
    out[max(0, centre_y - half_side):min(height, centre_y + half_side),
        max(0, centre_x - half_side):min(width, centre_x + half_side)] = fill
    return out


# Geometric ops: output pixel (x, y) reads input pixel transform(x, y), nearest neighbour.


def _round_half_away(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return x, y


def affine(image: np.ndarray, matrix: tuple[float, ...], fill: int = FILL) -> np.ndarray:
    """Samples input (a x + b y + c, d x + e y + f) for each output (x, y), as
    tf.contrib.image.transform with NEAREST; uncovered pixels get `fill`."""
    a, b, c, d, e, f = (np.float32(v) for v in matrix)
    height, width = image.shape[:2]
    x, y = _pixel_grid(height, width)
    source_x = _round_half_away(a * x + b * y + c)
    source_y = _round_half_away(d * x + e * y + f)
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    flat = (np.clip(source_y, 0, height - 1).astype(np.intp) * width
            + np.clip(source_x, 0, width - 1).astype(np.intp))
    sampled = image.reshape(height * width, -1)[flat]
    return np.where(inside[:, :, None], sampled, np.uint8(fill))


def affine_matrix(name: str, value: float, height: int, width: int) -> tuple[float, ...]:
    """`affine`'s matrix for geometric op `name` with argument `value` (degrees, shear level or
    pixels) on an image of that size."""
    if name == "Rotate":   # counter-clockwise about the image centre
        radians = math.radians(value)
        cos, sin = math.cos(radians), math.sin(radians)
        x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
        y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
        return cos, -sin, x_offset, sin, cos, y_offset
    matrix = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    matrix[{"ShearX": 1, "ShearY": 3, "TranslateX": 2, "TranslateY": 5}[name]] = value
    return tuple(matrix)


def rotate(image: np.ndarray, degrees: float, fill: int = FILL) -> np.ndarray:
    return affine(image, affine_matrix("Rotate", degrees, *image.shape[:2]), fill)


def shear_x(image: np.ndarray, level: float, fill: int = FILL) -> np.ndarray:
    return affine(image, affine_matrix("ShearX", level, *image.shape[:2]), fill)


def shear_y(image: np.ndarray, level: float, fill: int = FILL) -> np.ndarray:
    return affine(image, affine_matrix("ShearY", level, *image.shape[:2]), fill)


def translate_x(image: np.ndarray, pixels: float, fill: int = FILL) -> np.ndarray:
    """Moves the content `pixels` to the left (right when negative)."""
    return affine(image, affine_matrix("TranslateX", pixels, *image.shape[:2]), fill)


def translate_y(image: np.ndarray, pixels: float, fill: int = FILL) -> np.ndarray:
    return affine(image, affine_matrix("TranslateY", pixels, *image.shape[:2]), fill)


# Magnitude -> argument, and the layer loop. An op's random choices (a sign, a centre) are drawn
# apart from applying it (`draw_args`), so that data.device_augment can apply on the
# accelerator what the host drew: the same draws, in the same order.


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def level_arguments(magnitude: float) -> dict:
    """The arguments the non-geometric ops take at `magnitude` (TF1's level_to_arg)."""
    level = magnitude / MAX_LEVEL
    return {"bits": int(level * 4), "threshold": int(level * 256),
            "addition": int(level * 110), "factor": level * 1.8 + 0.1,
            "half_side": int(level * CUTOUT_CONSTANT)}


GEOMETRIC = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateX": TRANSLATE_CONSTANT,
             "TranslateY": TRANSLATE_CONSTANT}   # the argument at MAX_LEVEL, either sign


def draw_args(name: str, magnitude: float, rng: np.random.Generator, height: int,
              width: int) -> tuple[float, int, int]:
    """The op's random choices: (signed argument of a geometric op, cutout centre y, x)."""
    if name in GEOMETRIC:
        return _signed(magnitude / MAX_LEVEL * GEOMETRIC[name], rng), 0, 0
    if name == "Cutout":
        return 0.0, int(rng.integers(0, height)), int(rng.integers(0, width))
    return 0.0, 0, 0


OPS = {
    "AutoContrast": lambda im, m, args: auto_contrast(im),
    "Equalize": lambda im, m, args: equalize(im),
    "Invert": lambda im, m, args: invert(im),
    "Rotate": lambda im, m, args: rotate(im, args[0]),
    "Posterize": lambda im, m, args: posterize(im, level_arguments(m)["bits"]),
    "Solarize": lambda im, m, args: solarize(im, level_arguments(m)["threshold"]),
    "Color": lambda im, m, args: color(im, level_arguments(m)["factor"]),
    "Contrast": lambda im, m, args: contrast(im, level_arguments(m)["factor"]),
    "Brightness": lambda im, m, args: brightness(im, level_arguments(m)["factor"]),
    "Sharpness": lambda im, m, args: sharpness(im, level_arguments(m)["factor"]),
    "ShearX": lambda im, m, args: shear_x(im, args[0]),
    "ShearY": lambda im, m, args: shear_y(im, args[0]),
    "TranslateX": lambda im, m, args: translate_x(im, args[0]),
    "TranslateY": lambda im, m, args: translate_y(im, args[0]),
    "Cutout": lambda im, m, args: cutout(im, args[1], args[2], level_arguments(m)["half_side"]),
    "SolarizeAdd": lambda im, m, args: solarize_add(im, level_arguments(m)["addition"]),
}
OP_NAMES = tuple(OPS)


def apply_op(name: str, image: np.ndarray, magnitude: float,
             rng: np.random.Generator) -> np.ndarray:
    """The op at `magnitude`, its random choices drawn from `rng` (None for ops without any)."""
    try:
        op = OPS[name]
    except KeyError:
        raise ValueError(f"unknown RandAugment op {name!r}; choose from {OP_NAMES}") from None
    return op(image, float(magnitude), draw_args(name, float(magnitude), rng, *image.shape[:2]))


def randaugment(image: np.ndarray, rng: np.random.Generator, layers: int,
                magnitude: float) -> np.ndarray:
    """`layers` ops, each drawn uniformly from the 16 and applied at `magnitude`."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"RandAugment takes uint8 HWC RGB images, got {image.dtype} "
                         f"{image.shape}")
    for _ in range(layers):
        name = OP_NAMES[int(rng.integers(0, len(OP_NAMES)))]
        image = apply_op(name, image, magnitude, rng)
    return image


# Per layer, what data.device_augment applies: an affine matrix (a, b, c, d, e, f) and a
# cutout centre (y, x), computed here in float64 as the NumPy ops compute them.
PLAN_ARGS = 8


def plan(rng: np.random.Generator, layers: int, magnitude: float, height: int,
         width: int) -> tuple[np.ndarray, np.ndarray]:
    """What `randaugment` draws from `rng` for an image of that size, as (op indices [layers]
    int32, [layers, PLAN_ARGS] float64): the NumPy path and the device path draw alike."""
    ops, args = np.zeros(layers, np.int32), np.zeros((layers, PLAN_ARGS))
    for layer in range(layers):
        ops[layer] = int(rng.integers(0, len(OP_NAMES)))
        name = OP_NAMES[ops[layer]]
        value, centre_y, centre_x = draw_args(name, float(magnitude), rng, height, width)
        matrix = affine_matrix(name, value, height, width) if name in GEOMETRIC else (0.0,) * 6
        args[layer] = (*matrix, centre_y, centre_x)
    return ops, args
