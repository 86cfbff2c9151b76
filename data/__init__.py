"""Input pipeline: sources (TFDS, the built-in dataset, image folders), one deterministic sampler
(data/sampler.py), per-task example makers (data/classification.py) and augmentation.

The functions below are the classification task's."""

from data.builtin import prepare_builtin
from data.classification import (check_num_classes, device_preparer, eval_batches,
                                 eval_preprocessor, num_train_examples, train_iterator)
from data.decode import DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageError
from data.detection import DetectionDataError
from data.sources import DatasetNotFoundError, ImageFolderError, class_names, imagenet_classes

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DatasetNotFoundError",
    "DetectionDataError",
    "ImageFolderError",
    "UnreadableImageError",
    "check_num_classes",
    "class_names",
    "device_preparer",
    "eval_batches",
    "eval_preprocessor",
    "imagenet_classes",
    "num_train_examples",
    "prepare_builtin",
    "train_iterator",
]
