"""Input pipeline: TFDS sources (and the built-in dataset), augmentation, sharded batches."""

from data.builtin import prepare_builtin
from data.pipeline import eval_batches, eval_preprocessor, num_train_examples, train_iterator
from data.sources import DatasetNotFoundError

__all__ = [
    "DatasetNotFoundError",
    "eval_batches",
    "eval_preprocessor",
    "num_train_examples",
    "prepare_builtin",
    "train_iterator",
]
