"""Random-access sources of examples, without TensorFlow: each hands over the features a task
asks for by name ({"image": encoded bytes, "label": int} for classification).

- Any TFDS image-classification dataset prepared in array_record format, read with
  `tfds.data_source` and image decoding skipped (the pipeline decodes once it knows the crop).
- `image_folder`: the user's own images as `data_dir/<split>/<class name>/<file>`; classes are
  the sorted union of class directory names over all splits, so every split labels alike.
  Hidden entries (names starting with ".": `.ipynb_checkpoints`, `.DS_Store`, macOS `._x.jpg`)
  are ignored at every level, as are files without an image extension; a class directory with
  no image in it is an error (likely an incomplete copy; it would still count as a class).
"""

import dataclasses
import os
import pathlib

import tensorflow_datasets as tfds

from data import builtin, builtin_detection


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
    elif _base_name(name) == builtin_detection.NAME:
        builtin_detection.prepare(directory)
    try:
        builder = tfds.builder(name, data_dir=directory)
    except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, ValueError):
        # TFDS's own message lists every registered dataset; the short form is clearer here.
        raise _not_found(name, directory, "TFDS knows no such dataset and none is there") from None
    if not builder.is_prepared():
        raise _not_found(name, directory, f"{builder.data_dir} is missing")
    return builder


IMAGE_FOLDER = "image_folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageFolderError(ValueError):
    """An image folder whose layout cannot be read as classes (e.g. an empty class directory)."""


def _visible_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(d for d in directory.iterdir() if not d.name.startswith(".") and d.is_dir())


def _is_image(path: pathlib.Path) -> bool:
    return (not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file())


def _class_names(root: pathlib.Path) -> list[str]:
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {str(root)!r} does not exist; set data.data_dir to a directory laid "
            f"out as <data_dir>/<split>/<class name>/<image file>")
    class_dirs = [d for split in _visible_dirs(root) for d in _visible_dirs(split)]
    # Stops at each directory's first image, so this stays cheap for ImageNet-sized folders.
    empty = [str(d) for d in class_dirs if not any(_is_image(f) for f in d.iterdir())]
    if empty:
        raise ImageFolderError(
            f"image folder {str(root)!r} has {len(empty)} class director"
            f"{'y' if len(empty) == 1 else 'ies'} with no images ({', '.join(IMAGE_EXTENSIONS)})"
            f": {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; each class "
            f"directory counts as a class, so remove or fill them")
    return sorted({d.name for d in class_dirs})


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    """`root/<split>/<class name>/<image>` files in sorted order; picklable for grain workers."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    @classmethod
    def open(cls, root: str, split: str) -> "ImageFolderSource":
        root_path = pathlib.Path(root)
        classes = _class_names(root_path)
        split_dir = root_path / split
        if not split_dir.is_dir():
            splits = [d.name for d in _visible_dirs(root_path)]
            raise DatasetNotFoundError(f"image folder {root!r} has no split {split!r} "
                                       f"(its subdirectories: {splits})")
        paths, labels = [], []
        for label, name in enumerate(classes):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                continue
            files = sorted(f for f in class_dir.iterdir() if _is_image(f))
            paths += [str(f) for f in files]
            labels += [label] * len(files)
        if not paths:
            raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                       f"{str(split_dir)!r}/<class name>/")
        return cls(tuple(paths), tuple(labels))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": pathlib.Path(self.paths[index]).read_bytes(),
                "label": self.labels[index]}

    def describe(self, index: int) -> str:
        return self.paths[index]


def describe_example(source, index: int) -> str:
    """Where example `index` of a source lives, for error messages: the file of an image
    folder's example; "" where a source has no such name (TFDS records)."""
    describe = getattr(source, "describe", None)
    return describe(int(index)) if describe is not None else ""


def open_source(name: str, split: str, directory: str, *,
                features: tuple[str, ...] = ("image", "label"), task: str = "classification"):
    """A random-access source over examples holding (at least) `features`; images stay
    encoded. A dataset without a feature the task (named in the error) needs is an error."""
    if name == IMAGE_FOLDER:
        unknown = sorted(set(features) - {"image", "label"})
        if unknown:
            raise ValueError(f"an image folder has only 'image' and 'label'; the {task} task "
                             f"needs {unknown} too")
        return ImageFolderSource.open(directory, split)
    builder = _builder(name, directory)
    available = builder.info.features
    lacking = [f for f in features if f not in available]
    if lacking:
        raise ValueError(f"{name} has no {', '.join(map(repr, lacking))} feature, which the "
                         f"{task} task needs (it has {sorted(available)})")
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in available else None
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        # Typically a dataset prepared as tfrecord only, which needs TensorFlow to read.
        raise _not_found(name, directory, f"it cannot be read as array_record: {error}") from None


EVAL_SPLITS = ("validation", "val", "test")


def default_eval_split(name: str, directory: str) -> str:
    """The split a dataset is evaluated on: the first of `EVAL_SPLITS` it has."""
    if name == IMAGE_FOLDER:
        _class_names(pathlib.Path(directory))   # a missing folder is said here
        splits = [d.name for d in _visible_dirs(pathlib.Path(directory))]
    else:
        splits = list(_builder(name, directory).info.splits)
    for split in EVAL_SPLITS:
        if split in splits:
            return split
    raise ValueError(f"{name} has no split named {' or '.join(EVAL_SPLITS)} (it has "
                     f"{sorted(splits)}); name the one to evaluate")


def num_examples(name: str, split: str, directory: str) -> int:
    return len(open_source(name, split, directory))


def num_classes(name: str, directory: str) -> int:
    if name == IMAGE_FOLDER:
        return len(_class_names(pathlib.Path(directory)))
    return _builder(name, directory).info.features["label"].num_classes


# ImageNet-1k's classes in label order (the sorted WordNet ids), each "<wnid> <names>" as in
# ILSVRC2012's LOC_synset_mapping.txt; the names are WordNet's lemmas.
IMAGENET_CLASSES_FILE = pathlib.Path(__file__).with_name("imagenet_classes.txt")


def imagenet_classes() -> dict[str, str]:
    """{WordNet id: names} of ImageNet-1k's 1000 classes, in label order."""
    lines = IMAGENET_CLASSES_FILE.read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


def class_names(name: str, directory: str) -> list[str]:
    """The dataset's class names in label order: an image folder's class directories, a TFDS
    dataset's label names (WordNet ids, as ImageNet's TFDS labels are, become their names)."""
    if name == IMAGE_FOLDER:
        return _class_names(pathlib.Path(directory))
    if _base_name(name) == builtin.NAME:   # without preparing it
        return list(builtin.CLASS_NAMES)
    names = list(_builder(name, directory).info.features["label"].names)
    wordnet = imagenet_classes()
    return [wordnet.get(n, n) for n in names]


def check_num_classes(name: str, directory: str, configured: int) -> None:
    """The dataset's class count against data.num_classes, or an error saying both. An image
    folder's labels are its classes' positions in sorted order, so the counts must be equal
    (a missing or extra directory would move labels); a TFDS dataset may have fewer classes
    than the head has outputs, not more."""
    if name == IMAGE_FOLDER:
        classes = _class_names(pathlib.Path(directory))
        if len(classes) != configured:
            shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
            raise ValueError(
                f"image folder {directory!r} has {len(classes)} classes ({shown}) but "
                f"data.num_classes is {configured}; set --config.data.num_classes="
                f"{len(classes)} or fix the class directories")
        return
    found = num_classes(name, directory)
    if found > configured:
        raise ValueError(f"{name} has {found} classes but data.num_classes is {configured}")
