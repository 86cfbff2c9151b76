"""Published weights: one `.safetensors` file per model, loadable offline, never pickled.

    nets.weights.save("resnet50.safetensors", params, state, model="resnet50")
    params, state = nets.weights.load("resnet50.safetensors")       # model from the file
    found = nets.weights.load("resnet50.safetensors", num_classes=10, strict=False)  # new head

A file holds every leaf of `params` under "params/<Haiku module path>/<leaf>" and of `state`
under "state/<module path>/<leaf>" (the module paths are the keys of the trees Haiku gives,
"resnet/layer1_0/conv1"), floating leaves as float32. Its string metadata names the model, its
num_classes and overrides (JSON), how its images are prepared and the format version, so that a
file alone says how to rebuild and feed its model. The tree a model expects comes from
`nets.introspect.shapes` (jax.eval_shape: nothing is compiled or computed).

Preprocessing in the metadata: "eval_preprocessing" is what evaluation and prediction use, as the
input pipeline's fields (`EVAL_PREPROCESSING_FIELDS` of a config's `data`, pixels in [0, 255]):
the run's own for weights from a training run, the reference's otherwise (and for files written
before the key existed). "preprocessing" describes the variant's reference (the registry's
`Preprocessing`, pixels in [0, 1], with its train and test sizes). "class_names", when present,
names the head's outputs (e.g. a run's dataset classes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from nets import registry
from nets.introspect import mismatch_report, num_classes_of, shapes

FORMAT = "convnets.weights"
FORMAT_VERSION = "1"
_COLLECTIONS = ("params", "state")
# The fields of a config's `data` section that say how evaluation prepares an image.
EVAL_PREPROCESSING_FIELDS = ("eval_preprocess", "image_ops", "test_size", "crop_fraction",
                             "interpolation", "mean", "std")


class LoadResult(NamedTuple):
    """What `load(..., strict=False)` found: the leaves present in both the file and the model
    (as partial trees), and the names ("params/<module>/<leaf>") of the model's leaves the file
    lacks (`missing`) and of the file's tensors the model has no place for (`unexpected`)."""

    params: dict
    state: dict
    missing: list[str]
    unexpected: list[str]


def flatten(collection: str, tree) -> dict[str, Any]:
    return {f"{collection}/{module}/{leaf}": value
            for module, leaves in tree.items() for leaf, value in leaves.items()}


def unflatten(flat: dict[str, Any]) -> tuple[dict, dict]:
    """`flatten`'s inverse for both collections: {"params/<module>/<leaf>": x, "state/...": y}
    -> (params, state) as nested {module: {leaf: x}}."""
    trees: dict[str, dict] = {c: {} for c in _COLLECTIONS}
    for key, value in flat.items():
        collection, rest = key.split("/", 1)
        module, leaf = rest.rsplit("/", 1)
        trees[collection].setdefault(module, {})[leaf] = value
    return trees["params"], trees["state"]


def _to_array(value) -> np.ndarray:
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
        return value
    # bf16 leaves (numpy sees ml_dtypes' kind "V") and other floats: float32 holds them exactly.
    return value.astype(np.float32)


def reference_eval_preprocessing(model: str) -> dict[str, Any]:
    """How the reference of `model` prepares an eval image, as the input pipeline's fields
    (`EVAL_PREPROCESSING_FIELDS`, mean and std on [0, 255] pixels)."""
    info = registry.model_info(model)
    p = info.preprocessing
    return {"eval_preprocess": p.eval_preprocess, "image_ops": p.image_ops,
            "test_size": info.test_size, "crop_fraction": p.crop_fraction,
            "interpolation": p.interpolation, "mean": [255 * m for m in p.mean],
            "std": [255 * s for s in p.std]}


def save(path, params, state, *, model: str, num_classes: int | None = None,
         overrides: dict | None = None, metadata: dict[str, str] | None = None,
         eval_preprocessing: dict | None = None, class_names=None) -> None:
    """Writes `params` and `state` of `model` (a registered name) to one .safetensors file.

    num_classes defaults to the head's width in `params` (0 without a head). `overrides` are the
    options the model was built with (as for `nets.transformed`); they must be JSON-serialisable.
    `metadata` adds string entries (e.g. the recipe, the accuracy). `eval_preprocessing` (the
    `EVAL_PREPROCESSING_FIELDS` of the run's data config) defaults to the reference's;
    `class_names` (one per output) are optional. The trees are checked against the model first,
    so a file that `load` would refuse is never written.
    """
    overrides = dict(overrides or {})
    info = registry.model_info(model)
    if num_classes is None:
        num_classes = num_classes_of(model, params, overrides)
    eval_preprocessing = dict(eval_preprocessing or reference_eval_preprocessing(model))
    if set(eval_preprocessing) != set(EVAL_PREPROCESSING_FIELDS):
        raise ValueError(f"eval_preprocessing must have exactly the fields "
                         f"{EVAL_PREPROCESSING_FIELDS}; got {sorted(eval_preprocessing)}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a head of {num_classes} outputs")
    check_against_model(model, num_classes, overrides,
                         {**flatten("params", params), **flatten("state", state)}, strict=True,
                         header=f"these trees are not {model}'s (num_classes={num_classes}, "
                                f"overrides={overrides}); nothing was written:")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model,
        "num_classes": str(num_classes), "overrides": json.dumps(overrides, sort_keys=True),
        "reference": info.reference,
        "preprocessing": json.dumps({**dataclasses.asdict(info.preprocessing),
                                     "train_size": info.train_size,
                                     "test_size": info.test_size}),
        "eval_preprocessing": json.dumps(eval_preprocessing),
    })
    if class_names is not None:
        meta["class_names"] = json.dumps([str(name) for name in class_names])
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(_to_array(v))
               for k, v in {**flatten("params", params), **flatten("state", state)}.items()}
    save_file(tensors, os.fspath(path), metadata=meta)


def is_weights_file(path) -> bool:
    """Whether `path` is a .safetensors file written by `save` (not, e.g., a PyTorch one)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="np") as f:
        return (f.metadata() or {}).get("format") == FORMAT


def read_metadata(path) -> dict[str, Any]:
    """The file's metadata, decoded: model, num_classes (int), overrides, preprocessing and
    eval_preprocessing (dicts), class_names (a list, or None), format_version and any entries
    `save` was given. A .safetensors file that this module did not write (e.g. a PyTorch state
    dict) is refused with the command that converts it.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights file at {path}")
    with safe_open(path, framework="np") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by nets.weights.save (its metadata has no "
            f"format={FORMAT!r}). A PyTorch state dict in safetensors converts with: python -m "
            "tools.convert --from torch SRC --model NAME --out OUT.safetensors")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['format_version']}; this code reads "
                         f"version {FORMAT_VERSION}.")
    meta["num_classes"] = int(meta["num_classes"])
    meta["overrides"] = json.loads(meta["overrides"])
    meta["preprocessing"] = json.loads(meta["preprocessing"])
    meta["eval_preprocessing"] = (json.loads(meta["eval_preprocessing"])
                                  if "eval_preprocessing" in meta
                                  else reference_eval_preprocessing(meta["model"]))
    meta["class_names"] = json.loads(meta["class_names"]) if "class_names" in meta else None
    return meta


def check_against_model(name, num_classes, overrides, found, *, strict, header):
    """(the model's flat tree of ShapeDtypeStructs, missing, unexpected) for `found`, a flat
    {"params/<module>/<leaf>": array} dict (`flatten`); raises one ValueError starting with
    `header` for shape mismatches always and, when strict, for missing or unexpected names
    too."""
    expected_params, expected_state = shapes(name, num_classes, **overrides)
    expected = {**flatten("params", expected_params), **flatten("state", expected_state)}
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    mismatched = [f"{k}: file {tuple(np.shape(found[k]))} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in found and np.shape(found[k]) != expected[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(mismatch_report(
            header, missing=missing if strict else (), mismatched=mismatched,
            unexpected=unexpected if strict else ()))
    return expected, missing, unexpected


def load(path, name: str | None = None, num_classes: int | None = None, strict: bool = True,
         **overrides):
    """Reads a file `save` wrote, for the model `name` (default: the file's model).

    num_classes defaults to the file's; overrides to the file's, updated by those given (for
    another model than the file's, only those given). Returns `(params, state)` as trees of
    float32 jax arrays shaped like `f.init`'s. Strict: every leaf of the model must be in the
    file and every tensor of the file must be a leaf of the model, or one ValueError lists the
    missing, mismatched and unexpected names (and names both models when they differ).

    strict=False (like torch's `load_state_dict(strict=False)`) returns a `LoadResult`: only the
    leaves found, plus `missing` and `unexpected` names; nothing is initialised here. The caller
    merges the found leaves over a fresh init, e.g. to fine-tune with a new head:

        found = nets.weights.load(path, num_classes=10, strict=False)  # file without its head
        params = {m: {**leaves, **found.params.get(m, {})} for m, leaves in init_params.items()}

    A shape mismatch (e.g. a 1000-class head loaded for num_classes=10) is an error in both
    modes, as in torch: drop the head from the file's trees, or save them without it.
    """
    from safetensors.numpy import load_file

    meta = read_metadata(path)
    name = name or meta["model"]
    if name == meta["model"]:
        overrides = {**meta["overrides"], **overrides}
    if num_classes is None:
        num_classes = meta["num_classes"]
    tensors = load_file(os.fspath(path))
    model = f"{name} (num_classes={num_classes}" + "".join(
        f", {k}={v!r}" for k, v in sorted(overrides.items())) + ")"
    saved = f"{meta['model']} (num_classes={meta['num_classes']}" + "".join(
        f", {k}={v!r}" for k, v in sorted(meta["overrides"].items())) + ")"
    header = (f"{path} holds {saved}, not {model}:" if saved != model
              else f"{path} does not fit {model}:")
    expected, missing, unexpected = check_against_model(
        name, num_classes, overrides, tensors, strict=strict, header=header)

    params, state = unflatten({key: jnp.asarray(tensors[key], dtype=spec.dtype)
                               for key, spec in expected.items() if key in tensors})
    if strict:
        return params, state
    return LoadResult(params, state, missing, unexpected)
