"""What a run reports: a progress line, TensorBoard scalars and `metrics.jsonl` in the workdir
(one JSON object per line, the file tools plot from). Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def mean_metrics(history: list[dict]) -> dict:
    """Means over the steps since the last report (fetched from the devices in one go)."""
    history = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in history])) for k in history[0]}


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without its rows past `step`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError):   # a row torn by the kill
            return False

    kept = [line for line in lines if keep(line)]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever
    it is installed, only to accept torch tensors, which a run never passes; hiding it saves the
    2-3 s that importing torch adds to every start."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None   # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class Reporter:
    """Writes what a run reports; the task's own words come from its `train_line` and
    `eval_line` (training.tasks.Task)."""

    def __init__(self, workdir: str, total_steps: int, steps_per_epoch: float, batch_size: int,
                 task, resume_step: int = 0):
        """resume_step: the step the run resumes from; what an earlier process logged after it
        (it was killed before its next checkpoint) is dropped from metrics.jsonl and hidden from
        TensorBoard (its purge_step), so every curve has one value per step."""
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.batch_size = batch_size
        self.task = task
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_rows_after(path, resume_step)
            self._jsonl = open(path, "a")  # noqa: SIM115
            purge_step = resume_step + 1 if resume_step else None
            self._tensorboard = _summary_writer()(os.path.join(workdir, "tensorboard"),
                                                  purge_step=purge_step)
        self._mark = None

    def print(self, *args) -> None:
        if self.enabled:
            print(*args, flush=True)

    def start(self, step: int) -> None:
        self._mark = (time.perf_counter(), step)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def train(self, step: int, history: list[dict]) -> None:
        """One progress line for the steps up to `step`; resets the throughput clock."""
        means = mean_metrics(history)
        now, (then, first) = time.perf_counter(), self._mark
        steps_per_sec = (step - first) / max(now - then, 1e-9)
        self._mark = (now, step)
        epoch = step / self.steps_per_epoch
        eta = (self.total_steps - step) / steps_per_sec if steps_per_sec else math.inf
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars.update({"epoch": epoch, "images_per_sec": steps_per_sec * self.batch_size})
        self.write(step, scalars)
        self.print(f"step {step}/{self.total_steps} | epoch {epoch:.2f} | "
                   f"loss {means['loss']:.4f} | {self.task.train_line(means)} | "
                   f"lr {means['lr']:.4g} | {steps_per_sec * self.batch_size:.1f} img/s | "
                   f"ETA {format_duration(eta)}")

    def eval(self, step: int, results) -> None:
        """results: a training.loop.Evaluation; scalars "eval/<key>" for the parameters and
        "eval_ema/<key>" for their EMA."""
        named = results.named()
        scalars = {f"{prefix}/{k}": v for prefix, (_, r) in named.items() for k, v in r.items()
                   if k != "count"}
        self.write(step, scalars)
        for label, r in named.values():
            self.print(f"eval at step {step} ({label}, {int(r['count'])} images): "
                       f"{self.task.eval_line(r)}")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
