"""The classification task's examples: {"image", "label"} from a source, made into train batches
{"images", "targets" (one-hot or mixed distributions)} and eval batches {"images", "labels",
"mask"}, on the shared sampler (data/sampler.py: order, host shards, seeded randomness,
iterator state).

Train images: decode the crop only -> flip -> resize (`image_ops`: TF's or torchvision's) ->
[RandAugment] -> [MixUp / CutMix of pairs] -> [RandAugment after mixing: the NFNet default]
-> normalise. RandAugment always sees the image clipped to [0, 255] and truncated to uint8, as
the official pipeline casts it. With data.augment_on_device the host stops after the resize
and draws the rest's random choices; the train step applies them (data/device_augment.py).

An image that cannot be decoded (data/decode.py: truncated, corrupt, not an image, over
data.max_image_pixels) raises `UnreadableImageError` naming the dataset, split, example index
and, for image folders, the file. With data.skip_unreadable, a train example is replaced by the
next readable one of its epoch's permutation (data/sampler.py, deterministic and resumable) and
counted in the train iterator's `unreadable`; an eval example is left out (mask False).
"""

import dataclasses
import functools
import itertools

import numpy as np

from data import augment, decode, device_augment, randaugment, resize, sampler, sources
from data.sampler import Sharding, example_rng

# What this task reads of each example.
FEATURES = ("image", "label")
# With data.skip_unreadable, this many unreadable examples in a row (in permutation order) mean
# something is wrong beyond a few bad files: an error, not an endless search.
MAX_CONSECUTIVE_UNREADABLE = 100
UnreadableImageError = decode.UnreadableImageError


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The plain, picklable part of the data config that workers need."""

    train_size: int
    test_size: int
    eval_preprocess: str
    crop_fraction: float
    image_ops: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    random_resized_crop: bool
    min_area: float
    flip: bool
    mixup_alpha: float
    cutmix: bool
    randaugment_layers: int
    randaugment_magnitude: float
    augment_before_mix: bool
    num_classes: int
    # Fields added later have defaults, for configs recorded in older checkpoints.
    skip_unreadable: bool = False
    max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS
    augment_on_device: bool = False
    pad_crop: int = 0
    pad_fill: str = "mean"

    @classmethod
    def from_config(cls, cfg) -> "Recipe":
        choices = {"eval_preprocess": augment.EVAL_PREPROCESSORS,
                   "image_ops": augment.IMAGE_OPS,
                   "interpolation": tuple(sorted(resize.INTERPOLATIONS))}
        for field, allowed in choices.items():
            if cfg[field] not in allowed:
                raise ValueError(f"unknown data.{field} {cfg[field]!r}; choose from {allowed}")
        if cfg.image_ops == "tf" and cfg.interpolation != "bicubic":
            raise ValueError("data.image_ops='tf' resizes bicubically (TF's pipelines); set "
                             "data.interpolation='bicubic' or data.image_ops='torchvision'")
        if cfg.randaugment_layers < 0 or cfg.mixup_alpha < 0:
            raise ValueError("data.randaugment_layers and data.mixup_alpha must be >= 0")
        if cfg.get("pad_crop", 0) < 0 or cfg.get("pad_fill", "mean") not in augment.PAD_FILLS:
            raise ValueError(f"data.pad_crop must be >= 0 and data.pad_fill one of "
                             f"{augment.PAD_FILLS}; got {cfg.get('pad_crop')!r}, "
                             f"{cfg.get('pad_fill')!r}")
        if cfg.get("pad_crop", 0) and cfg.random_resized_crop:
            raise ValueError("data.pad_crop translates the whole image instead of the "
                             "random-resized crop; set data.random_resized_crop=False")
        if cfg.get("max_image_pixels", 0) < 0:
            raise ValueError("data.max_image_pixels must be >= 0 (0: no limit)")
        values = {}
        for field in dataclasses.fields(cls):
            if field.default is dataclasses.MISSING:
                values[field.name] = cfg[field.name]
            else:
                values[field.name] = cfg.get(field.name, field.default)
        values["mean"], values["std"] = tuple(cfg.mean), tuple(cfg.std)
        return cls(**values)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix

    @property
    def examples_per_row(self) -> int:
        return 2 if self.mixes else 1

    @property
    def augments_each(self) -> bool:
        """RandAugment on each example (before mixing, or with no mixing)."""
        return self.randaugment_layers > 0 and (self.augment_before_mix or not self.mixes)

    @property
    def augments_rows(self) -> bool:
        """RandAugment on each mixed row."""
        return self.randaugment_layers > 0 and self.mixes and not self.augment_before_mix

    def randaugment_plan(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = self.train_size
        return randaugment.plan(rng, self.randaugment_layers, self.randaugment_magnitude, size,
                                size)

    def finish_on_device(self, batch: dict):
        """The model's input images from a batch of the device path (under jit)."""
        return device_augment.finish(
            batch, magnitude=self.randaugment_magnitude, augments_each=self.augments_each,
            augments_rows=self.augments_rows, mixes=self.mixes, mean=self.mean, std=self.std)


def _randaugment(image: np.ndarray, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    pixels = np.clip(image, 0.0, 255.0).astype(np.uint8)   # TF's cast truncates
    pixels = randaugment.randaugment(pixels, rng, recipe.randaugment_layers,
                                     recipe.randaugment_magnitude)
    return pixels.astype(np.float32)


def train_image(image, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    """Encoded or decoded image -> float32 (train_size, train_size, 3), before mixing."""
    size = recipe.train_size
    if recipe.random_resized_crop:
        height, width = decode.image_size(image, recipe.max_image_pixels)
        box = augment.train_crop_box(rng, height, width, recipe.image_ops, recipe.min_area,
                                     size)
        pixels = decode.decode(image, box, recipe.max_image_pixels)
        if recipe.flip:
            pixels = augment.random_flip(pixels, rng)
        return augment.resize_to(pixels, size, recipe.image_ops, recipe.interpolation)
    pixels = augment.eval_preprocess(decode.decode(image, max_pixels=recipe.max_image_pixels),
                                     recipe.eval_preprocess, size,
                                     recipe.crop_fraction, recipe.image_ops,
                                     recipe.interpolation)
    if recipe.pad_crop:
        pixels = augment.random_pad_crop(pixels, rng, recipe.pad_crop, recipe.pad_fill,
                                         recipe.mean)
    return augment.random_flip(pixels, rng) if recipe.flip else pixels


def eval_image(image, recipe: Recipe) -> np.ndarray:
    """Encoded or decoded image -> normalised float32 (test_size, test_size, 3)."""
    pixels = augment.eval_preprocess(decode.decode(image, max_pixels=recipe.max_image_pixels),
                                     recipe.eval_preprocess, recipe.test_size,
                                     recipe.crop_fraction, recipe.image_ops,
                                     recipe.interpolation)
    return augment.normalize(pixels, recipe.mean, recipe.std)


def eval_preprocessor(cfg):
    """image (encoded bytes or uint8 HWC) -> the model's input, exactly as evaluation prepares
    it; `cfg` is a config's `data` section, e.g. from a checkpoint's recorded config."""
    return functools.partial(eval_image, recipe=Recipe.from_config(cfg))


def device_preparer(cfg):
    """With data.augment_on_device (`cfg` a config's `data`): the train batch's last steps as
    a function for the jitted train step (`steps.Objective.prepare`), else None."""
    recipe = Recipe.from_config(cfg)
    if not recipe.augment_on_device:
        return None
    return lambda batch: {"images": recipe.finish_on_device(batch), "targets": batch["targets"]}


# A data config's train-only fields, neutral: what an evaluation-only config (`eval_config`)
# gives `Recipe`, which describes both.
_NO_TRAINING = dict(train_split="", train_size=0, random_resized_crop=False, min_area=1.0,
                    flip=False, mixup_alpha=0.0, cutmix=False, randaugment_layers=0,
                    randaugment_magnitude=0.0, augment_before_mix=False)


def eval_config(preprocessing: dict, num_classes: int, *, name: str = "", data_dir: str = "",
                split: str = "", workers: int = 0,
                max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS):
    """A data config (a config's `data` section) that evaluates only: `preprocessing` holds the
    eval fields (eval_preprocess, image_ops, test_size, crop_fraction, interpolation, mean,
    std), e.g. the ones a weights file records; `eval_batches` and `eval_preprocessor` read it."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        _NO_TRAINING, **preprocessing, name=name, data_dir=data_dir, eval_split=split,
        num_classes=num_classes, workers=workers, skip_unreadable=False,
        max_image_pixels=max_image_pixels))


def _unreadable(error: UnreadableImageError, where: str, source, index: int, *,
                train: bool) -> UnreadableImageError:
    """The decoding error with the example named, as one line."""
    path = sources.describe_example(source, index)
    reason = " ".join(str(error).split()).rstrip(".")    # one line
    fix = ("set data.skip_unreadable=True to replace such train examples by readable ones "
           "(deterministically, counted) and leave them out of evaluation" if train else
           "set data.skip_unreadable=True to leave such examples out of evaluation")
    return UnreadableImageError(
        f"unreadable image: {where or 'dataset'} example {int(index)}"
        f"{f' ({path})' if path else ''}: {reason}. Fix or remove it, or {fix}")


@dataclasses.dataclass(frozen=True)
class TrainBatchMaker:
    """step -> this process's train batch; a picklable callable for grain's workers. The batch
    also holds `sampler.UNREADABLE`: how many unreadable examples it skipped (the train
    iterator takes it out)."""

    source: object
    recipe: Recipe
    sharding: Sharding
    seed: int
    where: str = ""     # "name:split", for error messages

    def _example(self, position: int, index: int) -> tuple[np.ndarray, int, int]:
        """(image before mixing, label, unreadable examples skipped) for stream `position`."""
        recipe, seed = self.recipe, self.seed
        candidates = [int(index)]
        if recipe.skip_unreadable:
            candidates = itertools.chain(candidates, sampler.successors(
                seed, position, len(self.source),
                self.sharding.global_batch * recipe.examples_per_row))
        for skipped, candidate in enumerate(candidates):
            example = self.source[candidate]
            try:
                # A fresh generator per attempt: a replacement gets position's choices afresh.
                image = train_image(example["image"],
                                    example_rng(seed, sampler.EXAMPLE_STREAM, position), recipe)
            except UnreadableImageError as error:
                named = _unreadable(error, self.where, self.source, candidate, train=True)
                if not recipe.skip_unreadable:
                    raise named from error
                if skipped + 1 >= MAX_CONSECUTIVE_UNREADABLE:
                    raise UnreadableImageError(
                        f"{skipped + 1} unreadable examples in a row (data.skip_unreadable "
                        f"is on), is the dataset broken? The last: {named}") from error
                continue
            return image, example["label"], skipped
        raise UnreadableImageError(f"no readable example in {self.where or 'the dataset'}")

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        recipe, seed = self.recipe, self.seed
        on_device = recipe.augment_on_device
        positions, indices = sampler.stream_examples(seed, step, self.sharding,
                                                     len(self.source), recipe.examples_per_row)
        images, labels, plans, unreadable = [], [], [], 0
        for position, index in zip(positions, indices):
            image, label, skipped = self._example(int(position), int(index))
            if recipe.augments_each:
                rng = example_rng(seed, sampler.RANDAUGMENT_EXAMPLE_STREAM, position)
                if on_device:
                    plans.append(recipe.randaugment_plan(rng))
                else:
                    image = _randaugment(image, rng, recipe)
            images.append(image)
            labels.append(label)
            unreadable += skipped
        targets = augment.one_hot(np.asarray(labels), recipe.num_classes)
        batch = {sampler.UNREADABLE: np.int64(unreadable)}
        if on_device:
            rows = len(images) // recipe.examples_per_row
            batch["images"] = np.stack(images).reshape(rows, recipe.examples_per_row,
                                                       *images[0].shape)
            if recipe.mixes:
                targets, mixing, plans = self._mix_plan(step, targets, plans)
                batch.update(mixing)
            if plans:
                ops, args = zip(*plans)
                per_row = len(ops) // rows
                batch["ra_ops"] = np.stack(ops).reshape(rows, per_row, -1)
                batch["ra_args"] = np.stack(args).astype(np.float32).reshape(
                    rows, per_row, recipe.randaugment_layers, randaugment.PLAN_ARGS)
            return {**batch, "targets": targets}
        if recipe.mixes:
            images, targets = self._mix(step, images, targets)
        return {**batch, "images": augment.normalize(np.stack(images), recipe.mean, recipe.std),
                "targets": targets}

    def _mixes(self, step: int):
        """(row's position in the global batch, its mixing, its draws' generator) per row."""
        recipe = self.recipe
        for i, row in enumerate(self.sharding.global_positions(step)):
            kind = augment.mix_kind(int(row), recipe.mixup_alpha > 0, recipe.cutmix)
            yield i, row, kind, example_rng(self.seed, sampler.MIX_STREAM, row)

    def _mix(self, step: int, images: list, targets: np.ndarray) -> tuple[list, np.ndarray]:
        recipe, seed = self.recipe, self.seed
        mixed_images, mixed_targets = [], []
        for i, row, kind, rng in self._mixes(step):
            image, target = augment.mix_pair(kind, images[2 * i], images[2 * i + 1],
                                             targets[2 * i], targets[2 * i + 1], rng,
                                             recipe.mixup_alpha)
            if recipe.augments_rows:
                image = _randaugment(
                    image, example_rng(seed, sampler.RANDAUGMENT_ROW_STREAM, row), recipe)
            mixed_images.append(image)
            mixed_targets.append(target)
        return mixed_images, np.stack(mixed_targets)

    def _mix_plan(self, step: int, targets: np.ndarray, plans: list):
        """The device path's `_mix`: the mixed targets, the rows' mixing draws as batch arrays,
        and the RandAugment plans (the rows' when RandAugment follows the mixing)."""
        recipe, seed = self.recipe, self.seed
        size = recipe.train_size
        mixed_targets, weights, boxes, cutmix, row_plans = [], [], [], [], []
        for i, row, kind, rng in self._mixes(step):
            lam, box = augment.draw_mix(kind, rng, recipe.mixup_alpha, size, size)
            mixed_targets.append(augment.mix_targets(targets[2 * i], targets[2 * i + 1], lam))
            weights.append((np.float32(lam), np.float32(1.0 - lam)))
            boxes.append(box or (0, 0, 0, 0))
            cutmix.append(box is not None)
            if recipe.augments_rows:
                row_plans.append(recipe.randaugment_plan(
                    example_rng(seed, sampler.RANDAUGMENT_ROW_STREAM, row)))
        mixing = {"mix_weights": np.asarray(weights, np.float32),
                  "mix_box": np.asarray(boxes, np.int32), "mix_cutmix": np.asarray(cutmix)}
        return np.stack(mixed_targets), mixing, row_plans or plans


@dataclasses.dataclass(frozen=True)
class EvalBatchMaker:
    """step -> this process's eval batch, padded with mask False past the split's end (and, with
    data.skip_unreadable, at unreadable examples)."""

    source: object
    recipe: Recipe
    sharding: Sharding
    where: str = ""     # "name:split", for error messages

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        size = self.recipe.test_size
        batch = self.sharding.local_batch
        images = np.zeros((batch, size, size, 3), np.float32)
        labels = np.zeros((batch,), np.int32)
        mask = self.sharding.global_positions(step) < len(self.source)
        for row, position in enumerate(self.sharding.global_positions(step)[mask]):
            example = self.source[int(position)]
            try:
                images[row] = eval_image(example["image"], self.recipe)
            except UnreadableImageError as error:
                if not self.recipe.skip_unreadable:
                    raise _unreadable(error, self.where, self.source, position,
                                      train=False) from error
                mask[row] = False
                continue
            labels[row] = example["label"]
        return {"images": images, "labels": labels, "mask": mask}


def _source(cfg, split: str):
    return sources.open_source(cfg.name, split, sources.data_dir(cfg.data_dir),
                               features=FEATURES, task="classification")


def check_num_classes(cfg) -> None:
    """The dataset's class count against data.num_classes (`cfg` a config's `data`): an image
    folder's must equal it, a TFDS dataset's must not exceed it; else an error with both."""
    sources.check_num_classes(cfg.name, sources.data_dir(cfg.data_dir), cfg.num_classes)


def train_iterator(cfg, *, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> sampler.TrainIterator:
    """Infinite host-local train batches of the dataset `cfg` (a config's `data`) names."""
    source = _source(cfg, cfg.train_split)   # a missing dataset is the first thing to say
    recipe = Recipe.from_config(cfg)
    check_num_classes(cfg)
    per_step = global_batch * recipe.examples_per_row
    if len(source) < per_step:
        raise ValueError(f"a step reads {per_step} examples (global batch {global_batch}"
                         f"{' x 2 to mix' if recipe.mixes else ''}), more than the "
                         f"{len(source)} of {cfg.name}:{cfg.train_split}")
    sharding = Sharding(global_batch, process_index, process_count)
    maker = TrainBatchMaker(source, recipe, sharding, int(seed), f"{cfg.name}:{cfg.train_split}")
    return sampler.TrainIterator(maker,
                                 num_examples=len(source), sharding=sharding, seed=seed,
                                 workers=cfg.workers)


def eval_batches(cfg, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> sampler.EvalBatches:
    """The eval split in order, host-sharded, padded with mask False past its end."""
    source = _source(cfg, cfg.eval_split)
    check_num_classes(cfg)
    sharding = Sharding(global_batch, process_index, process_count)
    maker = EvalBatchMaker(source, Recipe.from_config(cfg), sharding,
                           f"{cfg.name}:{cfg.eval_split}")
    return sampler.EvalBatches(maker,
                               num_examples=len(source), global_batch=global_batch,
                               workers=cfg.workers)


def num_train_examples(cfg) -> int:
    return len(_source(cfg, cfg.train_split))
