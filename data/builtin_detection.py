"""The built-in detection dataset: scikit-learn's digits pasted on 128x128 canvases, a TFDS
array_record dataset with coco/2017's features, so the detection `:local` experiments read it
through `tfds.data_source` like COCO and need no download.

Each canvas: a dark background with mild colour noise, 1-4 digits (data.builtin's 32x32
rendering, rescaled bilinearly to a side of 20..56 px, tinted) in disjoint squares. An object's
box is tight: the bounding box of its digit's pixels at or above `DIGIT_THRESHOLD` after scaling
(not the pasted square); its `point` is that box's centre, normalised (y, x). Test canvases use
the test digits only (data.builtin.split_indices). Every canvas is drawn from a generator seeded
by (SEED, split, index): the dataset is the same on every machine.
"""

import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from data import builtin

NAME = "sklearn_digits_detection"
VERSION_STRING = "1.0.0"
CLASS_NAMES = builtin.CLASS_NAMES   # ClassLabel(10): the digit
CANVAS_SIZE = 128
MIN_SIDE, MAX_SIDE = 20, 56         # a pasted digit's square side, px
MAX_DIGITS = 4
NUM_CANVASES = {"train": 1500, "test": 300}
SEED = 21
_SPLIT_STREAM = {"train": 0, "test": 1}
# A scaled digit's pixels at or above this (of 255) are the digit: its tight box covers them.
DIGIT_THRESHOLD = 64
NOISE_MAX = 24                      # background values are uniform in 0..NOISE_MAX per channel
TINT_RANGE = (0.6, 1.0)             # per-channel factor of a digit's colour
_PLACEMENT_ATTEMPTS = 50


def split_digits(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sklearn indices, gray 32x32 uint8 renderings, labels) of the split's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = builtin.split_indices(len(digits.target), split)
    gray = np.stack([np.asarray(builtin.digit_to_image(digits.images[i]))[:, :, 0]
                     for i in indices])
    return indices, gray, digits.target[indices].astype(np.int64)


def make_canvas(split: str, index: int, gray_digits: np.ndarray) -> dict:
    """Canvas `index` of `split`: {"image": uint8 (128, 128, 3), "boxes": int [n, 4] (ymin, xmin,
    ymax, xmax) px (max exclusive), "digits": [n] positions in `gray_digits` (the split's digits
    from `split_digits`)}."""
    rng = np.random.default_rng([SEED, _SPLIT_STREAM[split], int(index)])
    size = CANVAS_SIZE
    canvas = rng.integers(0, NOISE_MAX + 1, (size, size, 3)).astype(np.uint8)
    squares, boxes, chosen = [], [], []
    for _ in range(int(rng.integers(1, MAX_DIGITS + 1))):
        for _ in range(_PLACEMENT_ATTEMPTS):
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if all(top >= t + s or t >= top + side or left >= lf + s or lf >= left + side
                   for t, lf, s in squares):
                break
        else:
            continue    # the canvas is too full for another digit
        digit = int(rng.integers(len(gray_digits)))
        gray = np.asarray(Image.fromarray(gray_digits[digit]).resize(
            (side, side), Image.Resampling.BILINEAR))
        rows = np.flatnonzero((gray >= DIGIT_THRESHOLD).any(axis=1))
        cols = np.flatnonzero((gray >= DIGIT_THRESHOLD).any(axis=0))
        tint = rng.uniform(*TINT_RANGE, 3)
        if not len(rows):
            continue    # a blank digit (none in sklearn's set): nothing to detect
        patch = (gray[:, :, None] * tint).astype(np.uint8)
        region = canvas[top:top + side, left:left + side]
        np.maximum(region, patch, out=region)
        squares.append((top, left, side))
        boxes.append((top + rows[0], left + cols[0], top + rows[-1] + 1, left + cols[-1] + 1))
        chosen.append(digit)
    return {"image": canvas, "boxes": np.asarray(boxes, np.int64).reshape(-1, 4),
            "digits": np.asarray(chosen, np.int64)}


class SklearnDigitsDetection(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits pasted on 128x128 canvases, with coco/2017's features."""

    VERSION = tfds.core.Version(VERSION_STRING)
    RELEASE_NOTES = {VERSION_STRING: "Initial release."}
    code_path = epath.Path(__file__)   # as data.builtin.SklearnDigits

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's handwritten digits pasted on 128x128 canvases (1-4 digits, "
                "sides 20..56 px, disjoint), tight boxes, label = digit, point = box centre."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(CANVAS_SIZE, CANVAS_SIZE, 3),
                                             encoding_format="png"),
                "image/id": np.int64,
                "objects": tfds.features.Sequence({
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "is_crowd": np.bool_,
                    "point": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                }),
            }),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in NUM_CANVASES}

    def _generate_examples(self, split):
        _, gray_digits, labels = split_digits(split)
        for index in range(NUM_CANVASES[split]):
            canvas = make_canvas(split, index, gray_digits)
            boxes = canvas["boxes"].astype(np.float32) / CANVAS_SIZE
            centres = np.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], 1) / 2
            # A PIL image: TFDS encodes arrays with TensorFlow, PIL images (and the BBox /
            # Tensor features, which it writes with NumPy) without.
            yield index, {
                "image": Image.fromarray(canvas["image"]),
                "image/id": index,
                "objects": {
                    "bbox": [tfds.features.BBox(*map(float, box)) for box in boxes],
                    "label": [int(labels[d]) for d in canvas["digits"]],
                    "is_crowd": [False] * len(boxes),
                    "point": centres.astype(np.float32),
                },
            }


def prepare(data_dir: str | os.PathLike) -> pathlib.Path:
    """Prepares the dataset in data_dir unless it is there; safe to call concurrently."""
    return builtin.prepare_once(data_dir, SklearnDigitsDetection)
