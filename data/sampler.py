"""The deterministic sampler every task's input pipeline shares; a task's example maker (e.g.
data/classification.py) turns the examples it picks into batches.

Determinism contract (what makes runs reproducible and multi-host runs equal single-host ones):
train batch `step` holds global rows step*B .. (step+1)*B-1, and process p yields rows
p*b .. (p+1)*b-1 of it. Each row is made of K examples (K = 2 when rows mix two images, else 1):
row q reads the examples at stream positions K*q .. K*q+K-1, where the stream is the train split
in a permutation drawn from (seed, epoch) alone, epoch after epoch. Every random choice is seeded
from (seed, stream, stream position) for per-example choices or (seed, stream, row) for per-row
ones (`example_rng`), so no result depends on the process count and an iterator's state is just
the next step number (and the count of unreadable examples replaced so far).

Unreadable examples (data.skip_unreadable): the example at stream position p that cannot be
decoded is replaced by the next readable example after it in the same epoch's permutation
(`successors`, cyclically), prepared with position p's random choices. The replacement depends
only on (seed, p) and the files, so it is the same on every host, for any process count and
after a resume; batches stay full and an epoch still reads each readable example at least once.
A batch maker reports how many examples it skipped under the key `UNREADABLE`, which the train
iterator removes from the batch and adds to its running count.
"""

import dataclasses
import functools
import os
import threading
import time

import grain
import numpy as np
from absl import flags

# Distinct seed streams, so no two uses of the same seed draw correlated numbers. A maker draws
# from `example_rng(seed, <one of these>, position or row)`.
(PERMUTATION_STREAM, EXAMPLE_STREAM, MIX_STREAM, RANDAUGMENT_EXAMPLE_STREAM,
 RANDAUGMENT_ROW_STREAM) = range(5)
# Steps a train iterator can run; far beyond any run, and finite because grain needs a length.
_MAX_STEPS = 2**40
# Threads (workers=0) build whole batches, one each: enough for small images; NumPy's small ops
# hold the GIL, so large images want worker processes.
_MAX_THREADS = 16
_THREADS_PER_WORKER = 2
_PREFETCH_BATCHES = 4
# The key under which a batch maker reports the unreadable examples it skipped.
UNREADABLE = "unreadable"


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
    rng = np.random.default_rng([seed, PERMUTATION_STREAM, epoch])
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


def successors(seed: int, position: int, num_examples: int, examples_per_step: int):
    """The example indices after stream position `position` in its epoch's permutation,
    cyclically (all other examples once): where an unreadable example's replacement is sought."""
    epoch_length = (num_examples // examples_per_step) * examples_per_step
    epoch, offset = divmod(int(position), epoch_length)
    permutation = epoch_permutation(seed, epoch, num_examples)
    for k in range(1, num_examples):
        yield int(permutation[(offset + k) % num_examples])


def example_rng(seed: int, stream: int, position: int) -> np.random.Generator:
    """The generator of one random choice: (seed, stream, stream position or row)."""
    return np.random.default_rng([seed, stream, int(position)])


def worker_count(workers: int) -> int:
    """data.workers: 0 = threads in this process, N > 0 = N processes, -1 = one per core."""
    if workers < -1:
        raise ValueError(f"data.workers must be -1 (one per core), 0 (threads) or a process "
                         f"count; got {workers}")
    return (os.cpu_count() or 1) if workers == -1 else workers


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in each grain worker process: it exits once the process that started it is gone.
    A trainer killed with SIGKILL runs no clean-up, and its workers (and multiprocessing's
    resource tracker, which waits for them) would otherwise linger. Polling the parent's pid,
    unlike PR_SET_PDEATHSIG, does not depend on which of the parent's threads started it."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def iterate(steps: grain.MapDataset, workers: int) -> grain.DatasetIterator:
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
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                                      worker_init_fn=_exit_with_parent)
    else:
        threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1))
        dataset = steps.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(threads, _PREFETCH_BATCHES)))
    return iter(dataset)


class TrainIterator:
    """Infinite host-local train batches, `make_batch(step)` for step = 0, 1, ... (a picklable
    callable, for grain's workers); `get_state()` is the next step, JSON-serialisable.

    `unreadable`: how many unreadable examples this process's batches skipped so far (the batch
    maker's `UNREADABLE` counts, summed as batches are taken). It is part of the state, so it
    survives a resume; in a multi-process run each process counts its own rows, and a
    checkpoint keeps the saving process's count."""

    def __init__(self, make_batch, *, num_examples: int, sharding: Sharding, seed: int,
                 workers: int):
        self.num_examples = num_examples
        self._make_batch = make_batch
        self._sharding = sharding
        self._seed = int(seed)
        self._workers = int(workers)
        self._step = 0
        self.unreadable = 0
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            # Built lazily and from the next step, so set_state costs nothing until used.
            steps = grain.MapDataset.range(self._step, _MAX_STEPS).map(self._make_batch)
            self._batches = iterate(steps, self._workers)
        batch = next(self._batches)
        self.unreadable += int(batch.pop(UNREADABLE, 0))
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step, "seed": self._seed,
                "global_batch": self._sharding.global_batch, "unreadable": self.unreadable}

    def set_state(self, state: dict) -> None:
        # Another process count is fine: global batches do not depend on it.
        for key in ("seed", "global_batch"):
            ours = self._seed if key == "seed" else self._sharding.global_batch
            if state[key] != ours:
                raise ValueError(f"iterator state has {key}={state[key]}, this iterator {ours}")
        self.close()
        self._step = int(state["step"])
        self.unreadable = int(state.get("unreadable", 0))   # absent in older checkpoints

    def close(self) -> None:
        # Dropping grain's iterator stops its threads and worker processes.
        self._batches = None


class EvalBatches:
    """`make_batch(i)` for the ceil(num_examples / global batch) eval batches, in order;
    re-iterable, every process gets len(self)."""

    def __init__(self, make_batch, *, num_examples: int, global_batch: int, workers: int):
        self.num_examples = num_examples
        self._make_batch = make_batch
        self._workers = int(workers)
        self._num_batches = -(-num_examples // global_batch)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        return iterate(grain.MapDataset.range(self._num_batches).map(self._make_batch),
                       self._workers)
