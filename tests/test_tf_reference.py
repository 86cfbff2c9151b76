"""The "tf" image ops against TensorFlow's own kernels, which the NFNet pipeline ran on.

TensorFlow is only a reference here (the test extra installs it); training never imports it.
"""

import io

import numpy as np
import pytest

from data import augment, decode, randaugment, resize

tf = pytest.importorskip("tensorflow")


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(37, 53, 16, 20), (375, 500, 192, 192), (20, 30, 64, 48),
                                   (8, 8, 32, 32), (300, 301, 256, 256)])
def test_tf_bicubic_equals_tf_image_resize(shape):
    height, width, out_height, out_width = shape
    image = random_image(height, width)
    expected = tf.image.resize(image, (out_height, out_width), "bicubic").numpy()
    np.testing.assert_allclose(resize.tf_bicubic(image, out_height, out_width), expected,
                               atol=2e-4)


def test_grayscale_and_uint8_casts_equal_tf():
    image = random_image(30, 40)
    np.testing.assert_array_equal(randaugment.grayscale(image),
                                  tf.image.rgb_to_grayscale(image).numpy()[:, :, 0])
    values = np.linspace(-20, 300, 1001, dtype=np.float32)
    expected = tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.uint8).numpy()
    np.testing.assert_array_equal(randaugment._to_uint8(values), expected)
    # Posterize with 0 bits shifts by 8, which TF clamps to 7.
    shifted = tf.bitwise.left_shift(tf.bitwise.right_shift(image, 8), 8).numpy()
    np.testing.assert_array_equal(randaugment.posterize(image, 0), shifted)


@pytest.mark.parametrize("matrix", [
    (1.0, 0.3, 0.0, 0.0, 1.0, 0.0),                   # ShearX
    (1.0, 0.0, 0.0, -0.27, 1.0, 0.0),                 # ShearY
    (1.0, 0.0, -7.0, 0.0, 1.0, 0.0),                  # TranslateX
    (0.866, -0.5, 9.2, 0.5, 0.866, -6.1),             # a rotation
])
def test_affine_equals_tf_projective_transform(matrix):
    image = random_image(31, 40)
    transform = tf.constant([list(matrix) + [0.0, 0.0]], tf.float32)
    expected = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=[31, 40],
        fill_value=float(randaugment.FILL), interpolation="NEAREST",
        fill_mode="CONSTANT")[0].numpy()
    np.testing.assert_array_equal(randaugment.affine(image, matrix), expected)


def test_tf_crop_box_matches_sample_distorted_bounding_box_statistics():
    height, width, draws = 375, 500, 3000
    ours = np.array([augment.tf_crop_box(np.random.default_rng(s), height, width, 0.08)
                     for s in range(draws)])
    theirs = []
    for seed in range(draws):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3], bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=[seed, 0], min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
        theirs.append([begin[0], begin[1], size[0], size[1]])
    theirs = np.array(theirs)

    def stats(boxes):
        area = boxes[:, 2] * boxes[:, 3] / (height * width)
        return (area.mean(), np.median(boxes[:, 2]), (boxes[:, 3] / boxes[:, 2]).mean(),
                (boxes[:, 0] / (height - boxes[:, 2] + 1e-9)).mean(),
                np.mean(area == 1.0))

    ours_stats, their_stats = stats(ours), stats(theirs)
    # Means of 3000 draws: sampling error ~1-2%.
    np.testing.assert_allclose(ours_stats[:4], their_stats[:4], rtol=0.05)
    assert abs(ours_stats[4] - their_stats[4]) < 0.02
    for column in (2, 3):   # the ranges of crop heights and widths
        assert abs(ours[:, column].min() - theirs[:, column].min()) <= 5
        assert abs(ours[:, column].max() - theirs[:, column].max()) <= 10
    # torchvision's sampler (area uniform, not height) is told apart at this sample size.
    torchvision = np.array([augment.random_resized_crop_box(np.random.default_rng(s), height,
                                                            width, 0.08) for s in range(draws)])
    assert stats(torchvision)[0] > 1.08 * their_stats[0]


def test_decoded_jpeg_crop_equals_tf_decode_and_crop():
    """PIL decodes with libjpeg's accurate integer IDCT: TF's INTEGER_ACCURATE. (TF's default,
    which the official pipeline used, is INTEGER_FAST: pixels differ by a few levels.)"""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(random_image(120, 160)).save(buffer, format="JPEG", quality=90)
    encoded = buffer.getvalue()
    assert decode.image_size(encoded) == tuple(tf.image.extract_jpeg_shape(encoded).numpy()[:2])
    box = (13, 21, 70, 90)
    expected = tf.image.decode_and_crop_jpeg(encoded, box, channels=3,
                                             dct_method="INTEGER_ACCURATE").numpy()
    np.testing.assert_array_equal(decode.decode(encoded, box), expected)
