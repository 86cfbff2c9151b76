"""The input pipeline the trainer calls: sharded, deterministic, resumable batches via grain.

Determinism contract (what makes runs reproducible and multi-host runs equal single-host ones):
train batch `step` holds global rows step*B .. (step+1)*B-1, and process p yields rows
p*b .. (p+1)*b-1 of it. Each row is made of K examples (K = 2 when rows mix two images, else 1):
row q reads the examples at stream positions K*q .. K*q+K-1, where the stream is the train split
in a permutation drawn from (seed, epoch) alone, epoch after epoch. Every random choice is seeded
from (seed, stream position) for per-example augmentation or (seed, row) for mixing and
RandAugment after mixing, so no result depends on the process count and an iterator's state is
just the next step number.

Train images: decode the crop only -> flip -> resize (`image_ops`: TF's or torchvision's) ->
[RandAugment] -> [MixUp / CutMix of pairs] -> [RandAugment after mixing: the NFNet default]
-> normalise. RandAugment always sees the image clipped to [0, 255] and truncated to uint8, as
the official pipeline casts it.
"""

import dataclasses
import functools
import os

import grain
from absl import flags
import numpy as np

from data import augment, decode, randaugment, resize, sources

# Distinct seed streams, so no two uses of the same seed draw correlated numbers.
(_PERMUTATION_STREAM, _EXAMPLE_STREAM, _MIX_STREAM, _RANDAUGMENT_EXAMPLE_STREAM,
 _RANDAUGMENT_ROW_STREAM) = range(5)
# Steps a train iterator can run; far beyond any run, and finite because grain needs a length.
_MAX_STEPS = 2**40
# Threads (workers=0) build whole batches, one each: enough for small images; NumPy's small ops
# hold the GIL, so large images want worker processes.
_MAX_THREADS = 16
_THREADS_PER_WORKER = 2
_PREFETCH_BATCHES = 4


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
        names = [field.name for field in dataclasses.fields(cls)]
        values = {name: cfg[name] for name in names}
        values["mean"], values["std"] = tuple(cfg.mean), tuple(cfg.std)
        return cls(**values)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix

    @property
    def examples_per_row(self) -> int:
        return 2 if self.mixes else 1


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a global batch of `global_batch` rows is split over processes."""

    global_batch: int
    process_index: int
    process_count: int

    def __post_init__(self):
        if self.global_batch % self.process_count:
            raise ValueError(f"global batch {self.global_batch} is not divisible by the "
                             f"{self.process_count} processes")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process index {self.process_index} not in "
                             f"[0, {self.process_count})")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    def global_positions(self, step: int) -> np.ndarray:
        """Global row numbers, counted over all batches, of the rows this process yields."""
        first = step * self.global_batch + self.process_index * self.local_batch
        return np.arange(first, first + self.local_batch)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch])
    return rng.permutation(num_examples)


def stream_examples(seed: int, step: int, sharding: Sharding, num_examples: int,
                    examples_per_row: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(stream positions, example indices) this process reads for train batch `step`: rows
    in order, each row's `examples_per_row` examples consecutive."""
    per_step = sharding.global_batch * examples_per_row
    steps_per_epoch = num_examples // per_step
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    rows = sharding.global_positions(step)
    positions = (rows[:, None] * examples_per_row + np.arange(examples_per_row)).ravel()
    # Epochs hold whole steps; the permutation's remainder is not read.
    in_epoch = positions - (step - step_in_epoch) * per_step
    return positions, epoch_permutation(seed, epoch, num_examples)[in_epoch]


def _rng(seed: int, stream: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, int(position)])


def _randaugment(image: np.ndarray, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    pixels = np.clip(image, 0.0, 255.0).astype(np.uint8)   # TF's cast truncates
    pixels = randaugment.randaugment(pixels, rng, recipe.randaugment_layers,
                                     recipe.randaugment_magnitude)
    return pixels.astype(np.float32)


def train_image(image, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    """Encoded or decoded image -> float32 (train_size, train_size, 3), before mixing."""
    size = recipe.train_size
    if recipe.random_resized_crop:
        height, width = decode.image_size(image)
        box = augment.train_crop_box(rng, height, width, recipe.image_ops, recipe.min_area,
                                     size)
        pixels = decode.decode(image, box)
        if recipe.flip:
            pixels = augment.random_flip(pixels, rng)
        return augment.resize_to(pixels, size, recipe.image_ops, recipe.interpolation)
    pixels = augment.eval_preprocess(decode.decode(image), recipe.eval_preprocess, size,
                                     recipe.crop_fraction, recipe.image_ops,
                                     recipe.interpolation)
    return augment.random_flip(pixels, rng) if recipe.flip else pixels


def eval_image(image, recipe: Recipe) -> np.ndarray:
    """Encoded or decoded image -> normalised float32 (test_size, test_size, 3)."""
    pixels = augment.eval_preprocess(decode.decode(image), recipe.eval_preprocess,
                                     recipe.test_size, recipe.crop_fraction, recipe.image_ops,
                                     recipe.interpolation)
    return augment.normalize(pixels, recipe.mean, recipe.std)


def eval_preprocessor(cfg):
    """image (encoded bytes or uint8 HWC) -> the model's input, exactly as evaluation prepares
    it; `cfg` is a config's `data` section, e.g. from a checkpoint's recorded config."""
    return functools.partial(eval_image, recipe=Recipe.from_config(cfg))


@dataclasses.dataclass(frozen=True)
class TrainBatchMaker:
    """step -> this process's train batch; a picklable callable for grain's workers."""

    source: object
    recipe: Recipe
    sharding: Sharding
    seed: int

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        recipe, seed = self.recipe, self.seed
        positions, indices = stream_examples(seed, step, self.sharding, len(self.source),
                                             recipe.examples_per_row)
        augment_each = recipe.randaugment_layers > 0 and (recipe.augment_before_mix
                                                          or not recipe.mixes)
        images, labels = [], []
        for position, index in zip(positions, indices):
            example = self.source[int(index)]
            image = train_image(example["image"], _rng(seed, _EXAMPLE_STREAM, position), recipe)
            if augment_each:
                image = _randaugment(image, _rng(seed, _RANDAUGMENT_EXAMPLE_STREAM, position),
                                     recipe)
            images.append(image)
            labels.append(example["label"])
        targets = augment.one_hot(np.asarray(labels), recipe.num_classes)
        if recipe.mixes:
            images, targets = self._mix(step, images, targets)
        return {"images": augment.normalize(np.stack(images), recipe.mean, recipe.std),
                "targets": targets}

    def _mix(self, step: int, images: list, targets: np.ndarray) -> tuple[list, np.ndarray]:
        recipe, seed = self.recipe, self.seed
        augment_after = recipe.randaugment_layers > 0 and not recipe.augment_before_mix
        mixed_images, mixed_targets = [], []
        for i, row in enumerate(self.sharding.global_positions(step)):
            kind = augment.mix_kind(int(row), recipe.mixup_alpha > 0, recipe.cutmix)
            image, target = augment.mix_pair(
                kind, images[2 * i], images[2 * i + 1], targets[2 * i], targets[2 * i + 1],
                _rng(seed, _MIX_STREAM, row), recipe.mixup_alpha)
            if augment_after:
                image = _randaugment(image, _rng(seed, _RANDAUGMENT_ROW_STREAM, row), recipe)
            mixed_images.append(image)
            mixed_targets.append(target)
        return mixed_images, np.stack(mixed_targets)


@dataclasses.dataclass(frozen=True)
class EvalBatchMaker:
    """step -> this process's eval batch, padded with mask False past the split's end."""

    source: object
    recipe: Recipe
    sharding: Sharding

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        size = self.recipe.test_size
        batch = self.sharding.local_batch
        images = np.zeros((batch, size, size, 3), np.float32)
        labels = np.zeros((batch,), np.int32)
        mask = self.sharding.global_positions(step) < len(self.source)
        for row, position in enumerate(self.sharding.global_positions(step)[mask]):
            example = self.source[int(position)]
            images[row] = eval_image(example["image"], self.recipe)
            labels[row] = example["label"]
        return {"images": images, "labels": labels, "mask": mask}


def worker_count(workers: int) -> int:
    """data.workers: 0 = threads in this process, N > 0 = N processes, -1 = one per core."""
    if workers < -1:
        raise ValueError(f"data.workers must be -1 (one per core), 0 (threads) or a process "
                         f"count; got {workers}")
    return (os.cpu_count() or 1) if workers == -1 else workers


def _iterate(steps: grain.MapDataset, workers: int) -> grain.DatasetIterator:
    """Batches of `steps` in order, built in threads (workers=0) or worker processes, which
    scale with cores where threads contend for the GIL (bench/input_pipeline.py)."""
    workers = worker_count(workers)
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's multiprocessing reads its absl flags; a program without absl.app (tests,
            # notebooks) has not parsed them, and their defaults are what it wants.
            flags.FLAGS.mark_as_parsed()
        read_options = grain.ReadOptions(num_threads=_THREADS_PER_WORKER,
                                         prefetch_buffer_size=_THREADS_PER_WORKER)
        dataset = steps.to_iter_dataset(read_options)
        # Workers take whole steps round-robin and grain re-serialises them in order.
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    else:
        threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1))
        dataset = steps.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(threads, _PREFETCH_BATCHES)))
    return iter(dataset)


def _source(cfg, split: str):
    return sources.open_source(cfg.name, split, sources.data_dir(cfg.data_dir))


def _check_num_classes(cfg) -> None:
    dataset_classes = sources.num_classes(cfg.name, sources.data_dir(cfg.data_dir))
    if dataset_classes > cfg.num_classes:
        raise ValueError(f"{cfg.name} has {dataset_classes} classes but data.num_classes is "
                         f"{cfg.num_classes}")


class TrainIterator:
    """Infinite host-local train batches; `get_state()` is the next step, JSON-serialisable."""

    def __init__(self, cfg, *, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        source = _source(cfg, cfg.train_split)   # a missing dataset is the first thing to say
        recipe = Recipe.from_config(cfg)
        _check_num_classes(cfg)
        self.num_examples = len(source)
        per_step = global_batch * recipe.examples_per_row
        if self.num_examples < per_step:
            raise ValueError(f"a step reads {per_step} examples (global batch {global_batch}"
                             f"{' x 2 to mix' if recipe.mixes else ''}), more than the "
                             f"{self.num_examples} of {cfg.name}:{cfg.train_split}")
        self._sharding = Sharding(global_batch, process_index, process_count)
        self._seed = int(seed)
        self._make_batch = TrainBatchMaker(source, recipe, self._sharding, self._seed)
        self._workers = int(cfg.workers)
        self._step = 0
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            # Built lazily and from the next step, so set_state costs nothing until used.
            steps = grain.MapDataset.range(self._step, _MAX_STEPS).map(self._make_batch)
            self._batches = _iterate(steps, self._workers)
        batch = next(self._batches)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step, "seed": self._seed,
                "global_batch": self._sharding.global_batch}

    def set_state(self, state: dict) -> None:
        # Another process count is fine: global batches do not depend on it.
        for key in ("seed", "global_batch"):
            ours = self._seed if key == "seed" else self._sharding.global_batch
            if state[key] != ours:
                raise ValueError(f"iterator state has {key}={state[key]}, this iterator {ours}")
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        # Dropping grain's iterator stops its threads and worker processes.
        self._batches = None


def train_iterator(cfg, *, global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
    return TrainIterator(cfg, global_batch=global_batch, seed=seed, process_index=process_index,
                         process_count=process_count)


class EvalBatches:
    """The eval split in order, host-sharded; re-iterable, every process gets len(self)."""

    def __init__(self, cfg, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1):
        source = _source(cfg, cfg.eval_split)
        self.num_examples = len(source)
        sharding = Sharding(global_batch, process_index, process_count)
        self._make_batch = EvalBatchMaker(source, Recipe.from_config(cfg), sharding)
        self._workers = int(cfg.workers)
        self._num_batches = -(-self.num_examples // global_batch)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        return _iterate(grain.MapDataset.range(self._num_batches).map(self._make_batch),
                        self._workers)


def eval_batches(cfg, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> EvalBatches:
    return EvalBatches(cfg, global_batch=global_batch, process_index=process_index,
                       process_count=process_count)


def num_train_examples(cfg) -> int:
    return len(_source(cfg, cfg.train_split))
