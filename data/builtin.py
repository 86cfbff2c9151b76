"""The built-in dataset: scikit-learn's handwritten digits as a TFDS array_record dataset.

It ships inside scikit-learn, so it needs no download, and once prepared it is read through
`tfds.data_source` exactly like ImageNet: the `:local` experiments exercise the real input path.
"""

import fcntl
import os
import pathlib

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

NAME = "sklearn_digits"
VERSION_STRING = "1.0.0"
# TFDS's names of ClassLabel(num_classes=10), known without preparing the dataset.
CLASS_NAMES = tuple(str(digit) for digit in range(10))
IMAGE_SIZE = 32
# Every TEST_STRIDE-th image goes to "test": deterministic, and all classes land in both splits.
TEST_STRIDE = 5
_SKLEARN_MAX_VALUE = 16.0


def digit_to_image(pixels_8x8: np.ndarray) -> Image.Image:
    """An 8x8 digit (values 0..16) as a 32x32 RGB PIL image (bicubic, values 0..255)."""
    gray = Image.fromarray(pixels_8x8.astype(np.float32) * (255.0 / _SKLEARN_MAX_VALUE), mode="F")
    # Resizing in float mode keeps the bicubic overshoot until one final clip and rounding.
    gray = np.asarray(gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")


def split_indices(num_images: int, split: str) -> np.ndarray:
    indices = np.arange(num_images)
    is_test = indices % TEST_STRIDE == 0
    return indices[is_test] if split == "test" else indices[~is_test]


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1797 handwritten digits, upsampled to 32x32 RGB."""

    VERSION = tfds.core.Version(VERSION_STRING)
    RELEASE_NOTES = {VERSION_STRING: "Initial release."}

    # TFDS's own lookup of this file needs `importlib_resources` for any builder living in a
    # package; the answer is simply this module's path.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built by hand: dataset_info_from_configs only works inside a TFDS package directory.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's handwritten digits (UCI optical recognition of handwritten "
                "digits, 8x8, values 0..16), bicubically upsampled to 32x32 RGB. Every 5th image "
                "is in 'test'."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the images ship with scikit-learn.
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        from sklearn.datasets import load_digits

        digits = load_digits()
        for index in split_indices(len(digits.target), split):
            # PIL images, not arrays: TFDS encodes arrays with TensorFlow, PIL images without.
            example = {"image": digit_to_image(digits.images[index]),
                       "label": int(digits.target[index])}
            yield int(index), example


def is_prepared(data_dir: str | os.PathLike, builder_class=None) -> bool:
    # TFDS writes into a temporary directory and renames it when done, so the info file in the
    # final directory means a complete dataset.
    builder_class = builder_class or SklearnDigits
    return (pathlib.Path(data_dir) / builder_class.name / str(builder_class.VERSION)
            / "dataset_info.json").exists()


def prepare_once(data_dir: str | os.PathLike, builder_class) -> pathlib.Path:
    """Prepares the TFDS dataset of `builder_class` (a generator-based builder that downloads
    nothing) in data_dir as array_record unless it is there; safe to call concurrently."""
    data_dir = pathlib.Path(data_dir).expanduser()
    if is_prepared(data_dir, builder_class):
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / f".{builder_class.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have prepared it while this one waited for the lock.
            if not is_prepared(data_dir, builder_class):
                builder = builder_class(data_dir=str(data_dir), file_format="array_record")
                builder.download_and_prepare()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return data_dir


def prepare_builtin(data_dir: str | os.PathLike) -> pathlib.Path:
    """Prepares the built-in dataset in data_dir unless it is there; safe to call concurrently."""
    return prepare_once(data_dir, SklearnDigits)
