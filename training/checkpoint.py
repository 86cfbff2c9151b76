"""Checkpoints: orbax, atomic, keep the newest N (and every N-th step), asynchronous, restored
into the shardings of the state they replace. Each holds the train state, the data iterator's
state (so a resumed run reads the same examples) and what identifies the run: the model, its
overrides and parameter shapes, and the config (the preprocessing the model is trained with
travels with it). A checkpoint that does not read (a truncated file, an empty metadata file) is
set aside and the newest one that reads is used."""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

# The items of every checkpoint: the train state, the data iterator's state, the identification.
_ITEMS = ("state", "data", "meta")


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir belongs to another model or shape."""


def model_signature(config, params) -> dict:
    shapes = {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    return {"model": config.model, "model_kwargs": config.model_kwargs.to_dict(),
            "num_classes": config.data.num_classes, "param_shapes": shapes}


def describe(signature: dict) -> str:
    kwargs = "".join(f", {k}={v!r}" for k, v in sorted(signature["model_kwargs"].items()))
    return f"{signature['model']}(num_classes={signature['num_classes']}{kwargs})"


def check_compatible(saved: dict, current: dict, directory: str) -> None:
    """Same model and same parameter shapes, or an error naming both."""
    problems = []
    if saved["model"] != current["model"] or saved["num_classes"] != current["num_classes"]:
        problems.append("a different model")
    old, new = saved["param_shapes"], current["param_shapes"]
    missing, unexpected = sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys())
    mismatched = [f"{k}: checkpoint {old[k]} vs model {new[k]}"
                  for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
    for label, names in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
        if names:
            problems.append(f"{len(names)} {label}: " + "; ".join(names[:5])
                            + (" ..." if len(names) > 5 else ""))
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint in {directory} is from {describe(saved)}, but this config builds "
            f"{describe(current)} ({'; '.join(problems)}). Use another --workdir, or the "
            "matching config.")


class CheckpointUnreadableError(RuntimeError):
    """No checkpoint of the directory reads."""


class Saved(NamedTuple):
    """The newest checkpoint whose identification reads: its step, and the model signature and
    config (a dict) it was written with."""

    step: int
    signature: dict
    config: dict


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Checkpoints:
    def __init__(self, directory: str, keep: int, signature: dict, config_json: str, *,
                 keep_every: int = 0):
        """keep: the newest checkpoints kept; keep_every > 0 also keeps every checkpoint whose
        step is a multiple of it (milestones of a long run). Interrupted saves
        (`<step>.orbax-checkpoint-tmp-*`) are removed."""
        self.directory = os.path.abspath(directory)
        self.signature = signature
        self.meta = {"signature": signature, "config": config_json}
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=_ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                                 create=True, cleanup_tmp_directories=True))
        self.skipped: list[str] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _set_aside(self, step: int, why: str) -> None:
        """Renames an unreadable checkpoint out of orbax's sight (it lists numeric names only),
        so that saving that step again is possible and nothing is deleted."""
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
            os.rename(path, f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        self.skipped.append(f"step {step} ({why})")
        self.manager.reload()

    def newest_readable(self) -> Saved | None:
        """The newest checkpoint whose identification reads (None if there is no checkpoint);
        newer unreadable ones are set aside, each with the reason."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
                return Saved(step, meta["signature"], json.loads(meta["config"]))
            except Exception as e:   # orbax and TensorStore raise many kinds
                self._set_aside(step, _first_line(e))
        if self.skipped:
            raise CheckpointUnreadableError(
                f"no checkpoint in {self.directory} reads ({'; '.join(self.skipped)}); they "
                "were renamed *.unreadable-*. Remove the workdir to start afresh.")
        return None

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(self.meta)), force=True)

    def restore(self, saved: Saved, like_state):
        """(step, state, data iterator state) of the newest checkpoint from `saved.step` down
        that restores, with the shardings, dtypes and structure of `like_state`; newer
        unreadable ones are set aside. The model signature is checked first."""
        check_compatible(saved.signature, self.signature, self.directory)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        for step in sorted((s for s in self.manager.all_steps() if s <= saved.step),
                           reverse=True):
            try:   # every item must read, the identification included
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                signature = restored["meta"]["signature"]
            except Exception as e:   # orbax and TensorStore raise many kinds
                self._set_aside(step, _first_line(e))
                continue
            check_compatible(signature, self.signature, self.directory)
            return step, restored["state"], restored["data"]
        raise CheckpointUnreadableError(
            f"no checkpoint in {self.directory} restores ({'; '.join(self.skipped)}); they were "
            "renamed *.unreadable-*. Remove the workdir to start afresh.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# Reading a run's weights back (tools, transfer learning, distillation): the one place outside
# `Checkpoints` that knows the items above and the TrainState's field names.


class RunWeights(NamedTuple):
    """One set of weights of a training run, as {module: {leaf: array}} trees."""

    model: str
    num_classes: int
    overrides: dict[str, Any]
    step: int
    params: dict
    state: dict
    directory: str
    config: dict     # the run's config, as recorded (its `data` says how images were prepared)


def _directory_and_step(path) -> tuple[str, int | None]:
    """(the orbax checkpoints directory, the step) for a workdir, its checkpoints directory or
    one step's directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(os.path.basename(path))
    return path, None


def _manager(path, step, items):
    directory, path_step = _directory_and_step(path)
    manager = ocp.CheckpointManager(directory, item_names=items)
    step = step if step is not None else path_step
    step = step if step is not None else manager.latest_step()
    if step is None:
        manager.close()
        raise FileNotFoundError(f"no checkpoint in {directory}")
    return manager, directory, step


def run_model(path, *, step: int | None = None) -> dict[str, Any]:
    """What a run's checkpoint was built as: {"model", "num_classes", "overrides", "step"}.
    `path`: the run's workdir, its checkpoints directory or one step's directory; the newest
    step unless `step` says (or the path names one)."""
    manager, _, step = _manager(path, step, ("meta",))
    signature = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]["signature"]
    manager.close()
    return {"model": signature["model"], "num_classes": signature["num_classes"],
            "overrides": signature["model_kwargs"], "step": step}


def read_weights(path, *, step: int | None = None, ema: bool = False) -> RunWeights:
    """The parameters and model state of a run (`path` as in `run_model`); ema=True: their
    EMA (the weights the NFNet paper reports)."""
    manager, directory, step = _manager(path, step, ("state", "meta"))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    manager.close()
    train_state, signature = restored["state"], restored["meta"]["signature"]
    prefix = "ema_" if ema else ""
    if ema and train_state.get("ema_params") is None:
        raise ValueError(f"the checkpoint at step {step} in {directory} keeps no EMA "
                         "(the run's config had none); use ema=False.")
    return RunWeights(signature["model"], signature["num_classes"], signature["model_kwargs"],
                      step, train_state[prefix + "params"], train_state[prefix + "model_state"],
                      directory, json.loads(restored["meta"]["config"]))
