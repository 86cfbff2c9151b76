"""The config values that would crash a run late (after compiling, at the first checkpoint) or
train it silently wrong, found before anything is built: `problems` returns one line per
problem, all of them at once; the loop raises them together as one ConfigError and train.py
prints each line and exits 2.

Pure checks of the config's values, but for `train_split_problems`, which needs the size of the
train split (opening its source reads no image)."""

from __future__ import annotations

import difflib

from data import augment, resize
from data.detection import DetectionDataError
from training import optimizers

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def _choice(field: str, value, allowed, what: str) -> list[str]:
    """An unknown name: the close ones and every valid one."""
    if value in allowed:
        return []
    close = difflib.get_close_matches(str(value), list(allowed), n=2, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return [f"config.{field}={value!r} is not {what}.{hint} Choose from: {', '.join(allowed)}"]


def _at_least(field: str, value, low, why: str = "") -> list[str]:
    return [] if value >= low else [f"config.{field}={value!r} must be >= {low}{why}"]


def _positive(field: str, value, why: str = "") -> list[str]:
    return [] if value > 0 else [f"config.{field}={value!r} must be positive{why}"]


def _fraction(field: str, value, what: str) -> list[str]:
    """A value in [0, 1)."""
    return [] if 0 <= value < 1 else [f"config.{field}={value!r} must be in [0, 1): {what}"]


def _batches(config, num_devices: int) -> list[str]:
    found = []
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value <= 0:
            found.append(f"config.{field}={value} must be positive")
        elif value % num_devices:
            found.append(f"config.{field}={value} must be a multiple of the {num_devices} "
                         "devices the batch is sharded over")
    return found


def _length(config) -> list[str]:
    found = _at_least("num_steps", config.num_steps, 0,
                      " (0: train for config.num_epochs)")
    if config.num_steps == 0:
        found += _positive("num_epochs", config.num_epochs,
                           " when config.num_steps is 0 (> 0 steps: train that many steps)")
    found += _positive("log_every", config.log_every, " (steps between progress lines)")
    found += _positive("checkpoint_every", config.checkpoint_every,
                       " (steps between checkpoints; the last step always saves one)")
    found += _at_least("eval_every", config.eval_every, 0, " (0: evaluate only at the end)")
    found += _at_least("keep_checkpoints", config.keep_checkpoints, 1,
                       " (the newest checkpoints kept; a run resumes from the newest)")
    found += _at_least("keep_every_steps", config.keep_every_steps, 0,
                       " (0: keep the newest checkpoints only)")
    return found


def _optimizer(config) -> list[str]:
    cfg = config.optimizer
    found = _choice("optimizer.name", cfg.name, optimizers.OPTIMIZERS, "an optimizer")
    found += _choice("optimizer.schedule", cfg.schedule, optimizers.SCHEDULES, "a schedule")
    found += _positive("optimizer.base_lr", cfg.base_lr)
    found += _positive("optimizer.lr_batch_base", cfg.lr_batch_base,
                       " (peak lr = base_lr * batch_size / lr_batch_base)")
    found += _at_least("optimizer.weight_decay", cfg.weight_decay, 0)
    found += _fraction("optimizer.momentum", cfg.momentum, "0 is plain SGD, 1 never forgets")
    found += _at_least("optimizer.warmup_epochs", cfg.warmup_epochs, 0)
    found += _at_least("optimizer.warmup_init", cfg.warmup_init, 0)
    found += _at_least("optimizer.grad_clip_norm", cfg.grad_clip_norm, 0, " (0: no clipping)")
    # With num_steps > 0 (a short or smoke run of a recipe) the warm-up may outlast the run.
    if config.num_steps == 0 and 0 < config.num_epochs <= cfg.warmup_epochs:
        found.append(f"config.optimizer.warmup_epochs={cfg.warmup_epochs!r} is not shorter than "
                     f"the run (config.num_epochs={config.num_epochs!r}): the learning rate "
                     "would never finish warming up nor decay")
    if cfg.schedule == "exponential":
        found += _positive("optimizer.decay_epochs", cfg.decay_epochs,
                           " (the exponential schedule's period)")
    if cfg.name == "sgd_agc":
        found += _positive("optimizer.agc_clipping", cfg.agc_clipping,
                           " (AGC clips each unit's gradient norm to this x its weight norm)")
    return found


def _compute_dtype(config) -> list[str]:
    if config.compute_dtype == "float16":
        return ["config.compute_dtype='float16' needs loss scaling, which the train step does "
                "not have: bfloat16 is the supported half precision ('auto' picks it on "
                "accelerators)"]
    return _choice("compute_dtype", config.compute_dtype, COMPUTE_DTYPES, "a compute dtype")


def _data(config) -> list[str]:
    cfg = config.data
    found = _choice("data.eval_preprocess", cfg.eval_preprocess, augment.EVAL_PREPROCESSORS,
                    "an eval preprocessing")
    found += _choice("data.image_ops", cfg.image_ops, augment.IMAGE_OPS, "an image-ops family")
    found += _choice("data.interpolation", cfg.interpolation, tuple(sorted(resize.INTERPOLATIONS)),
                     "an interpolation")
    if cfg.image_ops == "tf" and cfg.interpolation in resize.INTERPOLATIONS and (
            cfg.interpolation != "bicubic"):
        found.append(f"config.data.interpolation={cfg.interpolation!r}: data.image_ops='tf' "
                     "resizes bicubically (TF's pipelines); set data.interpolation='bicubic' or "
                     "data.image_ops='torchvision'")
    found += _positive("data.num_classes", cfg.num_classes)
    found += _at_least("data.max_image_pixels", cfg.max_image_pixels, 0, " (0: no limit)")
    found += _at_least("data.mixup_alpha", cfg.mixup_alpha, 0,
                       " (0: no MixUp; > 0: lambda ~ Beta(alpha, alpha))")
    found += _at_least("data.randaugment_layers", cfg.randaugment_layers, 0)
    return found


def problems(config, num_devices: int) -> list[str]:
    """One line per problem in the values of `config` that the loop reads (the task checks its
    own part), each starting with "config.FIELD"; [] when there is none."""
    return (_batches(config, num_devices) + _length(config) + _optimizer(config)
            + _compute_dtype(config) + _data(config)
            + _fraction("label_smoothing", config.label_smoothing,
                        "the probability mass spread over all classes")
            + _fraction("ema_decay", config.ema_decay, "0 keeps no EMA"))


def rows_per_step(config) -> int:
    """Train examples one step reads: two per row when rows mix (MixUp / CutMix)."""
    return config.batch_size * (2 if config.data.mixup_alpha > 0 or config.data.cutmix else 1)


def train_split_problems(config, num_examples: int) -> list[str]:
    """A step that reads more examples than the train split has."""
    if rows_per_step(config) <= num_examples:
        return []
    mixes = " x 2 to mix" if rows_per_step(config) > config.batch_size else ""
    return [f"config.batch_size={config.batch_size}: a step reads {rows_per_step(config)} "
            f"examples (the global batch{mixes}), more than the {num_examples} of "
            f"{config.data.name}:{config.data.train_split}"]


def train_split_size(config, task) -> int | None:
    """The number of examples in the train split (the task's `num_train_examples`), or None
    where the source cannot be opened (the loop's opening of the data then says why). A
    malformed annotation file is said here, before anything is built."""
    try:
        return task.num_train_examples(config)
    except DetectionDataError:
        raise
    except (FileNotFoundError, ValueError):   # DatasetNotFoundError is a FileNotFoundError
        return None
