"""RandAugment's 16 operations against their TF1 AutoAugment definitions (PIL's ImageOps where
the TF1 code reproduces PIL), and the layer loop."""

import collections

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from data import randaugment as ra


def random_image(height=24, width=32, seed=0, low=0, high=256):
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, (height, width, 3), dtype=np.uint8)


def pil_op(op, image, *args):
    return np.asarray(op(Image.fromarray(image), *args))


@pytest.mark.parametrize("name", ra.OP_NAMES)
@pytest.mark.parametrize("magnitude", [0.0, 5.0, 10.0, 15.0, 30.0])
def test_every_op_keeps_shape_dtype_and_is_deterministic(name, magnitude):
    image = random_image()
    first = ra.apply_op(name, image, magnitude, np.random.default_rng(1))
    again = ra.apply_op(name, image, magnitude, np.random.default_rng(1))
    assert first.shape == image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)


def test_there_are_the_sixteen_ops_of_the_official_list():
    assert ra.OP_NAMES == (
        "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
        "Cutout", "SolarizeAdd")


# The pixel ops that the TF1 code writes after PIL's ImageOps.


def test_auto_contrast_equalize_invert_posterize_solarize_equal_pil():
    image = random_image(low=40, high=180)
    image[:, :, 2] = 90  # a flat channel is left alone
    np.testing.assert_array_equal(ra.auto_contrast(image), pil_op(ImageOps.autocontrast, image))
    assert ra.auto_contrast(image)[:, :, 0].min() == 0
    assert ra.auto_contrast(image)[:, :, 0].max() == 255
    for seed in range(3):
        skewed = (random_image(seed=seed).astype(np.float32) ** 2 / 255).astype(np.uint8)
        np.testing.assert_array_equal(ra.equalize(skewed), pil_op(ImageOps.equalize, skewed))
    np.testing.assert_array_equal(ra.invert(image), 255 - image)
    for bits in range(1, 9):
        np.testing.assert_array_equal(ra.posterize(image, bits),
                                      pil_op(ImageOps.posterize, image, bits))
    for threshold in (0, 100, 128, 255):
        np.testing.assert_array_equal(ra.solarize(image, threshold),
                                      pil_op(ImageOps.solarize, image, threshold))


def test_posterize_and_solarize_at_large_magnitudes():
    image = random_image()
    # int(M / 10 * 4) bits: 8 and more keep every bit; 0 bits is TF's shift clamped to 7.
    np.testing.assert_array_equal(ra.apply_op("Posterize", image, 20.0, None), image)
    np.testing.assert_array_equal(ra.apply_op("Posterize", image, 30.0, None), image)
    np.testing.assert_array_equal(ra.posterize(image, 0), image & 0x80)
    # Threshold int(M / 10 * 256) >= 256 at M >= 10: nothing is inverted.
    np.testing.assert_array_equal(ra.apply_op("Solarize", image, 10.0, None), image)
    assert not np.array_equal(ra.apply_op("Solarize", image, 5.0, None), image)


def test_solarize_add():
    image = random_image()
    out = ra.solarize_add(image, 110)
    low = image < 128
    np.testing.assert_array_equal(out[low], np.minimum(image[low].astype(int) + 110, 255))
    np.testing.assert_array_equal(out[~low], image[~low])
    np.testing.assert_array_equal(ra.apply_op("SolarizeAdd", image, 10.0, None), out)


# Blends: image1 + factor * (image2 - image1), clipped and truncated to uint8.


def test_blend():
    black, image = np.zeros((2, 2, 3), np.uint8), random_image(2, 2)
    np.testing.assert_array_equal(ra.blend(black, image, 0.0), black)
    np.testing.assert_array_equal(ra.blend(black, image, 1.0), image)
    np.testing.assert_array_equal(ra.blend(black, image, 0.5), (image * 0.5).astype(np.uint8))
    np.testing.assert_array_equal(ra.blend(black, image, 2.8),
                                  np.clip(image * np.float32(2.8), 0, 255).astype(np.uint8))


def test_brightness_color_contrast_sharpness():
    image = random_image()
    np.testing.assert_array_equal(ra.brightness(image, 0.0), 0)
    np.testing.assert_array_equal(ra.brightness(image, 1.0), image)
    # Color 0 is TF's grayscale: luma (0.2989, 0.5870, 0.1140) scaled by 255.5 and truncated.
    gray = ra.color(image, 0.0)
    luma = image.astype(np.float32) / 255 @ np.float32([0.2989, 0.5870, 0.1140])
    np.testing.assert_array_equal(gray[:, :, 0], (luma * np.float32(255.5)).astype(np.uint8))
    assert np.array_equal(gray[:, :, 0], gray[:, :, 1]) and np.array_equal(gray[..., 1],
                                                                              gray[..., 2])
    np.testing.assert_array_equal(ra.color(image, 1.0), image)
    # Contrast blends towards the TF1 "mean": pixel count / 256 (24 * 32 / 256 = 3).
    np.testing.assert_array_equal(ra.contrast(image, 0.0), 3)
    np.testing.assert_array_equal(ra.contrast(random_image(64, 1040), 0.0), 255)
    # Sharpness 0 is PIL's SMOOTH kernel inside a 1-pixel border, truncated.
    smooth = ra.sharpness(image, 0.0)
    pixels = image.astype(np.float32)
    window = sum(pixels[dy:dy + 22, dx:dx + 30] for dy in range(3) for dx in range(3))
    expected = ((window + 4 * pixels[1:-1, 1:-1]) / 13).astype(np.uint8)
    np.testing.assert_array_equal(smooth[1:-1, 1:-1], expected)
    np.testing.assert_array_equal(smooth[0], image[0])
    np.testing.assert_array_equal(smooth[:, -1], image[:, -1])
    flat = np.full((5, 5, 3), 77, np.uint8)
    np.testing.assert_array_equal(ra.sharpness(flat, 2.8), flat)
    # The enhance factor is M / 10 * 1.8 + 0.1: M = 15 gives 2.8, beyond PIL's usual 1.9.
    np.testing.assert_array_equal(ra.apply_op("Brightness", image, 15.0, None),
                                  ra.brightness(image, 2.8))


# Geometric ops: nearest neighbour, uncovered pixels filled with 128.


def test_rotate():
    image = random_image(9, 9, low=0, high=100)
    np.testing.assert_array_equal(ra.rotate(image, 0.0), image)
    # Counter-clockwise about the centre: a quarter turn of a square image is np.rot90.
    np.testing.assert_array_equal(ra.rotate(image, 90.0), np.rot90(image))
    np.testing.assert_array_equal(ra.rotate(image, -90.0), np.rot90(image, -1))
    tilted = ra.rotate(random_image(20, 20, low=0, high=100), 30.0)
    assert (tilted[0, 0] == ra.FILL).all() and (tilted[10, 10] < 100).all()


def test_translate_and_shear():
    image = random_image(10, 12, low=0, high=100)
    moved = ra.translate_x(image, 3.0)
    np.testing.assert_array_equal(moved[:, :9], image[:, 3:])
    assert (moved[:, 9:] == ra.FILL).all()
    moved = ra.translate_y(image, -4.0)
    np.testing.assert_array_equal(moved[4:], image[:6])
    assert (moved[:4] == ra.FILL).all()
    # ShearX: row y reads x + level * y (rounded half away from zero).
    sheared = ra.shear_x(image, 0.3)
    for y in range(10):
        shift = int(np.floor(0.3 * y + 0.5))
        np.testing.assert_array_equal(sheared[y, :12 - shift], image[y, shift:])
    sheared = ra.shear_y(image, -0.3)
    np.testing.assert_array_equal(sheared[:, 0], image[:, 0])
    # Translation is 100 px at M = 10 and 150 px at M = 15: a 64 px image leaves the frame.
    np.testing.assert_array_equal(ra.apply_op("TranslateX", random_image(64, 64), 15.0,
                                              np.random.default_rng(0)), ra.FILL)


def test_cutout():
    image = random_image(30, 40, low=0, high=100)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out = ra.cutout(image, int(rng.integers(0, 30)), int(rng.integers(0, 40)), 6)
        filled = (out == ra.FILL).all(axis=2)
        rows, cols = np.nonzero(filled)
        assert filled[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert rows.max() - rows.min() + 1 <= 12 and cols.max() - cols.min() + 1 <= 12
        np.testing.assert_array_equal(out[~filled], image[~filled])
    # Half-side int(M / 10 * 40): 40 at M = 10, so an 80 px square when inside the image.
    full = ra.apply_op("Cutout", random_image(200, 200, low=0, high=100), 10.0,
                       np.random.default_rng(3))
    rows, cols = np.nonzero((full == ra.FILL).all(axis=2))
    assert rows.max() - rows.min() + 1 <= 80 and cols.max() - cols.min() + 1 <= 80


# Magnitude -> argument, as `level_to_arg` of the TF1 code (tensorflow/tpu,
# models/official/efficientnet/autoaugment.py, _MAX_LEVEL = 10): `_rotate_level_to_arg`
# (M / 10 * 30 degrees), `_shear_level_to_arg` (M / 10 * 0.3), both negated half the time
# (`_randomly_negate_tensor`), and `_enhance_level_to_arg` (M / 10 * 1.8 + 0.1).

REFERENCE_ARGUMENTS = {
    "Rotate": ("rotate", lambda m: m / 10 * 30.0, True),
    "ShearX": ("shear_x", lambda m: m / 10 * 0.3, True),
    "ShearY": ("shear_y", lambda m: m / 10 * 0.3, True),
    "Color": ("color", lambda m: m / 10 * 1.8 + 0.1, False),
    "Contrast": ("contrast", lambda m: m / 10 * 1.8 + 0.1, False),
    "Brightness": ("brightness", lambda m: m / 10 * 1.8 + 0.1, False),
    "Sharpness": ("sharpness", lambda m: m / 10 * 1.8 + 0.1, False),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_ARGUMENTS))
def test_magnitude_maps_to_the_reference_argument(name, monkeypatch):
    function, reference, signed = REFERENCE_ARGUMENTS[name]
    seen = []
    monkeypatch.setattr(ra, function, lambda image, argument: seen.append(argument) or image)
    image = random_image(4, 4)
    for magnitude in (0.0, 3.0, 7.0, 10.0, 15.0):
        seen.clear()
        for seed in range(40):
            ra.apply_op(name, image, magnitude, np.random.default_rng(seed))
        expected = reference(magnitude)
        assert len(seen) == 40
        assert all(abs(a) == pytest.approx(expected, rel=1e-12, abs=1e-12) for a in seen)
        # Geometric ops go either way, about equally often; the enhance factors never flip.
        positive = sum(a > 0 for a in seen)
        if signed and magnitude > 0:
            assert 10 <= positive <= 30
        else:
            assert all(a >= 0 for a in seen)


def pil_rotate(image, degrees):
    return np.asarray(Image.fromarray(image).rotate(
        degrees, resample=Image.Resampling.NEAREST, fillcolor=(ra.FILL,) * 3))


@pytest.mark.parametrize("magnitude", [3.0, 5.0, 10.0])   # 9, 15 and 30 degrees
def test_rotate_op_equals_pil_rotate(magnitude):
    """tf.contrib.image.rotate (counter-clockwise about the centre, nearest neighbour) samples
    the pixels PIL's Image.rotate does; either sign, as the layer draws it."""
    image = random_image(24, 32)
    degrees = magnitude / 10 * 30.0
    clockwise, counter = pil_rotate(image, -degrees), pil_rotate(image, degrees)
    assert not np.array_equal(clockwise, counter)
    signs = set()
    for seed in range(12):
        out = ra.apply_op("Rotate", image, magnitude, np.random.default_rng(seed))
        if np.array_equal(out, counter):
            signs.add(1)
        else:
            np.testing.assert_array_equal(out, clockwise)
            signs.add(-1)
    assert signs == {1, -1}


def sheared_by_hand(image, level, axis):
    """TF's projective transform with NEAREST: output (x, y) reads input (x + level y, y)
    (ShearX) or (x, y + level x) (ShearY), rounded half away from zero (std::round), FILL
    outside. (PIL's affine transform samples pixel centres, which differs by level / 2.)"""
    height, width = image.shape[:2]
    out = np.full_like(image, ra.FILL)
    for y in range(height):
        for x in range(width):
            source_x, source_y = (x + level * y, y) if axis == "x" else (x, y + level * x)
            source_x, source_y = (int(np.sign(v) * np.floor(abs(v) + 0.5))
                                  for v in (source_x, source_y))
            if 0 <= source_x < width and 0 <= source_y < height:
                out[y, x] = image[source_y, source_x]
    return out


@pytest.mark.parametrize("name,axis", [("ShearX", "x"), ("ShearY", "y")])
def test_shear_op_by_hand(name, axis):
    image = random_image(24, 32)
    # Levels 0.09, 0.21, 0.39: no source coordinate on this image falls on a rounding tie.
    for magnitude in (3.0, 7.0, 13.0):
        level = magnitude / 10 * 0.3
        both = {sign: sheared_by_hand(image, sign * level, axis) for sign in (1, -1)}
        signs = set()
        for seed in range(12):
            out = ra.apply_op(name, image, magnitude, np.random.default_rng(seed))
            sign = 1 if np.array_equal(out, both[1]) else -1
            np.testing.assert_array_equal(out, both[sign])
            signs.add(sign)
        assert signs == {1, -1}


@pytest.mark.parametrize("name,enhancer", [("Color", ImageEnhance.Color),
                                           ("Sharpness", ImageEnhance.Sharpness)])
def test_color_and_sharpness_ops_match_pil_image_enhance(name, enhancer):
    """The TF1 Color and Sharpness are PIL's ImageEnhance at the same factor, up to rounding:
    TF's grey is luma x 255.5 truncated (PIL's "L" rounds) and its smoothing truncates (PIL's
    filter rounds), a level in the degenerate image that a blend factor in [0.1, 1.9] keeps
    within a level. A wrong factor (or its sign) moves pixels by tens of levels."""
    image = random_image(24, 32)
    for magnitude in (0.0, 2.0, 5.0, 8.0, 10.0):
        factor = magnitude / 10 * 1.8 + 0.1
        expected = np.asarray(enhancer(Image.fromarray(image)).enhance(factor))
        out = ra.apply_op(name, image, magnitude, np.random.default_rng(0))
        assert np.abs(out.astype(int) - expected).max() <= 1, magnitude
        if magnitude != 5.0:    # factor 1 is the identity
            assert np.abs(out.astype(int) - image).max() > 10


def test_contrast_op_by_hand():
    """TF1 Contrast: blend (in float32, truncated) with a flat grey of pixels / 256, not the
    mean grey PIL's ImageEnhance.Contrast uses; 16 x 32 pixels give grey 2."""
    image = random_image(16, 32)
    for magnitude in (0.0, 2.0, 8.0, 10.0, 15.0):
        factor = np.float32(magnitude / 10 * 1.8 + 0.1)
        expected = np.clip(np.float32(2) + factor * (image.astype(np.float32) - np.float32(2)),
                           0, 255).astype(np.uint8)
        np.testing.assert_array_equal(
            ra.apply_op("Contrast", image, magnitude, np.random.default_rng(0)), expected)


# The layer loop.


def test_randaugment_draws_ops_uniformly_and_always_applies_them(monkeypatch):
    applied = collections.Counter()
    original = ra.apply_op

    def spy(name, image, magnitude, rng):
        applied[name] += 1
        return original(name, image, magnitude, rng)

    monkeypatch.setattr(ra, "apply_op", spy)
    image = random_image(16, 16)
    for seed in range(400):
        ra.randaugment(image, np.random.default_rng(seed), layers=4, magnitude=15.0)
    assert sum(applied.values()) == 1600 and set(applied) == set(ra.OP_NAMES)
    assert min(applied.values()) > 60 and max(applied.values()) < 145   # 100 expected


def test_randaugment_is_deterministic_for_a_seed():
    image = random_image(32, 32)
    outputs = [ra.randaugment(image, np.random.default_rng(s), 4, 10.0) for s in (7, 7, 8)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])
    np.testing.assert_array_equal(ra.randaugment(image, np.random.default_rng(0), 0, 10.0),
                                  image)
    with pytest.raises(ValueError, match="uint8 HWC RGB"):
        ra.randaugment(image.astype(np.float32), np.random.default_rng(0), 2, 10.0)
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'"):
        ra.apply_op("Blur", image, 10.0, np.random.default_rng(0))
