"""The train batch's per-batch work that reads no file - RandAugment, MixUp / CutMix and
normalisation - as a JAX function that runs inside the jitted train step, on the accelerator
(`data.augment_on_device`). The host still decodes, crops, flips and resizes each example, and
draws every random choice as the NumPy path does, from the same seeded streams in the same order
(data/classification.py); the batch carries those draws ("plans") beside the unmixed images. So
host-count independence and exact resume are the NumPy path's.

The ops are the NumPy ones (data/randaugment.py, data/augment.py) written for one image in JAX,
with float32 arithmetic in the same order, and every image equals the NumPy path's bit for bit
(tests/test_device_augment.py, on XLA:CPU). That takes one precaution (`_product`): left alone,
XLA fuses a product and the sum that reads it into one multiply-add, which rounds once where
NumPy rounds twice, and the ulp between them is enough to flip a truncation to uint8 or a
nearest source pixel. (Normalisation multiplies by the reciprocal of std on both paths, as
XLA's division does.) Accelerators were not compared here: where their division or a dot
rounds otherwise than XLA:CPU's, a pixel may land one level apart.

Batch layout (B rows of E examples, E = 2 when the recipe mixes, else 1; L RandAugment layers):
    images      float32 [B, E, size, size, 3]   unmixed, unnormalised (float32: TF's bicubic
                                                resize overshoots [0, 255], and mixing sees that)
    ra_ops      int32   [B, E or 1, L]          op indices (per example before mixing, per row
    ra_args     float32 [B, E or 1, L, 8]       after), randaugment.plan's args
    mix_weights float32 [B, 2]                  MixUp's lambda and 1 - lambda, each rounded
    mix_box     int32   [B, 4]                  CutMix's (top, left, height, width)
    mix_cutmix  bool    [B]                     CutMix (else MixUp) for the row
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data import augment
from data import randaugment as ra

# The batch keys the device path adds.
PLAN_KEYS = ("ra_ops", "ra_args", "mix_weights", "mix_box", "mix_cutmix")


def _product(a, b):
    """a * b rounded to float32 before it is added to anything, as NumPy rounds it. XLA would
    fuse it into the sum that reads it (one fused multiply-add: one rounding, not two); a select
    it cannot see through keeps them apart. The select keeps every finite product."""
    product = a * b
    return jnp.where(jnp.isfinite(product), product, 0.0)


def _to_uint8(values):
    """TF's float -> uint8 cast: clip to the range, then truncate toward zero."""
    return jnp.clip(values, 0.0, 255.0).astype(jnp.uint8)


def _blend(image1, image2, factor: float):
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    image1 = image1.astype(jnp.float32)
    return _to_uint8(image1 + _product(np.float32(factor), image2.astype(jnp.float32) - image1))


def _auto_contrast(image, args):
    channels = image.astype(jnp.float32)
    low, high = channels.min(axis=(0, 1)), channels.max(axis=(0, 1))
    stretch = high > low
    scale = np.float32(255.0) / jnp.where(stretch, high - low, 1.0)
    return jnp.where(stretch, _to_uint8(_product(channels, scale) - _product(low, scale)),
                     image)


def _equalize_channel(channel):
    histogram = jnp.zeros(256, jnp.int32).at[channel.ravel()].add(1)
    last = 255 - jnp.argmax(histogram[::-1] > 0)     # the last occupied bin
    step = (channel.size - histogram[last]) // 255
    lut = (jnp.cumsum(histogram) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
    return jnp.where(step == 0, channel, lut[channel].astype(jnp.uint8))


def _equalize(image, args):
    return jnp.stack([_equalize_channel(image[:, :, c]) for c in range(3)], axis=-1)


def _grayscale(image):
    luma = jnp.dot(image.astype(jnp.float32) / np.float32(255.0), ra.GRAY_WEIGHTS,
                   precision=jax.lax.Precision.HIGHEST)   # TPUs' default would round to bf16
    return (luma * np.float32(255.5)).astype(jnp.uint8)


def _sharpness_degenerate(image):
    pixels = image.astype(jnp.float32)
    height, width = image.shape[:2]
    smooth = 4.0 * pixels[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            smooth = smooth + pixels[dy:dy + height - 2, dx:dx + width - 2]
    return image.at[1:-1, 1:-1].set(_to_uint8(smooth / np.float32(13.0)))


def _round_half_away(values):
    return jnp.sign(values) * jnp.floor(jnp.abs(values) + 0.5)


def _affine(image, args):
    a, b, c, d, e, f = (args[i] for i in range(6))
    height, width = image.shape[:2]
    y, x = (v.astype(jnp.float32) for v in jnp.mgrid[0:height, 0:width])
    source_x = _round_half_away(_product(a, x) + _product(b, y) + c)
    source_y = _round_half_away(_product(d, x) + _product(e, y) + f)
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    flat = (jnp.clip(source_y, 0, height - 1).astype(jnp.int32) * width
            + jnp.clip(source_x, 0, width - 1).astype(jnp.int32))
    sampled = image.reshape(height * width, 3)[flat]
    return jnp.where(inside[:, :, None], sampled, np.uint8(ra.FILL))


def _in_box(height: int, width: int, top, left, box_height, box_width):
    """[height, width, 1] mask of the pixels in rows [top, top + box_height) and columns
    [left, left + box_width) (bounds may lie outside the image)."""
    y = jnp.arange(height)[:, None]
    x = jnp.arange(width)[None, :]
    inside = (y >= top) & (y < top + box_height) & (x >= left) & (x < left + box_width)
    return inside[:, :, None]


def _cutout(image, args, half_side: int):
    centre_y, centre_x = args[6].astype(jnp.int32), args[7].astype(jnp.int32)
    inside = _in_box(*image.shape[:2], centre_y - half_side, centre_x - half_side,
                     2 * half_side, 2 * half_side)
    return jnp.where(inside, np.uint8(ra.FILL), image)


def _ops(magnitude: float, height: int, width: int) -> dict:
    """The 16 ops at `magnitude` as functions (image uint8 [H, W, 3], args [PLAN_ARGS])."""
    arguments = ra.level_arguments(magnitude)
    factor, threshold, addition = (arguments[k] for k in ("factor", "threshold", "addition"))
    shift = ra.posterize_shift(arguments["bits"])
    grey = ra.contrast_grey(height, width)

    def solarize_add(image, args):
        added = jnp.clip(image.astype(jnp.int32) + addition, 0, 255).astype(jnp.uint8)
        return jnp.where(image < 128, added, image)

    ops = {
        "AutoContrast": _auto_contrast,
        "Equalize": _equalize,
        "Invert": lambda image, args: 255 - image,
        "Rotate": _affine,
        "Posterize": lambda image, args: (image >> shift) << shift,
        "Solarize": lambda image, args: jnp.where(image.astype(jnp.int32) < threshold, image,
                                                  255 - image),
        "Color": lambda image, args: _blend(
            jnp.repeat(_grayscale(image)[:, :, None], 3, axis=2), image, factor),
        "Contrast": lambda image, args: _blend(jnp.full_like(image, grey), image, factor),
        "Brightness": lambda image, args: _blend(jnp.zeros_like(image), image, factor),
        "Sharpness": lambda image, args: _blend(_sharpness_degenerate(image), image, factor),
        "ShearX": _affine,
        "ShearY": _affine,
        "TranslateX": _affine,
        "TranslateY": _affine,
        "Cutout": lambda image, args: _cutout(image, args, arguments["half_side"]),
        "SolarizeAdd": solarize_add,
    }
    assert tuple(ops) == ra.OP_NAMES
    return ops


def randaugment(image, ops, args, magnitude: float):
    """One uint8 [H, W, 3] image through the layers `randaugment.plan` drew (ops [L] int32,
    args [L, PLAN_ARGS] float32)."""
    branches = list(_ops(magnitude, *image.shape[:2]).values())
    for layer in range(ops.shape[0]):
        image = jax.lax.switch(ops[layer], branches, image, args[layer])
    return image


def _randaugment_floats(images, ops, args, magnitude: float):
    """float32 images [N, H, W, 3] -> RandAugment on their uint8 truncation, back as float32."""
    out = jax.vmap(randaugment, in_axes=(0, 0, 0, None))(_to_uint8(images), ops, args,
                                                         magnitude)
    return out.astype(jnp.float32)


def _mix(first, second, weights, box, cutmix):
    """One row: MixUp's weighted sum, or CutMix's box from the first image on the second."""
    pasted = jnp.where(_in_box(*first.shape[:2], *(box[i] for i in range(4))), first, second)
    return jnp.where(cutmix, pasted, _product(weights[0], first) + _product(weights[1], second))


def finish(batch: dict, *, magnitude: float, augments_each: bool, augments_rows: bool,
           mixes: bool, mean, std):
    """The model's input images [B, size, size, 3] float32 from a device-path batch: the
    NumPy path's RandAugment (on each example or on each mixed row, as the recipe places it),
    mixing and normalisation, in its order."""
    images = batch["images"]
    rows, examples = images.shape[:2]
    if augments_each:
        flat = images.reshape(rows * examples, *images.shape[2:])
        ops = batch["ra_ops"].reshape(rows * examples, -1)
        args = batch["ra_args"].reshape(rows * examples, -1, ra.PLAN_ARGS)
        images = _randaugment_floats(flat, ops, args, magnitude).reshape(images.shape)
    if mixes:
        images = jax.vmap(_mix)(images[:, 0], images[:, 1], batch["mix_weights"],
                                batch["mix_box"], batch["mix_cutmix"])
        if augments_rows:
            images = _randaugment_floats(images, batch["ra_ops"][:, 0], batch["ra_args"][:, 0],
                                         magnitude)
    else:
        images = images[:, 0]
    return augment.normalize(images, mean, std)
