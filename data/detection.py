"""The detection task's examples: the official EfficientDet input pipeline (google/automl
efficientdet/dataloader.py; efficientdet_spec.md §13, §19.8) on the shared sampler
(data/sampler.py: order, host shards, seeded randomness, iterator state).

Sources (images stay encoded; each example is {"image", "image_id", "boxes" [n, 4] normalised
(ymin, xmin, ymax, xmax), "labels" [n] >= 1, "is_crowd" [n], and "points" [n, 2] normalised
(y, x) where the dataset has them}):
- any TFDS dataset with coco/2017's features (`image`, `image/id`, `objects` = Sequence({bbox,
  label, is_crowd, ...})), read through `as_data_source` without TensorFlow. Labels are the
  ClassLabel index + 1 (0 is background), except TFDS coco with data.num_classes = 90, whose 80
  classes map to COCO's category ids 1..90 (`COCO_CATEGORY_IDS`), the official 90-way head's;
- `coco_json`: a COCO-format dataset laid out as COCO's download (`{data_dir}/annotations/
  instances_{split}.json`, images in `{data_dir}/{split}/`), validated when opened
  (`DetectionDataError`); labels are the category ids as they are;
- the built-in `sklearn_digits_detection` (data/builtin_detection.py), prepared on first use.

Train examples, in the official order, each from the generator of its (seed, stream position):
flip (data.flip, p = 0.5: image and normalised boxes x' = 1 - x, points too) -> normalise ->
scale jitter: r ~ U(scale_min, scale_max), scaled = int(r * S), scale = min(scaled / h,
scaled / w), size (int(h * scale), int(w * scale)) -> crop offsets int(U * max(0, size - S)),
y drawn before x -> bilinear resize as tf.image.resize (`resize_bilinear`), only the S x S window
computed -> zero padding at the bottom / right -> boxes * scaled size - offset, clipped to
[0, S - 1], crowd boxes and boxes of zero area dropped (points with their boxes) -> the first
data.max_boxes kept, padded with label -1 and zero boxes / points. The random draws are NumPy's,
not TensorFlow's, in the same order (flip, r, offset y, offset x).

Deviations from dataloader.py, all at edge cases: more than data.max_boxes objects are truncated
to the first max_boxes (the official loader stops with an assertion at 100 or more, so it keeps
at most 99); a scaled side that would round to 0 px (aspect ratios beyond 1 : S / 10) is 1 px.

Eval: the image scaled to fit test_size (scale = min(T / h, T / w), same resize, no crop),
normalised, zero-padded; the ground truth in original pixels (normalised box * original size,
crowd boxes included and flagged), the first max_boxes per image. `ground_truth` gives the eval
split's COCO-format dict (all objects), or data.eval_annotations when set. (The official loader
derives its eval ground truth from the scaled boxes, clipped to [0, T - 1], zero-area ones
dropped, times 1 / scale; here it is the dataset's boxes as they are, as COCO's json has them.)

Unreadable images (data/decode.py, and coco_json's missing files) follow data/classification.py:
an error naming the example, or with data.skip_unreadable a deterministic replacement in
training (counted) and mask False in evaluation.
"""

import dataclasses
import functools
import itertools
import json
import os
import pathlib

import numpy as np

from data import builtin_detection, classification, decode, sampler, sources
from data.sampler import Sharding, example_rng

COCO_JSON = "coco_json"
UnreadableImageError = decode.UnreadableImageError
# COCO's category ids of TFDS coco's 80 ClassLabel indices, in order: the 90-id scheme of
# instances_*.json (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused), which the official
# EfficientDet head predicts (90 classes).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90)
COCO_HEAD_CLASSES = 90
# A coco_json box may reach this many pixels past the image's border (then it is clipped).
BOX_TOLERANCE_PX = 1.0


class DetectionDataError(ValueError):
    """A detection dataset that cannot be used as it is: a malformed COCO json, more classes
    than data.num_classes, missing features. The message is one line naming the problem."""


# Resizing.


def _bilinear_taps(in_size: int, out_size: int):
    """TF's resize_bilinear weights (half-pixel centres, float32): per output index the lower
    and upper input index and the weight of the upper one."""
    scale = np.float32(in_size) / np.float32(out_size)
    centre = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centre)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(centre).astype(np.int64), in_size - 1)
    return lower, upper, (centre - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int,
                    window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """HWC image -> (height, width, C) float32, as TF2's tf.image.resize(..., "bilinear")
    (half-pixel centres, no antialiasing), with TF's arithmetic: along x, then along y.
    `window` = (top, left, rows, cols) computes only that part of the output."""
    top, left, rows, cols = window if window is not None else (0, 0, height, width)
    lower_y, upper_y, lerp_y = (a[top:top + rows] for a in _bilinear_taps(image.shape[0], height))
    lower_x, upper_x, lerp_x = (a[left:left + cols] for a in _bilinear_taps(image.shape[1], width))
    if not (len(lower_y) and len(lower_x)):
        return np.zeros((len(lower_y), len(lower_x), image.shape[2]), np.float32)
    first, last = int(lower_y.min()), int(upper_y.max()) + 1
    band = np.asarray(image[first:last], np.float32)
    left_px, right_px = band[:, lower_x], band[:, upper_x]
    along_x = left_px + (right_px - left_px) * lerp_x[None, :, None]
    upper_rows, lower_rows = along_x[upper_y - first], along_x[lower_y - first]
    return lower_rows + (upper_rows - lower_rows) * lerp_y[:, None, None]


# The recipe.


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The plain, picklable part of the data config that workers need."""

    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    scale_min: float
    scale_max: float
    max_boxes: int
    skip_unreadable: bool = False
    max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_config(cls, cfg) -> "Recipe":
        if not 0 < cfg.scale_min <= cfg.scale_max:
            raise ValueError(f"data.scale_min ({cfg.scale_min}) and data.scale_max "
                             f"({cfg.scale_max}) must satisfy 0 < scale_min <= scale_max")
        if cfg.max_boxes < 1:
            raise ValueError(f"data.max_boxes must be >= 1, got {cfg.max_boxes}")
        if cfg.get("max_image_pixels", 0) < 0:
            raise ValueError("data.max_image_pixels must be >= 0 (0: no limit)")
        return cls(train_size=int(cfg.train_size), test_size=int(cfg.test_size),
                   mean=tuple(cfg.mean), std=tuple(cfg.std), flip=bool(cfg.flip),
                   scale_min=float(cfg.scale_min), scale_max=float(cfg.scale_max),
                   max_boxes=int(cfg.max_boxes),
                   skip_unreadable=bool(cfg.get("skip_unreadable", False)),
                   max_image_pixels=int(cfg.get("max_image_pixels",
                                                decode.DEFAULT_MAX_IMAGE_PIXELS)))


def _normalise(pixels: np.ndarray, recipe: Recipe) -> np.ndarray:
    mean = np.asarray(recipe.mean, np.float32)
    std = np.asarray(recipe.std, np.float32)
    return (pixels.astype(np.float32) - mean) / std


# Training examples.


@dataclasses.dataclass(frozen=True)
class Jitter:
    """One example's random choices: flip, the scaled image's size and the crop offsets."""

    flip: bool
    scaled_height: int
    scaled_width: int
    offset_y: int
    offset_x: int


def draw_jitter(rng: np.random.Generator, height: int, width: int, recipe: Recipe) -> Jitter:
    """The official draws in their order (flip, r, offset y, offset x), in float32 as TF."""
    flip = bool(recipe.flip and rng.uniform() > 0.5)
    size = recipe.train_size
    factor = np.float32(rng.uniform(recipe.scale_min, recipe.scale_max))
    scaled = np.float32(int(factor * np.float32(size)))
    scale = min(scaled / np.float32(height), scaled / np.float32(width))
    scaled_height = max(1, int(np.float32(height) * scale))
    scaled_width = max(1, int(np.float32(width) * scale))
    offset_y = int(np.float32(max(0, scaled_height - size)) * np.float32(rng.uniform()))
    offset_x = int(np.float32(max(0, scaled_width - size)) * np.float32(rng.uniform()))
    return Jitter(flip, scaled_height, scaled_width, offset_y, offset_x)


def _flip_boxes(boxes: np.ndarray) -> np.ndarray:
    ymin, xmin, ymax, xmax = boxes.T
    return np.stack([ymin, 1 - xmax, ymax, 1 - xmin], axis=1)


def train_example(pixels: np.ndarray, example: dict, rng: np.random.Generator,
                  recipe: Recipe) -> dict:
    """Decoded uint8 HWC pixels and their example (normalised boxes, labels, is_crowd, [points])
    -> {"image" float32 (S, S, 3), "boxes" [n, 4] input px, "labels" [n], ["points" [n, 2]]},
    unpadded: crowd and zero-area boxes dropped, at most max_boxes kept."""
    size = recipe.train_size
    keep = ~np.asarray(example["is_crowd"], bool)
    boxes = np.asarray(example["boxes"], np.float32)[keep]
    labels = np.asarray(example["labels"], np.int32)[keep]
    points = example.get("points")
    if points is not None:
        points = np.asarray(points, np.float32)[keep]
    jitter = draw_jitter(rng, pixels.shape[0], pixels.shape[1], recipe)
    if jitter.flip:
        pixels = pixels[:, ::-1]
        boxes = _flip_boxes(boxes)
        if points is not None:
            points = np.stack([points[:, 0], 1 - points[:, 1]], axis=1)
    normalised = _normalise(pixels, recipe)
    rows = min(size, jitter.scaled_height - jitter.offset_y)
    cols = min(size, jitter.scaled_width - jitter.offset_x)
    image = np.zeros((size, size, 3), np.float32)
    image[:rows, :cols] = resize_bilinear(normalised, jitter.scaled_height, jitter.scaled_width,
                                          (jitter.offset_y, jitter.offset_x, rows, cols))
    scaled = np.array([jitter.scaled_height, jitter.scaled_width] * 2, np.float32)
    offset = np.array([jitter.offset_y, jitter.offset_x] * 2, np.float32)
    boxes = np.clip(boxes.reshape(-1, 4) * scaled - offset, 0, size - 1)
    nonzero = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) != 0
    out = {"image": image, "boxes": boxes[nonzero][:recipe.max_boxes],
           "labels": labels[nonzero][:recipe.max_boxes]}
    if points is not None:
        points = points.reshape(-1, 2) * scaled[:2] - offset[:2]
        out["points"] = points[nonzero][:recipe.max_boxes]
    return out


def _padded(values: np.ndarray, length: int, fill, dtype) -> np.ndarray:
    values = np.asarray(values, dtype)[:length]
    out = np.full((length,) + values.shape[1:], fill, dtype)
    out[:len(values)] = values
    return out


def _unreadable(error, where, source, index, *, train):
    return classification._unreadable(error, where, source, index, train=train)


@dataclasses.dataclass(frozen=True)
class TrainBatchMaker:
    """step -> this process's train batch {"images" [b, S, S, 3], "boxes" [b, G, 4] (ymin, xmin,
    ymax, xmax) input px, "labels" [b, G] (>= 1, -1 pads), ["points" [b, G, 2] (y, x) input px],
    sampler.UNREADABLE}, G = data.max_boxes; a picklable callable for grain's workers."""

    source: object
    recipe: Recipe
    sharding: Sharding
    seed: int
    where: str = ""     # "name:split", for error messages

    def _example(self, position: int, index: int) -> tuple[dict, int]:
        recipe, seed = self.recipe, self.seed
        candidates = [int(index)]
        if recipe.skip_unreadable:
            candidates = itertools.chain(candidates, sampler.successors(
                seed, position, len(self.source), self.sharding.global_batch))
        for skipped, candidate in enumerate(candidates):
            try:
                example = self.source[candidate]
                pixels = decode.decode(example["image"], max_pixels=recipe.max_image_pixels)
            except UnreadableImageError as error:
                named = _unreadable(error, self.where, self.source, candidate, train=True)
                if not recipe.skip_unreadable:
                    raise named from error
                if skipped + 1 >= classification.MAX_CONSECUTIVE_UNREADABLE:
                    raise UnreadableImageError(
                        f"{skipped + 1} unreadable examples in a row (data.skip_unreadable "
                        f"is on), is the dataset broken? The last: {named}") from error
                continue
            rng = example_rng(seed, sampler.EXAMPLE_STREAM, position)
            return train_example(pixels, example, rng, recipe), skipped
        raise UnreadableImageError(f"no readable example in {self.where or 'the dataset'}")

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        positions, indices = sampler.stream_examples(self.seed, step, self.sharding,
                                                     len(self.source))
        count = self.recipe.max_boxes
        examples, unreadable = [], 0
        for position, index in zip(positions, indices):
            example, skipped = self._example(int(position), int(index))
            examples.append(example)
            unreadable += skipped
        batch = {
            "images": np.stack([e["image"] for e in examples]),
            "boxes": np.stack([_padded(e["boxes"], count, 0, np.float32) for e in examples]),
            "labels": np.stack([_padded(e["labels"], count, -1, np.int32) for e in examples]),
        }
        if self.source.has_points:
            batch["points"] = np.stack([_padded(e["points"], count, 0, np.float32)
                                        for e in examples])
        batch[sampler.UNREADABLE] = np.int64(unreadable)
        return batch


# Evaluation.


def eval_example(pixels: np.ndarray, recipe: Recipe) -> tuple[np.ndarray, np.float32]:
    """Decoded uint8 HWC pixels -> (normalised float32 (T, T, 3) image, scale: input px per
    original px), the image scaled to fit T = test_size and zero-padded bottom / right."""
    size = recipe.test_size
    height, width = pixels.shape[:2]
    scale = min(np.float32(size) / np.float32(height), np.float32(size) / np.float32(width))
    scaled_height = max(1, int(np.float32(height) * scale))
    scaled_width = max(1, int(np.float32(width) * scale))
    image = np.zeros((size, size, 3), np.float32)
    image[:scaled_height, :scaled_width] = resize_bilinear(
        _normalise(pixels, recipe), scaled_height, scaled_width)
    return image, np.float32(scale)


def _original_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(boxes, np.float32).reshape(-1, 4) * np.array(
        [height, width, height, width], np.float32)


@dataclasses.dataclass(frozen=True)
class EvalBatchMaker:
    """step -> this process's eval batch, padded with mask False past the split's end (and, with
    data.skip_unreadable, at unreadable examples); see `eval_batches` for the keys."""

    source: object
    recipe: Recipe
    sharding: Sharding
    where: str = ""

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        recipe, size, count = self.recipe, self.recipe.test_size, self.recipe.max_boxes
        batch = self.sharding.local_batch
        positions = self.sharding.global_positions(step)
        mask = positions < len(self.source)
        out = {"images": np.zeros((batch, size, size, 3), np.float32),
               "image_ids": np.zeros((batch,), np.int64),
               "scales": np.ones((batch,), np.float32),
               "image_sizes": np.zeros((batch, 2), np.int32),
               "boxes": np.zeros((batch, count, 4), np.float32),
               "labels": np.full((batch, count), -1, np.int32),
               "is_crowd": np.zeros((batch, count), bool)}
        if self.source.has_points:
            out["points"] = np.zeros((batch, count, 2), np.float32)
        for row, position in enumerate(positions[mask]):
            try:
                example = self.source[int(position)]
                pixels = decode.decode(example["image"], max_pixels=recipe.max_image_pixels)
            except UnreadableImageError as error:
                if not recipe.skip_unreadable:
                    raise _unreadable(error, self.where, self.source, position,
                                      train=False) from error
                mask[row] = False
                continue
            height, width = pixels.shape[:2]
            out["images"][row], scale = eval_example(pixels, recipe)
            out["image_ids"][row] = example["image_id"]
            out["scales"][row] = np.float32(1) / scale
            out["image_sizes"][row] = height, width
            boxes = _original_boxes(example["boxes"], height, width)
            out["boxes"][row] = _padded(boxes, count, 0, np.float32)
            out["labels"][row] = _padded(example["labels"], count, -1, np.int32)
            out["is_crowd"][row] = _padded(example["is_crowd"], count, False, bool)
            if self.source.has_points:
                points = np.asarray(example["points"], np.float32).reshape(-1, 2)
                out["points"][row] = _padded(points * np.array([height, width], np.float32),
                                             count, 0, np.float32)
        out["mask"] = mask
        return out


# Sources.


def _as_array(values, dtype, shape) -> np.ndarray:
    """A Sequence field (a list of per-object arrays, an array, or an empty list) as an array."""
    return np.asarray(values, dtype).reshape(shape)


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsDetectionSource:
    """A TFDS detection dataset's records as detection examples; picklable for grain workers."""

    records: object                     # tfds's data source, images left encoded
    label_table: tuple[int, ...]        # ClassLabel index -> label
    categories: tuple[tuple[int, str], ...]   # (label, name) of every class
    has_points: bool
    has_id: bool
    has_crowd: bool

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[int(index)]
        objects = record["objects"]
        labels = _as_array(objects["label"], np.int64, (-1,))
        example = {
            "image": record["image"],
            "image_id": int(record["image/id"]) if self.has_id else int(index),
            "boxes": _as_array(objects["bbox"], np.float32, (-1, 4)),
            "labels": np.asarray(self.label_table, np.int32)[labels],
            "is_crowd": (_as_array(objects["is_crowd"], bool, (-1,)) if self.has_crowd
                         else np.zeros(len(labels), bool)),
        }
        if self.has_points:
            example["points"] = _as_array(objects["point"], np.float32, (-1, 2))
        return example

    def header(self, index: int, max_pixels: int) -> tuple[dict, tuple[int, int]]:
        """(example, original (h, w)) without decoding pixels."""
        example = self[index]
        return example, decode.image_size(example["image"], max_pixels)


def _open_tfds(name: str, split: str, directory: str, num_classes: int) -> TfdsDetectionSource:
    records = sources.open_source(name, split, directory, features=("image", "objects"),
                                  task="detection")
    features = sources._builder(name, directory).info.features
    objects = features["objects"]
    inner = getattr(objects, "feature", objects)   # a Sequence's per-object features
    lacking = [key for key in ("bbox", "label") if key not in inner]
    if lacking:
        raise DetectionDataError(f"{name}'s 'objects' has no {', '.join(lacking)} (it has "
                                 f"{sorted(inner)}); detection needs coco/2017's features")
    label_feature = inner["label"]
    found = label_feature.num_classes
    names = list(label_feature.names)
    if (sources._base_name(name) == "coco" and num_classes == COCO_HEAD_CLASSES
            and found == len(COCO_CATEGORY_IDS)):
        table = COCO_CATEGORY_IDS
    elif found > num_classes:
        raise DetectionDataError(
            f"{name} has {found} classes but data.num_classes is {num_classes}; set "
            f"--config.data.num_classes={found} (labels are the class index + 1)")
    else:
        table = tuple(range(1, found + 1))
    return TfdsDetectionSource(records, table, tuple(zip(table, names)),
                               has_points="point" in inner, has_id="image/id" in features,
                               has_crowd="is_crowd" in inner)


@dataclasses.dataclass(frozen=True, eq=False)
class CocoJsonSource:
    """A COCO-format dataset's split: images read lazily from `{root}/{split}/{file_name}`;
    annotations flat, image i's are rows starts[i]:starts[i + 1]. Picklable."""

    root: str
    split: str
    files: tuple[str, ...]
    image_ids: np.ndarray       # [n] int64
    sizes: np.ndarray           # [n, 2] int64 (h, w) as the json says
    starts: np.ndarray          # [n + 1] int64
    boxes: np.ndarray           # [N, 4] float32 normalised (ymin, xmin, ymax, xmax)
    labels: np.ndarray          # [N] int32 category ids
    crowd: np.ndarray           # [N] bool
    categories: tuple[tuple[int, str], ...]
    has_points: bool = False

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(pathlib.Path(self.root) / self.split / self.files[index])

    def _annotations(self, index: int) -> dict:
        rows = slice(int(self.starts[index]), int(self.starts[index + 1]))
        return {"image_id": int(self.image_ids[index]), "boxes": self.boxes[rows],
                "labels": self.labels[rows], "is_crowd": self.crowd[rows]}

    def __getitem__(self, index: int) -> dict:
        path = self.describe(index)
        try:
            image = pathlib.Path(path).read_bytes()
        except OSError as error:
            raise UnreadableImageError(f"cannot read the file: {error.strerror or error}") \
                from error
        return {"image": image, **self._annotations(index)}

    def header(self, index: int, max_pixels: int) -> tuple[dict, tuple[int, int]]:
        """(example without its image, (h, w) as the json says): no file is read."""
        height, width = self.sizes[index]
        return self._annotations(index), (int(height), int(width))


def _json_error(path, message: str) -> DetectionDataError:
    return DetectionDataError(f"coco_json {str(path)!r}: {message}")


def _missing(record: dict, keys) -> list[str]:
    return [key for key in keys if key not in record]


def _check_category(path, categories: list, num_classes: int) -> dict[int, str]:
    names = {}
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category:
            raise _json_error(path, f"categories[{position}] has no 'id'")
        category_id = category["id"]
        if not isinstance(category_id, int) or category_id < 1:
            raise _json_error(path, f"category id {category_id!r} is not an integer >= 1 "
                                    f"(labels are the category ids; 0 is background)")
        names[category_id] = str(category.get("name", category_id))
    largest = max(names, default=0)
    if largest > num_classes:
        raise _json_error(path, f"category id {largest} ({names[largest]!r}) is beyond "
                                f"data.num_classes={num_classes}; labels are the category ids, "
                                f"so set --config.data.num_classes={largest} (or more)")
    return names


@functools.lru_cache(maxsize=4)
def _load_coco_json(root: str, split: str, num_classes: int, stamp) -> CocoJsonSource:
    del stamp   # the file's (mtime, size): a changed file is read again
    path = pathlib.Path(root) / "annotations" / f"instances_{split}.json"
    try:
        with open(path, "rb") as file:
            content = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _json_error(path, f"not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise _json_error(path, f"the top level is a {type(content).__name__}, not an object "
                                f"with 'images', 'annotations' and 'categories'")
    lacking = _missing(content, ("images", "annotations", "categories"))
    if lacking:
        raise _json_error(path, f"missing top-level key(s) {', '.join(map(repr, lacking))} (a "
                                f"COCO instances file has 'images', 'annotations', 'categories')")
    names = _check_category(path, content["categories"], num_classes)
    images = {}
    for position, image in enumerate(content["images"]):
        name = f"image {image.get('id', f'#{position}')!r}" if isinstance(image, dict) else \
            f"images[{position}]"
        lacking = _missing(image, ("id", "height", "width", "file_name")) if isinstance(
            image, dict) else ["id", "height", "width", "file_name"]
        if lacking:
            raise _json_error(path, f"{name} is missing {', '.join(map(repr, lacking))}")
        if image["id"] in images:
            raise _json_error(path, f"{name} appears twice in 'images'")
        if not all(isinstance(image[key], (int, float)) and image[key] > 0
                   for key in ("height", "width")):
            raise _json_error(path, f"{name} has height {image['height']} and width "
                                    f"{image['width']}; both must be > 0")
        images[image["id"]] = image
    per_image = {image_id: [] for image_id in images}
    for position, annotation in enumerate(content["annotations"]):
        name = f"annotation {annotation.get('id', f'#{position}')!r}" if isinstance(
            annotation, dict) else f"annotations[{position}]"
        lacking = _missing(annotation, ("image_id", "bbox", "category_id")) if isinstance(
            annotation, dict) else ["image_id", "bbox", "category_id"]
        if lacking:
            raise _json_error(path, f"{name} is missing {', '.join(map(repr, lacking))}")
        image_id, bbox = annotation["image_id"], annotation["bbox"]
        name = f"{name} (image {image_id!r})"
        if image_id not in images:
            raise _json_error(path, f"{name}: image_id {image_id!r} is not in 'images'")
        if annotation["category_id"] not in names:
            raise _json_error(path, f"{name}: category id {annotation['category_id']!r} is not "
                                    f"in 'categories' (ids {sorted(names)})")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) for v in bbox)):
            raise _json_error(path, f"{name}: bbox {bbox!r} is not [x, y, width, height]")
        x, y, w, h = bbox
        height, width = images[image_id]["height"], images[image_id]["width"]
        if w < 0 or h < 0:
            raise _json_error(path, f"{name}: bbox {bbox} has a negative width or height")
        tolerance = BOX_TOLERANCE_PX
        if x < -tolerance or y < -tolerance or x + w > width + tolerance or \
                y + h > height + tolerance:
            raise _json_error(path, f"{name}: bbox {bbox} ([x, y, w, h] px) is outside the "
                                    f"image ({width}x{height}) by more than {tolerance:g} px")
        box = np.clip([y / height, x / width, (y + h) / height, (x + w) / width], 0.0, 1.0)
        per_image[image_id].append((box, annotation["category_id"],
                                    bool(annotation.get("iscrowd", 0))))
    order = sorted(images)
    counts = [len(per_image[image_id]) for image_id in order]
    objects = [obj for image_id in order for obj in per_image[image_id]]
    return CocoJsonSource(
        root=root, split=split,
        files=tuple(str(images[image_id]["file_name"]) for image_id in order),
        image_ids=np.asarray(order, np.int64),
        sizes=np.asarray([(images[i]["height"], images[i]["width"]) for i in order],
                         np.int64).reshape(-1, 2),
        starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=np.asarray([o[0] for o in objects], np.float32).reshape(-1, 4),
        labels=np.asarray([o[1] for o in objects], np.int32),
        crowd=np.asarray([o[2] for o in objects], bool),
        categories=tuple(sorted(names.items())))


def open_coco_json(root: str, split: str, num_classes: int) -> CocoJsonSource:
    """The split of a COCO-format dataset, validated (`DetectionDataError`)."""
    path = pathlib.Path(root) / "annotations" / f"instances_{split}.json"
    try:
        stat = os.stat(path)
    except OSError:
        raise _json_error(path, f"no such file; a coco_json dataset is laid out as COCO's "
                                f"download: {root}/annotations/instances_<split>.json and the "
                                f"images in {root}/<split>/<file_name> (set data.data_dir and "
                                f"the split names)") from None
    return _load_coco_json(str(root), split, int(num_classes), (stat.st_mtime_ns, stat.st_size))


def open_source(cfg, split: str):
    """The detection source of `cfg` (a config's `data`) for `split`."""
    directory = sources.data_dir(cfg.data_dir)
    if cfg.name == COCO_JSON:
        return open_coco_json(directory, split, cfg.num_classes)
    return _open_tfds(cfg.name, split, directory, cfg.num_classes)


def _where(cfg, split: str) -> str:
    return f"{cfg.name}:{split}"


def train_iterator(cfg, *, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> sampler.TrainIterator:
    """Infinite host-local train batches (`TrainBatchMaker`) of the dataset `cfg` names."""
    source = open_source(cfg, cfg.train_split)
    recipe = Recipe.from_config(cfg)
    if len(source) < global_batch:
        raise ValueError(f"a step reads {global_batch} examples, more than the {len(source)} "
                         f"of {_where(cfg, cfg.train_split)}")
    sharding = Sharding(global_batch, process_index, process_count)
    maker = TrainBatchMaker(source, recipe, sharding, int(seed), _where(cfg, cfg.train_split))
    return sampler.TrainIterator(maker, num_examples=len(source), sharding=sharding, seed=seed,
                                 workers=cfg.workers)


def eval_batches(cfg, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> sampler.EvalBatches:
    """The eval split in order, host-sharded, padded with mask False past its end: {"images"
    [b, T, T, 3], "image_ids" int64, "scales" float32 (original px per input px), "image_sizes"
    int32 [b, 2] original (h, w), "mask", and the ground truth in original pixels, the first
    max_boxes: "boxes" [b, G, 4] (ymin, xmin, ymax, xmax), "labels" [b, G] (-1 pads),
    "is_crowd" [b, G], ["points" [b, G, 2] (y, x)]}."""
    source = open_source(cfg, cfg.eval_split)
    sharding = Sharding(global_batch, process_index, process_count)
    maker = EvalBatchMaker(source, Recipe.from_config(cfg), sharding,
                           _where(cfg, cfg.eval_split))
    return sampler.EvalBatches(maker, num_examples=len(source), global_batch=global_batch,
                               workers=cfg.workers)


def num_train_examples(cfg) -> int:
    return len(open_source(cfg, cfg.train_split))


def class_names(cfg) -> list[str]:
    """Names of labels 1..data.num_classes (item k - 1 names label k); "" where none is known
    (COCO's unused ids in the 90-way head)."""
    if sources._base_name(cfg.name) == builtin_detection.NAME:   # without preparing it
        categories = tuple(enumerate(builtin_detection.CLASS_NAMES, 1))
    else:
        categories = open_source(cfg, cfg.eval_split).categories
    names = [""] * cfg.num_classes
    for label, name in categories:
        if 1 <= label <= cfg.num_classes:
            names[label - 1] = name
    return names


def ground_truth(cfg) -> dict:
    """The eval split's ground truth as a COCO instances dict: data.eval_annotations (a json
    file) when set; else built from the split: images {id, height, width}, annotations {id,
    image_id, category_id (= label), bbox [x, y, w, h] original px, area (the box's, as automl's
    coco_metric builds it), iscrowd}, categories {id, name} (every class of the dataset). Image
    sizes come from the encoded headers; with data.skip_unreadable an unreadable image is left
    out (evaluation masks it)."""
    if cfg.eval_annotations:
        path = pathlib.Path(cfg.eval_annotations).expanduser()
        try:
            return json.loads(path.read_text())
        except OSError as error:
            raise DetectionDataError(f"data.eval_annotations {str(path)!r}: {error}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DetectionDataError(f"data.eval_annotations {str(path)!r} is not valid JSON: "
                                     f"{error}") from None
    source = open_source(cfg, cfg.eval_split)
    recipe = Recipe.from_config(cfg)
    images, annotations = [], []
    for index in range(len(source)):
        try:
            example, (height, width) = source.header(index, recipe.max_image_pixels)
        except UnreadableImageError as error:
            if not recipe.skip_unreadable:
                raise _unreadable(error, _where(cfg, cfg.eval_split), source, index,
                                  train=False) from error
            continue
        images.append({"id": int(example["image_id"]), "height": height, "width": width})
        boxes = _original_boxes(example["boxes"], height, width).astype(np.float64)
        for box, label, crowd in zip(boxes, example["labels"], example["is_crowd"]):
            ymin, xmin, ymax, xmax = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": int(example["image_id"]),
                                "category_id": int(label),
                                "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                                "area": (xmax - xmin) * (ymax - ymin), "iscrowd": int(crowd)})
    categories = [{"id": int(label), "name": name} for label, name in source.categories]
    return {"images": images, "annotations": annotations, "categories": categories}
