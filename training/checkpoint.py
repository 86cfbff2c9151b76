"""Checkpoints: orbax, atomic, keep the newest N, asynchronous, restored into the shardings of
the state they replace. Each holds the train state, the data iterator's state (so a resumed run
reads the same examples) and what identifies the run: the model, its overrides and parameter
shapes, and the config (the preprocessing the model is trained with travels with it)."""

from __future__ import annotations

import os
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


class Checkpoints:
    def __init__(self, directory: str, keep: int, signature: dict, config_json: str):
        self.directory = os.path.abspath(directory)
        self.signature = signature
        self.meta = {"signature": signature, "config": config_json}
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=_ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(self.meta)), force=True)

    def restore(self, step: int, like_state):
        """The state at `step`, with the shardings, dtypes and structure of `like_state`, and the
        data iterator's state."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        check_compatible(meta["meta"]["signature"], self.signature, self.directory)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

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
                      directory)
