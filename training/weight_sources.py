"""One reader for every kind of weights a run or a tool starts from:

- a `nets.weights` file (.safetensors written by `nets.weights.save` or `tools.convert`);
- a training run (its workdir, checkpoints directory or one step's directory; ema=True: the EMA);
- a PyTorch state dict of a variant's reference (.pth / .pt / .bin read with
  `torch.load(weights_only=True)`, or a PyTorch .safetensors), converted by
  `nets.convert.from_torch`; training scripts' containers ({"state_dict": ...}, {"model": ...})
  are unwrapped.

    source = weight_sources.read("runs/resnet50-local", ema=True)
    source = weight_sources.read("resnet50.pth", model="resnet50")
    source.model, source.num_classes, source.overrides, source.params, source.state
    source.eval_preprocessing      # how evaluation prepares an image for these weights

Nothing is unpickled. Transfer learning, distillation and the tools read weights here only.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np

import nets
from training import checkpoint

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_REGISTRY = "the registry ({reference}'s evaluation)"


class Source(NamedTuple):
    """Weights as nested {module: {leaf: array}} trees, with the model they are for.

    `eval_preprocessing`: the fields of a config's `data` that say how evaluation prepares an
    image (`nets.weights.EVAL_PREPROCESSING_FIELDS`): a run's own, a weights file's recorded
    ones, or the reference's; `preprocessing_from` says which. `class_names` are the head's
    outputs' names where the file records them; `dataset` is a run's {"name", "data_dir",
    "eval_split"},
    where its class names can be looked up."""

    model: str
    num_classes: int
    overrides: dict[str, Any]
    params: dict
    state: dict
    description: str
    eval_preprocessing: dict | None = None
    preprocessing_from: str = ""
    class_names: tuple[str, ...] | None = None
    dataset: dict | None = None


def read_torch_state_dict(path) -> dict:
    """A PyTorch state dict {name: tensor or array} from .pth / .pt / .bin (no unpickling of
    anything but tensors) or .safetensors, unwrapped from the {"state_dict": ...} or
    {"model": ...} containers training scripts (timm's among them) save."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    return loaded


def _weights_file(path: str) -> Source:
    meta = nets.weights.read_metadata(path)
    from safetensors.numpy import load_file

    params, state = nets.weights.unflatten(load_file(path))
    names = meta["class_names"]
    return Source(meta["model"], meta["num_classes"], meta["overrides"], params, state,
                  f"{meta['model']} weights {path}", meta["eval_preprocessing"],
                  f"the weights file {path}", tuple(names) if names else None)


def read(path, *, model: str | None = None, num_classes: int | None = None,
         ema: bool = False) -> Source:
    """The weights at `path` (see the module docstring). `model` and `num_classes` are needed
    for a PyTorch state dict only (num_classes defaults to its head's); weights files and runs
    say what they hold. ema=True applies to training runs only."""
    path = os.fspath(path)
    if os.path.isdir(path):
        run = checkpoint.read_weights(path, ema=ema)
        to_numpy = lambda tree: {m: {k: np.asarray(v) for k, v in leaves.items()}
                                 for m, leaves in tree.items()}
        description = (f"{run.model} checkpoint at step {run.step}{' (EMA)' if ema else ''} "
                       f"in {os.path.abspath(path)}")
        data_config = run.config.get("data", {})
        if all(k in data_config for k in nets.weights.EVAL_PREPROCESSING_FIELDS):
            preprocessing = {k: data_config[k] for k in nets.weights.EVAL_PREPROCESSING_FIELDS}
            origin = f"the run's config (step {run.step} in {run.directory})"
            dataset = {"name": data_config["name"], "data_dir": data_config["data_dir"],
                       "eval_split": data_config["eval_split"]}
        else:   # a checkpoint written without the trainer's config: the reference's
            preprocessing = nets.weights.reference_eval_preprocessing(run.model)
            origin = _REGISTRY.format(reference=nets.model_info(run.model).reference)
            dataset = None
        return Source(run.model, run.num_classes, run.overrides, to_numpy(run.params),
                      to_numpy(run.state), description, preprocessing, origin, None, dataset)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file or training workdir at {path}")
    if ema:
        raise ValueError(f"{path} is a weights file; the EMA option applies to training "
                         "checkpoints only (a file holds one set of weights).")
    if path.endswith(".safetensors") and nets.weights.is_weights_file(path):
        return _weights_file(path)
    if not path.endswith((*TORCH_SUFFIXES, ".safetensors")):
        raise ValueError(f"{path}: weights must be a nets.weights .safetensors file, a PyTorch "
                         f"state dict ({', '.join(TORCH_SUFFIXES)} or .safetensors) or a "
                         "training workdir")
    if model is None:
        raise ValueError(f"{path} is not a nets.weights file; read as a PyTorch state dict it "
                         "needs the model it is for. Convert it once with: python -m "
                         "tools.convert --from torch SRC --model NAME --out OUT.safetensors")
    params, state = nets.convert.from_torch(model, read_torch_state_dict(path), num_classes)
    return Source(model, nets.introspect.num_classes_of(model, params), {}, params, state,
                  f"{model} PyTorch state dict {path}",
                  nets.weights.reference_eval_preprocessing(model),
                  _REGISTRY.format(reference=nets.model_info(model).reference))


def dataset_class_names(source: Source) -> list[str] | None:
    """The class names of a run's dataset, when it is readable here and they fit the head; a
    detector's are those of its labels 1..num_classes, "" where the dataset names none."""
    if source.dataset is None:
        return None
    from data import detection, sources

    try:
        if nets.model_info(source.model).task in ("detection", "keypoints"):
            return detection.class_names(ml_collections.ConfigDict(
                {"eval_split": "", **source.dataset, "num_classes": source.num_classes}))
        names = sources.class_names(source.dataset["name"],
                                    sources.data_dir(source.dataset["data_dir"]))
    except (FileNotFoundError, ValueError, KeyError):   # the run's data is not here
        return None
    return names if len(names) == source.num_classes else None


def variables(source: Source, model: str | None = None, num_classes: int | None = None,
              **overrides):
    """`(params, state)` of `source` as float32 jax trees for `model` (default: the source's),
    checked strictly: one ValueError lists every missing, unexpected or mismatched leaf.
    num_classes defaults to the source's; overrides to the source's, updated by those given
    (for another model than the source's, only those given)."""
    model = model or source.model
    if model == source.model:
        overrides = {**source.overrides, **overrides}
    num_classes = source.num_classes if num_classes is None else num_classes
    found = {**nets.weights.flatten("params", source.params),
             **nets.weights.flatten("state", source.state)}
    expected, _, _ = nets.weights.check_against_model(
        model, num_classes, overrides, found, strict=True,
        header=f"{source.description} does not fit {model} (num_classes={num_classes}"
               + "".join(f", {k}={v!r}" for k, v in sorted(overrides.items())) + "):")
    return nets.weights.unflatten({key: jnp.asarray(found[key], spec.dtype)
                                   for key, spec in expected.items()})
