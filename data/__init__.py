"""Input pipeline: sources (TFDS, the built-in dataset, image folders), one deterministic sampler
(data/sampler.py), per-task example makers (data/classification.py) and augmentation.

The functions below are the classification task's."""

from data.builtin import prepare_builtin
from data.classification import (eval_batches, eval_preprocessor, num_train_examples,
                                 train_iterator)
from data.sources import DatasetNotFoundError

__all__ = [
    "DatasetNotFoundError",
    "eval_batches",
    "eval_preprocessor",
    "num_train_examples",
    "prepare_builtin",
    "train_iterator",
]
