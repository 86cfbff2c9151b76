"""The tasks a run can train; `config.task` names one.

A task is one module in `training/` that defines `TASK = Task(...)`: everything about a run
that depends on what the model predicts. The loop, the step builder, checkpoints and the
reporter know only this record, so adding a task is one module plus its line in `_MODULES`
(and its experiments); nothing else changes.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import NamedTuple

# Task name -> the module that defines it (imported when a run asks for it).
_MODULES = {
    "classification": "training.classification",
    "condensation": "training.condensation",
    "distillation": "training.distill",
    "detection": "training.detection",
    "keypoints": "training.keypoints",
}


class Task(NamedTuple):
    """What a task supplies. `config` is the run's whole config; `model` its transformed
    model; results are dicts of floats with a "count" (examples evaluated)."""

    name: str
    # config -> None; a ValueError says what is wrong with the task's part of the config.
    validate: Callable
    # (config, model, *, dtype) -> steps.Objective: the loss, its train metrics, any extras.
    objective: Callable
    # (config, *, process_index, process_count) -> an iterator of host-local train batches
    # with get_state / set_state / close and `num_examples` (data/sampler.TrainIterator).
    train_data: Callable
    # config -> the number of examples in the train split (opening it reads no image).
    num_train_examples: Callable
    # (config, *, process_index, process_count) -> an iterable of host-local eval batches.
    eval_data: Callable
    # (config, model) -> (params, model_state, batch) -> the batch's eval outputs: sums over
    # its unmasked examples, or what `eval_combine` collects.
    eval_sums: Callable
    # (the eval outputs summed or collected, on the host; config) -> the result dict.
    summarize: Callable
    # means of the train metrics since the last report -> the task's part of the progress line.
    train_line: Callable
    # one result dict -> the task's part of an eval line.
    eval_line: Callable
    # (label, result) -> the run's closing line, e.g. "test accuracy (EMA params): ...".
    final_line: Callable
    # (collected so far or None, one batch's eval outputs) -> collected; None: the outputs are
    # summed on the devices (e.g. detection keeps its detections instead, for COCO mAP).
    eval_combine: Callable | None = None


def names() -> list[str]:
    return sorted(_MODULES)


def get(name: str) -> Task:
    """The task called `name`; an unknown name is a ValueError listing the tasks."""
    if name not in _MODULES:
        close = difflib.get_close_matches(name, _MODULES, n=2, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown task {name!r}.{hint} Tasks: {', '.join(names())}")
    return importlib.import_module(_MODULES[name]).TASK
