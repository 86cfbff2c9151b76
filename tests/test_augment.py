"""Per-image augmentation and preprocessing ops and the mixing ops, against their definitions."""

import numpy as np
import pytest
from PIL import Image

from data import augment, resize


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# Crops.


@pytest.mark.parametrize("min_area", [0.08, 0.5])
def test_torchvision_crop_box_ranges(min_area):
    rng = np.random.default_rng(0)
    height, width = 200, 300
    for _ in range(300):
        top, left, crop_height, crop_width = augment.random_resized_crop_box(
            rng, height, width, min_area)
        assert 0 <= top <= height - crop_height
        assert 0 <= left <= width - crop_width
        # Rounding to whole pixels moves area and aspect by at most about a pixel's worth.
        area = crop_height * crop_width / (height * width)
        assert min_area - 0.01 <= area <= 1.0
        assert 3 / 4 - 0.02 <= crop_width / crop_height <= 4 / 3 + 0.02


def test_torchvision_crop_falls_back_to_centre():
    # A 10x100 strip admits no crop of area >= 0.9 with aspect <= 4/3: centre crop at 4/3.
    box = augment.random_resized_crop_box(np.random.default_rng(0), 10, 100, min_area=0.9)
    assert box == (0, 43, 10, 13)


def test_tf_crop_box_ranges():
    rng = np.random.default_rng(0)
    height, width = 375, 500
    heights, tops = [], []
    for _ in range(2000):
        top, left, crop_height, crop_width = augment.tf_crop_box(rng, height, width, 0.08)
        if (crop_height, crop_width) == (height, width):
            continue
        # TF draws offsets in [0, size - crop): the last offset never comes up.
        assert 0 <= top < height - crop_height or crop_height == height
        assert 0 <= left < width - crop_width or crop_width == width
        # The min_object_covered 0.1 of the NFNet pipeline is stricter than its 0.08 area.
        assert crop_height * crop_width >= 0.1 * height * width
        assert 3 / 4 - 0.01 <= crop_width / crop_height <= 4 / 3 + 0.01
        heights.append(crop_height)
        tops.append(top)
    # Heights are drawn uniformly (torchvision draws areas): their histogram is flat-ish
    # over the range most aspect ratios allow.
    counts, _ = np.histogram(heights, bins=4, range=(140, 330))
    assert counts.min() > 0.6 * counts.max()


def test_tf_crop_falls_back_to_padded_centre_crop():
    # No crop of a 10x100 strip has area >= 0.9 and aspect within [3/4, 4/3].
    assert augment.tf_crop_box(np.random.default_rng(0), 10, 100, 0.9) == (0, 0, 10, 100)
    box = augment.train_crop_box(np.random.default_rng(0), 10, 100, "tf", 0.9, 24)
    # Side int(10 / (24 + 32) * 24) = 4, offsets rounded up: (10 - 4 + 1) // 2, (100 - 4 + 1) // 2.
    assert box == augment.padded_centre_crop_box(10, 100, 24) == (3, 48, 4, 4)
    # A 256x256 image at 224 px: the central 224 / 256 of it.
    assert augment.padded_centre_crop_box(256, 256, 224) == (16, 16, 224, 224)


# Resizing.


def test_tf_bicubic_definition():
    image = random_image(9, 13)
    np.testing.assert_allclose(resize.tf_bicubic(image, 9, 13), image, atol=1e-4)
    constant = np.full((7, 11, 3), 77, np.uint8)
    np.testing.assert_allclose(resize.tf_bicubic(constant, 20, 5), 77, rtol=1e-6)
    # Doubling: output pixel 1 sits at input 0.25 (half-pixel centres): Keys weights at
    # distances 1.25, 0.25, 0.75, 1.75, the first tap outside and dropped, then renormalised.
    row = np.array([[0, 100, 50, 200]], np.uint8)[:, :, None].repeat(3, axis=2)
    keys = {d: (1.5 * d - 2.5) * d * d + 1 if d <= 1 else ((-0.5 * d + 2.5) * d - 4) * d + 2
            for d in (0.25, 0.75, 1.75)}
    weights = np.array([keys[0.25], keys[0.75], keys[1.75]])
    expected = weights @ np.array([0.0, 100.0, 50.0]) / weights.sum()
    out = resize.tf_bicubic(row, 1, 8)
    assert out.dtype == np.float32
    assert out[0, 1, 0] == pytest.approx(expected, rel=1e-5)
    # No clamping: a sharp edge overshoots both ends.
    edge = np.zeros((8, 8, 3), np.uint8)
    edge[:, 4:] = 255
    upscaled = resize.tf_bicubic(edge, 8, 24)
    assert upscaled.min() < 0 and upscaled.max() > 255


def triangle_weights(in_size, out_size):
    """(out_size, in_size) weights of PIL's bilinear resampling along one axis: a triangle of
    half-width max(scale, 1) (widened when shrinking: antialiasing) around each output pixel's
    centre (j + 0.5) * scale, in half-pixel input coordinates, renormalised at the edges."""
    scale = in_size / out_size
    centres = (np.arange(out_size) + 0.5) * scale
    distances = (np.arange(in_size)[None, :] + 0.5 - centres[:, None]) / max(scale, 1.0)
    weights = np.maximum(0.0, 1.0 - np.abs(distances))
    return weights / weights.sum(axis=1, keepdims=True)


def test_pil_resize():
    image = random_image(40, 60)
    for height, width in ((10, 20), (57, 83)):    # shrinking (antialiased) and enlarging
        out = resize.pil(image, height, width, "bilinear")
        assert out.shape == (height, width, 3) and out.dtype == np.uint8
        # By hand: the separable triangle filter. PIL rounds to uint8 after each pass (and
        # works in fixed point), so within one level; bicubic, box, hamming, lanczos and
        # nearest are 10 or more levels away on this image.
        expected = np.einsum("yi,ijc,xj->yxc", triangle_weights(40, height),
                             image.astype(np.float64), triangle_weights(60, width))
        np.testing.assert_allclose(out, expected, atol=1.0)
        # Each name is PIL's filter of that name, exactly; (height, width) is PIL's (w, h).
        for name in resize.INTERPOLATIONS:
            pil_filter = getattr(Image.Resampling, name.upper())
            np.testing.assert_array_equal(
                resize.pil(image, height, width, name),
                np.asarray(Image.fromarray(image).resize((width, height), pil_filter)))
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        resize.pil(image, 10, 10, "cubic")


def test_flip_is_an_involution():
    image = random_image(5, 7)
    assert not np.array_equal(augment.flip(image), image)
    np.testing.assert_array_equal(augment.flip(augment.flip(image)), image)
    flips = {augment.random_flip(image, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert flips == {image.tobytes(), augment.flip(image).tobytes()}


@pytest.mark.parametrize("fill", augment.PAD_FILLS)
def test_random_pad_crop_translates_within_the_padding(fill):
    """Every crop is the image shifted by (dy, dx) in [-pad, pad]^2, the uncovered border the
    fill (the mean colour, black, or the image mirrored about its edge), and all 81 offsets of
    a 4 px pad occur."""
    image = random_image(8, 10).astype(np.float32)
    mean = (10.0, 20.0, 30.0)
    rng = np.random.default_rng(0)
    padded = {"mean": np.pad(image, ((4, 4), (4, 4), (0, 0))) + 0,
              "zeros": np.pad(image, ((4, 4), (4, 4), (0, 0))),
              "reflect": np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")}[fill]
    if fill == "mean":
        border = np.ones(padded.shape[:2], bool)
        border[4:12, 4:14] = False
        padded[border] = mean
    offsets = set()
    for _ in range(2000):
        crop = augment.random_pad_crop(image, rng, 4, fill, mean)
        assert crop.shape == image.shape
        matches = [(top, left) for top in range(9) for left in range(9)
                   if np.array_equal(crop, padded[top:top + 8, left:left + 10])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) == 81


# Eval preprocessing.


def test_eval_preprocess_definitions():
    image = random_image(50, 70)
    for method in augment.EVAL_PREPROCESSORS:
        for image_ops, interpolation in (("tf", "bicubic"), ("torchvision", "bilinear")):
            out = augment.eval_preprocess(image, method, 32, 0.875, image_ops, interpolation)
            assert out.shape == (32, 32, 3) and out.dtype == np.float32
    # torchvision: shorter side floor(32 / 0.875) = 36, longer int(36 * 70 / 50) = 50, then
    # CenterCrop offsets round((36 - 32) / 2) = 2 and round((50 - 32) / 2) = 9.
    np.testing.assert_array_equal(
        augment.resize_shorter_crop(image, 32, 0.875, "bicubic"),
        resize.pil(image, 36, 50, "bicubic")[2:34, 9:41])
    # NFNet: the whole image to 64x64 (TF bicubic), centre 32.
    np.testing.assert_array_equal(augment.resize_crop_32(image, 32, "tf", "bicubic"),
                                  resize.tf_bicubic(image, 64, 64)[16:48, 16:48])
    # TF crop_resize: the central 32/64 of the shorter side (25 px), resized to 32.
    np.testing.assert_array_equal(augment.crop_resize(image, 32, "tf", "bicubic"),
                                  resize.tf_bicubic(image[13:38, 23:48], 32, 32))
    gray = augment.to_rgb(image[:, :, :1])
    assert gray.shape == (50, 70, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    with pytest.raises(ValueError, match="resizes bicubically"):
        augment.resize_to(image, 32, "tf", "bilinear")


def test_normalize_and_one_hot():
    images = np.full((1, 2, 2, 3), 128, np.uint8)
    out = augment.normalize(images, (128.0, 0.0, 64.0), (1.0, 2.0, 64.0))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0, 0], [0.0, 64.0, 1.0])
    np.testing.assert_array_equal(augment.one_hot([2, 0], 3), [[0, 0, 1], [1, 0, 0]])


# Mixing.


def constant(value, height=20, width=30):
    return np.full((height, width, 3), value, np.float32)


def test_mixup_pair_blends_with_beta_lambda():
    lams = []
    for seed in range(400):
        mixed, lam = augment.mixup_pair(constant(10.0), constant(20.0),
                                        np.random.default_rng(seed), 0.2)
        assert 0.0 <= lam <= 1.0 and mixed.dtype == np.float32
        np.testing.assert_allclose(mixed, 10 * lam + 20 * (1 - lam), rtol=1e-6)
        lams.append(lam)
    lams = np.array(lams)
    # Beta(0.2, 0.2): symmetric, U-shaped (P(lambda < 0.1 or > 0.9) = 0.62).
    assert abs(lams.mean() - 0.5) < 0.06
    assert 0.5 < np.mean((lams < 0.1) | (lams > 0.9)) < 0.75


def test_cutmix_box_area_is_lambda_and_within_bounds():
    height, width = 20, 30
    lams = []
    for seed in range(200):
        mixed, lam = augment.cutmix_pair(constant(1.0), constant(2.0),
                                         np.random.default_rng(seed))
        from_first = mixed[:, :, 0] == 1.0
        assert from_first.mean() == pytest.approx(lam)
        top, left, box_height, box_width = augment.cutmix_box(np.random.default_rng(seed),
                                                              height, width)
        assert 0 <= top <= top + box_height <= height and 0 <= left <= left + box_width <= width
        assert from_first[top:top + box_height, left:left + box_width].all()
        assert from_first.sum() == box_height * box_width
        lams.append(lam)
    assert min(lams) < 0.1 and max(lams) > 0.6


def test_mix_pair_targets_sum_to_one():
    first_target, second_target = augment.one_hot([1, 3], 4)
    for kind in augment.MIX_KINDS:
        image, target = augment.mix_pair(kind, constant(0.0), constant(1.0), first_target,
                                         second_target, np.random.default_rng(0), 0.2)
        # The first image is all 0 and the second all 1, so the mixed image's mean is the
        # second's share 1 - lambda (MixUp's weight, CutMix's area outside the box): the
        # targets weigh the classes by exactly those shares and give the others nothing.
        lam = 1.0 - float(image.mean())
        assert 0.0 < lam < 1.0
        np.testing.assert_allclose(target, [0.0, lam, 0.0, 1.0 - lam], atol=1e-6)
        assert target.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown mixing"):
        augment.mix_pair("blend", constant(0.0), constant(1.0), first_target, second_target,
                         np.random.default_rng(0), 0.2)


def test_mix_kind_alternates_with_both():
    assert [augment.mix_kind(r, True, True) for r in range(4)] == ["mixup", "cutmix"] * 2
    assert augment.mix_kind(3, True, False) == "mixup"
    assert augment.mix_kind(2, False, True) == "cutmix"
    assert augment.mix_kind(0, False, False) is None
