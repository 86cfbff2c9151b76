"""Random-access sources over prepared TFDS datasets (array_record), read without TensorFlow."""

import os
import pathlib

import tensorflow_datasets as tfds

from data import builtin


class DatasetNotFoundError(FileNotFoundError):
    """The requested TFDS dataset is not prepared (in array_record format) in the data dir."""


def data_dir(cfg_value: str | None) -> str:
    """The data dir a config names; empty means $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if cfg_value:
        return str(pathlib.Path(cfg_value).expanduser())
    default = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return str(pathlib.Path(default).expanduser())


def _base_name(name: str) -> str:
    return name.split(":", 1)[0]


def _not_found(name: str, directory: str, reason: str) -> DatasetNotFoundError:
    base = _base_name(name)
    imagenet_note = ""
    if base.startswith("imagenet"):
        imagenet_note = (
            f"  ImageNet cannot be downloaded automatically: put its manual download (the "
            f"ILSVRC2012 tar files) in {directory}/downloads/manual first; preparation needs "
            f"TensorFlow installed once (training never does).\n"
        )
    return DatasetNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data dir {directory!r} "
        f"({reason}; training reads the array_record format).\n"
        f"To prepare it:\n"
        f"  tfds build {base} --file_format=array_record --data_dir {directory}\n"
        f"{imagenet_note}"
        f"Or set data.data_dir (or $TFDS_DATA_DIR) to where it is prepared.\n"
        f"Every experiment also has a ':local' variant that trains on the built-in dataset "
        f"with no download, e.g. python train.py --config experiments/nfnet_f1.py:local"
    )


def _builder(name: str, directory: str) -> tfds.core.DatasetBuilder:
    if _base_name(name) == builtin.NAME:
        builtin.prepare_builtin(directory)
    try:
        builder = tfds.builder(name, data_dir=directory)
    except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, ValueError):
        # TFDS's own message lists every registered dataset; the short form is clearer here.
        raise _not_found(name, directory, "TFDS knows no such dataset and none is there") from None
    if not builder.is_prepared():
        raise _not_found(name, directory, f"{builder.data_dir} is missing")
    return builder


def open_source(name: str, split: str, directory: str):
    """A random-access source over examples {"image": uint8 HWC array, "label": int}."""
    builder = _builder(name, directory)
    try:
        return builder.as_data_source(split=split)
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        # Typically a dataset prepared as tfrecord only, which needs TensorFlow to read.
        raise _not_found(name, directory, f"it cannot be read as array_record: {error}") from None


def num_examples(name: str, split: str, directory: str) -> int:
    return len(open_source(name, split, directory))


def num_classes(name: str, directory: str, label_key: str = "label") -> int:
    return _builder(name, directory).info.features[label_key].num_classes
