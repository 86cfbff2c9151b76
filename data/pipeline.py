"""The input pipeline the trainer calls: sharded, deterministic, resumable batches via grain.

Determinism contract (what makes runs reproducible and multi-host runs equal single-host ones):
global batch `step` holds the examples at positions step*B .. (step+1)*B-1 of a permutation of
the train split drawn from (seed, epoch) alone; process p yields rows p*b .. (p+1)*b-1 of it.
Per-example augmentation is seeded from (seed, global position) and batch mixing from
(seed, step, process), so the state of an iterator is just the next step number.
"""

import dataclasses
import functools
import os

import grain
from absl import flags
import numpy as np

from data import augment, sources

# Distinct seed streams, so no two uses of the same seed draw correlated numbers.
_PERMUTATION_STREAM, _EXAMPLE_STREAM, _MIX_STREAM = 0, 1, 2
# Steps a train iterator can run; far beyond any run, and finite because grain needs a length.
_MAX_STEPS = 2**40
# Threads build whole batches, one each; decoding (PIL) releases the GIL.
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
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    random_resized_crop: bool
    min_area: float
    flip: bool
    mixup_alpha: float
    cutmix: bool
    num_classes: int

    @classmethod
    def from_config(cls, cfg) -> "Recipe":
        if cfg.randaugment_layers > 0:
            raise NotImplementedError(
                "RandAugment is not implemented yet: it arrives with the input-pipeline issue "
                "(issue 5); set data.randaugment_layers=0"
            )
        if cfg.eval_preprocess not in augment.EVAL_PREPROCESSORS:
            raise ValueError(f"unknown data.eval_preprocess {cfg.eval_preprocess!r}; "
                             f"choose from {augment.EVAL_PREPROCESSORS}")
        if cfg.interpolation not in augment.INTERPOLATIONS:
            raise ValueError(f"unknown data.interpolation {cfg.interpolation!r}; "
                             f"choose from {sorted(augment.INTERPOLATIONS)}")
        names = [field.name for field in dataclasses.fields(cls)]
        values = {name: getattr(cfg, name) for name in names}
        values["mean"], values["std"] = tuple(cfg.mean), tuple(cfg.std)
        return cls(**values)


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
        """Positions, counted over all batches, of the rows this process yields at `step`."""
        first = step * self.global_batch + self.process_index * self.local_batch
        return np.arange(first, first + self.local_batch)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch])
    return rng.permutation(num_examples)


def train_example_indices(seed: int, step: int, sharding: Sharding,
                          num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """(global positions, example indices) of this process's rows of train batch `step`."""
    steps_per_epoch = num_examples // sharding.global_batch
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    positions = sharding.global_positions(step)
    # Positions within the epoch: batches drop the permutation's remainder.
    in_epoch = positions - (step - step_in_epoch) * sharding.global_batch
    return positions, epoch_permutation(seed, epoch, num_examples)[in_epoch]


def _train_image(image: np.ndarray, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    image = augment.to_rgb(image)
    size = recipe.train_size
    if recipe.random_resized_crop:
        image = augment.random_resized_crop(image, rng, size, recipe.min_area,
                                            recipe.interpolation)
    else:
        image = augment.eval_preprocess(image, recipe.eval_preprocess, size,
                                        recipe.crop_fraction, recipe.interpolation)
    if recipe.flip:
        image = augment.random_flip(image, rng)
    return image


def _eval_image(image: np.ndarray, recipe: Recipe) -> np.ndarray:
    return augment.eval_preprocess(augment.to_rgb(image), recipe.eval_preprocess,
                                   recipe.test_size, recipe.crop_fraction, recipe.interpolation)


@dataclasses.dataclass(frozen=True)
class TrainBatchMaker:
    """step -> this process's train batch; a picklable callable for grain's workers."""

    source: object
    recipe: Recipe
    sharding: Sharding
    seed: int

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        positions, indices = train_example_indices(self.seed, step, self.sharding,
                                                   len(self.source))
        images, labels = [], []
        for position, index in zip(positions, indices):
            example = self.source[int(index)]
            rng = np.random.default_rng([self.seed, _EXAMPLE_STREAM, int(position)])
            images.append(_train_image(example["image"], rng, self.recipe))
            labels.append(example["label"])
        images = augment.normalize(np.stack(images), self.recipe.mean, self.recipe.std)
        targets = augment.one_hot(np.asarray(labels), self.recipe.num_classes)
        if self.recipe.mixup_alpha > 0 or self.recipe.cutmix:
            rng = np.random.default_rng([self.seed, _MIX_STREAM, step,
                                         self.sharding.process_index])
            images, targets = augment.mix_batch(images, targets, rng, self.recipe.mixup_alpha,
                                                self.recipe.cutmix)
        return {"images": images, "targets": targets}


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
            images[row] = augment.normalize(_eval_image(example["image"], self.recipe),
                                            self.recipe.mean, self.recipe.std)
            labels[row] = example["label"]
        return {"images": images, "labels": labels, "mask": mask}


def _iterate(steps: grain.MapDataset, workers: int) -> grain.DatasetIterator:
    """Batches of `steps` in order, built in threads (workers=0) or worker processes."""
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
        if self.num_examples < global_batch:
            raise ValueError(f"global batch {global_batch} exceeds the {self.num_examples} "
                             f"examples of {cfg.name}:{cfg.train_split}")
        self.steps_per_epoch = self.num_examples // global_batch
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
