"""RandAugment's 16 operations against their TF1 AutoAugment definitions (PIL's ImageOps where
the TF1 code reproduces PIL), and the layer loop."""

import collections

import numpy as np
import pytest
from PIL import Image, ImageOps

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
        out = ra.cutout(image, np.random.default_rng(seed), 6)
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
