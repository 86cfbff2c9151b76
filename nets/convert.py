"""Converting reference weights into our parameters and model state.

Conversion is driven by our own parameter tree: every leaf of the model (found with
`jax.eval_shape`, nothing is computed) is looked up under the reference's name, its layout is
changed (PyTorch OIHW -> HWIO, (out, in) -> (in, out); Keras' depthwise (k, k, C, 1) and 1x1
dense convs reshaped) and its shape checked. Every one of our leaves must be found and every
reference tensor used; otherwise the error lists what is missing, unexpected or mismatched.

Converters only: the reference's names come from the variant's registry row (`torch_name`,
`keras_name`, `official_name`: the official NFNet and EfficientDet checkpoints), so no family
module is imported here; the trees a model expects
come from `nets.introspect`.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from nets import registry
from nets.introspect import mismatch_report, outputs_per_class, shapes
from nets.registry import module_path

# Our leaf names -> PyTorch's parameter and buffer names.
_TORCH_LEAF = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias",
               "mean": "running_mean", "var": "running_var", "gain": "gain", "bias": "bias",
               "skip_gain": "skipinit_gain", "fusion_weights": "edge_weights"}
_TORCH_IGNORED = ("num_batches_tracked",)


def _torch_keys(info, module: str, leaf: str, config) -> list[str] | str:
    """The reference's key for one of our leaves; a list (one per block) for stacked blocks."""
    names = info.torch_name(module_path(module), config)
    if isinstance(names, str):
        return f"{names}.{_TORCH_LEAF[leaf]}"
    return [f"{n}.{_TORCH_LEAF[leaf]}" for n in names]


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _from_torch_layout(t: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    if t.ndim >= 3 and len(ours) == t.ndim:  # conv (O, I, *kernel) -> (*kernel, I, O)
        return t.transpose(*range(2, t.ndim), 1, 0)
    if len(ours) == 2 and t.ndim == 4 and t.shape[2:] == (1, 1):  # 1x1 conv used as dense
        return t[:, :, 0, 0].T
    if len(ours) == 2 and t.ndim == 2:  # nn.Linear (out, in) -> (in, out)
        return t.T
    if len(ours) <= 1 and t.size == math.prod(ours):  # e.g. timm's WS gain (out, 1, 1, 1)
        return t.reshape(ours)
    return t


def _infer_num_classes(name, tensors, key_fn, classes_axis, overrides) -> int:
    """The checkpoint's head width (0 when it has no head)."""
    module = registry.head_module(name, **overrides)
    if module is None:
        return 0
    key = key_fn(module, "w")
    weight = tensors.get(key if isinstance(key, str) else key[0])
    return 0 if weight is None else int(weight.shape[classes_axis]) // outputs_per_class(
        name, overrides)


def _convert(name, tensors, key_fn, layout_fn, num_classes, overrides, what):
    """Fills our (params, state) from `tensors` (a flat name -> array dict) or raises an error
    that lists every missing, mismatched and unused tensor."""
    params_shape, state_shape = shapes(name, num_classes, **overrides)
    used, missing, mismatched = set(), [], []

    def fetch(key, shape, where):
        if key not in tensors:
            missing.append(f"{key} (for {where})")
            return None
        used.add(key)
        value = layout_fn(tensors[key], shape)
        if value.shape != tuple(shape):
            mismatched.append(f"{key}: {tensors[key].shape} cannot become {tuple(shape)} "
                              f"({where})")
            return None
        return value

    def convert(tree):
        out = {}
        for module, leaves in tree.items():
            out[module] = {}
            for leaf, spec in leaves.items():
                keys, where = key_fn(module, leaf), f"{module}/{leaf}"
                if isinstance(keys, str):
                    value = fetch(keys, spec.shape, where)
                else:  # blocks stacked under hk.layer_stack: one tensor per block
                    values = [fetch(k, spec.shape[1:], where) for k in keys]
                    value = None if any(v is None for v in values) else np.stack(values)
                if value is not None:
                    out[module][leaf] = jnp.asarray(value)
        return out

    params, state = convert(params_shape), convert(state_shape)
    unexpected = sorted(set(tensors) - used)
    if missing or mismatched or unexpected:
        raise ValueError(mismatch_report(
            f"cannot convert this {what} into {name} (num_classes={num_classes}):",
            missing=missing, mismatched=mismatched, unexpected=unexpected))
    return params, state


def from_torch(name: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
               **overrides):
    """Converts a PyTorch state dict of the variant's reference (torchvision / timm) into
    `(params, state)`. `state_dict` maps names to torch tensors or numpy arrays; a
    "module." prefix (DataParallel) is dropped. num_classes defaults to the checkpoint's."""
    info = registry.model_info(name)
    if info.torch_name is None:
        raise ValueError(f"{name} ({info.reference}) has no PyTorch reference to convert from.")
    tensors = {}
    for key, value in state_dict.items():
        if not key.endswith(_TORCH_IGNORED):
            tensors[key.removeprefix("module.")] = _to_numpy(value)
    config = {**info.config, **overrides}
    key_fn = functools.partial(_torch_keys, info, config=config)
    if num_classes is None:
        num_classes = _infer_num_classes(name, tensors, key_fn, 0, overrides)
    return _convert(name, tensors, key_fn, _from_torch_layout, num_classes, overrides,
                    "state dict")


# ----------------------------------------------------------------------------------------------
# Official checkpoints, named by the row's `official_name`: the official NFNet code's Haiku trees
# ("NFNet/~/nf_block_3/~/conv1" etc., HWIO, Haiku's leaf names) and the official EfficientDet
# Keras model's variables ("fpn_cells/cell_0/fnode1/resample_0_2_6/conv2d/kernel", Keras
# layouts, as `tf.train.load_checkpoint` lists them).


def _flatten_official(tree) -> dict[str, np.ndarray]:
    """{module: {leaf: array}} or {"module/leaf": array} -> {"NFNet/nf_block_3/conv1/w": ...},
    without Haiku's "~" scope markers (so either spelling of a name is accepted)."""
    flat = {}
    for key, value in tree.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for leaf, array in items:
            name = f"{key}/{leaf}" if leaf is not None else key
            flat["/".join(p for p in name.split("/") if p != "~")] = _to_numpy(array)
    return flat


def _official_keys(info, module: str, leaf: str, config) -> str | list[str]:
    """The official name(s) of one of our leaves. The row's `official_name` gives either the
    official module name(s) (a Haiku tree: the leaf keeps its name, under the NFNet root; a list
    for blocks stacked under hk.layer_stack) or {our leaf: full variable name(s)} (a Keras
    model: the variable names are the layer's own; a list where one leaf of ours is several
    of theirs, stacked)."""
    names = info.official_name(module_path(module), config)
    if isinstance(names, Mapping):
        if leaf not in names:
            raise ValueError(f"no official name for {module}/{leaf} of {info.name}")
        return names[leaf]
    if isinstance(names, str):
        return f"NFNet/{names}/{leaf}"
    return [f"NFNet/{n}/{leaf}" for n in names]


def _official_items(name: str, trees, overrides):
    """(official name, array) for every leaf of `trees` (our params, state); a leaf with a list
    of names is split along its first axis, one array per name."""
    info = registry.model_info(name)
    config = {**info.config, **overrides}
    for tree in trees:
        for module, leaves in tree.items():
            for leaf, value in leaves.items():
                keys, value = _official_keys(info, module, leaf, config), np.asarray(value)
                if isinstance(keys, str):
                    yield keys, value
                    continue
                if len(keys) != len(value):
                    raise ValueError(f"{module}/{leaf} of {name}: {len(value)} rows for "
                                     f"{len(keys)} official names")
                yield from zip(keys, value)


def _official_info(name: str, family: str, what: str):
    info = registry.model_info(name)
    if info.family != family or info.official_name is None:
        raise ValueError(f"{name} is not an {what} with an official counterpart; the official "
                         f"{what} layout does not apply.")
    return info


def from_nfnet_official(name: str, tree: Mapping[str, Any], num_classes: int | None = None,
                        **overrides):
    """Loads a checkpoint of the official NFNet code (deepmind-research/nfnets: a Haiku params
    tree, nested or flat) into `(params, state)` of an NFNet variant."""
    info = _official_info(name, "nfnet", "NFNet")
    tensors = _flatten_official(tree)
    key_fn = functools.partial(_official_keys, info, config={**info.config, **overrides})
    if num_classes is None:
        num_classes = _infer_num_classes(name, tensors, key_fn, -1, overrides)
    return _convert(name, tensors, key_fn, lambda t, shape: t, num_classes, overrides,
                    "official NFNet checkpoint")


def to_nfnet_official(name: str, params, **overrides) -> dict[str, dict[str, np.ndarray]]:
    """Our NFNet parameters in the official code's layout and Haiku names, for export."""
    _official_info(name, "nfnet", "NFNet")
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, array in _official_items(name, [params], overrides):
        *module, leaf = key.split("/")
        out.setdefault("/~/".join(module), {})[leaf] = array
    return out


# The official EfficientDet checkpoints (google/automl) are TF1 graph checkpoints: besides the
# model's variables they hold their ExponentialMovingAverage copies (of every trainable variable
# and BN moving statistic, `tf.train.ExponentialMovingAverage.average_name`: the variable's name
# + this suffix; the official evaluation loads those), the optimizer's slots and global_step.
EMA_SUFFIX = "/ExponentialMovingAverage"
_TF_TRAINING_ONLY = ("global_step", "beta1_power", "beta2_power")
_TF_SLOT_SUFFIXES = ("/Momentum", "/Adam", "/Adam_1", "/RMSProp", "/RMSProp_1")


def _official_tf_variables(weights: Mapping[str, Any], ema: bool | None):
    """The model's variables (or with `ema` their EMA copies, keeping the suffix) of a flat
    {variable name: array} checkpoint; names may end in ":0". ema=None: the EMA copies where the
    checkpoint has any."""
    names = {key.removesuffix(":0"): value for key, value in weights.items()}
    if any(k.startswith("_CHECKPOINTABLE_OBJECT_GRAPH") or "/.ATTRIBUTES/" in k for k in names):
        raise ValueError(
            "this is an object-based TF2 checkpoint (Keras save_weights), named by object "
            "graph, not by variable: load it into the official Keras model and pass "
            "{v.name: v.numpy() for v in model.weights}")
    has_ema = any(k.endswith(EMA_SUFFIX) for k in names)
    if ema and not has_ema:
        raise ValueError(f"the checkpoint has no {EMA_SUFFIX.lstrip('/')} copies to load "
                         "(ema=False loads its variables)")
    ema = has_ema if ema is None else ema
    return {key: _to_numpy(value) for key, value in names.items()
            if key not in _TF_TRAINING_ONLY and not key.endswith(_TF_SLOT_SUFFIXES)
            and key.endswith(EMA_SUFFIX) == ema}, ema


def _to_keras_layout(key: str, array: np.ndarray) -> np.ndarray:
    """Ours -> the Keras variable's layout: depthwise (k, k, 1, C) -> (k, k, C, 1); a 1x1 conv
    of ours stored as a dense (in, out) matrix (squeeze-excitation) -> Conv2D's (1, 1, in, out)
    (the official EfficientDet has no Dense layer)."""
    if key.endswith("depthwise_kernel") and array.ndim == 4:
        return array.reshape(*array.shape[:2], array.shape[3], array.shape[2])
    if key.endswith("kernel") and array.ndim == 2:
        return array.reshape(1, 1, *array.shape)
    return array


def from_efficientdet_official(name: str, weights: Mapping[str, Any],
                               num_classes: int | None = None, ema: bool | None = None,
                               **overrides):
    """Loads an official google/automl EfficientDet checkpoint into `(params, state)` of an
    efficientdet_d0..d7x variant.

    `weights`: {variable name: array}, e.g. `{n: reader.get_tensor(n) for n in
    reader.get_variable_to_shape_map()}` with `reader = tf.train.load_checkpoint(ckpt)`, or
    `{v.name: v.numpy() for v in keras_model.weights}` (a trailing ":0" is accepted).
    Optimizer slots and global_step are ignored. ema=True reads the ExponentialMovingAverage
    copies (what the official evaluation uses), False the raw variables, None (default) the
    copies when the checkpoint has them. num_classes defaults to the checkpoint's (0 without
    a class net)."""
    info = _official_info(name, "efficientdet", "EfficientDet")
    tensors, ema = _official_tf_variables(weights, ema)
    config = {**info.config, **overrides}

    def key_fn(module, leaf):
        keys = _official_keys(info, module, leaf, config)
        suffix = EMA_SUFFIX if ema else ""
        return keys + suffix if isinstance(keys, str) else [k + suffix for k in keys]

    if num_classes is None:
        num_classes = _infer_num_classes(name, tensors, key_fn, -1, overrides)
    return _convert(name, tensors, key_fn, _from_keras_layout, num_classes, overrides,
                    "official EfficientDet checkpoint" + (" (EMA)" if ema else ""))


def to_efficientdet_official(name: str, params, state, **overrides) -> dict[str, np.ndarray]:
    """Our EfficientDet parameters and BN statistics as {official variable name: array} in the
    Keras layouts (the fusion weights as their per-input scalars), for export or comparison."""
    _official_info(name, "efficientdet", "EfficientDet")
    return {key: _to_keras_layout(key, array)
            for key, array in _official_items(name, [params, state], overrides)}


# ----------------------------------------------------------------------------------------------
# keras.applications: a Keras model, a .keras archive or a legacy .h5 file (model or weights,
# with or without the top: the files keras.applications downloads).

# Keras' per-layer weight order: Conv2D/Dense [kernel, bias], BatchNormalization [gamma, beta,
# moving_mean, moving_variance].
_KERAS_LEAF_INDEX = {"w": 0, "b": 1, "scale": 0, "offset": 1, "mean": 2, "var": 3}
# EfficientNet's in-model input scaling; our models take images already normalised
# (the registry entry's preprocessing), so these layers carry nothing to convert.
_KERAS_INPUT_LAYERS = ("rescaling", "normalization")


# Keras names a layer built without a name after its class with a session-wide counter
# ("conv2d", "conv2d_1", ...; Keras 2 files count from "conv2d_1"), so the numbers depend on what
# was built before (Xception's shortcut convs and BatchNorms, all of InceptionV3's convs and
# BatchNorms are unnamed). Such layers are compared under the names a fresh Keras 3 session
# gives: by rank of their number among the auto-named layers of their class, which is their
# creation order (a functional model lists its layers by graph depth, which in Inception's
# parallel branches is not the order they were built in).
_KERAS_AUTO_NAME = re.compile(
    r"(conv2d|batch_normalization|dense|depthwise_conv2d|separable_conv2d)(_\d+)?")


def _fresh_session_names(layer_names) -> dict[str, str]:
    """{layer name: the name a fresh Keras 3 session would give it} for auto-named layers."""
    numbered: dict[str, list[tuple[int, str]]] = {}
    for name in layer_names:
        match = _KERAS_AUTO_NAME.fullmatch(name.lower())
        if match:
            number = int(match[2][1:]) if match[2] else 0
            numbered.setdefault(match[1], []).append((number, name))
    return {name: kind + (f"_{rank}" if rank else "")
            for kind, layers in numbered.items()
            for rank, (_, name) in enumerate(sorted(layers))}


def keras_layer_key(layer_name: str) -> str:
    """Keras layer names as compared: Keras 2's MobileNetV3 files name "Conv/BatchNorm" and
    "expanded_conv_1/expand" what Keras 3 names "conv_bn" and "expanded_conv_1_expand"."""
    return layer_name.replace("/BatchNorm", "_bn").replace("/", "_").lower()


def _h5_attribute(group, name: str) -> list[str]:
    """An HDF5 string-list attribute, which Keras splits into name0, name1... when large."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _legacy_h5_layers(path) -> dict[str, list[np.ndarray]]:
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading Keras .h5 files needs h5py: pip install h5py") from e
    with h5py.File(path, "r") as f:
        root = f.get("model_weights", f)
        if "layer_names" not in root.attrs and "layer_names0" not in root.attrs:
            raise ValueError(
                f"{path} is not a legacy Keras HDF5 file (no layer_names). A Keras 3 "
                "'.weights.h5' file names its weights by layer class and position, not by "
                "layer name: build the keras.applications model, call model.load_weights(path) "
                "and pass the model instead.")
        layers = {}
        for layer in _h5_attribute(root, "layer_names"):
            group = root[layer]
            names = _h5_attribute(group, "weight_names")
            if names:
                layers[layer] = [np.asarray(group[n], dtype=np.float32) for n in names]
        return layers


def keras_layer_weights(weights) -> dict[str, list[np.ndarray]]:
    """{layer name: its weight arrays in Keras' order} from a Keras model, a `.keras` archive
    (loaded with Keras) or a legacy Keras `.h5` file (read with h5py, no Keras needed)."""
    if hasattr(weights, "layers"):  # a Keras model
        return {layer.name: [np.asarray(w, dtype=np.float32) for w in layer.weights]
                for layer in weights.layers if layer.weights}
    path = os.fspath(weights)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no Keras weights file at {path}")
    if zipfile.is_zipfile(path):  # .keras: config + weights, named only through the model
        try:
            import keras
        except ImportError as e:
            raise ImportError(f"{path} is a .keras archive, which only Keras can read: "
                              "pip install keras") from e
        return keras_layer_weights(keras.saving.load_model(path, compile=False))
    return _legacy_h5_layers(path)


def _from_keras_layout(t: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """Keras kernels are HWIO like ours; depthwise kernels (k, k, C, 1) and 1x1 convs used as
    dense layers (1, 1, in, out) differ from ours only by unit axes."""
    if t.shape != tuple(ours) and [d for d in t.shape if d != 1] == [d for d in ours if d != 1]:
        return t.reshape(ours)
    return t


def from_keras(name: str, weights, num_classes: int | None = None, **overrides):
    """Converts keras.applications weights into `(params, state)` of a Keras-referenced variant
    (`nets.list_models()` entries whose reference starts with "keras:").

    `weights`: a Keras model, or the path of a `.keras` archive or a legacy `.h5` weights file
    (what keras.applications downloads, "notop" files included). num_classes defaults to the
    checkpoint's: 0 when the top is absent. A MobileNetV3 without its top also lacks the
    pre-logits conv; the result is then for `pre_logits=False` (pass it to nets.transformed,
    or use nets.transformed_features).
    """
    info = registry.model_info(name)
    if info.keras_name is None:
        keras_twins = [n for n in registry.list_models(f"*{name}*")
                       if registry.model_info(n).keras_name is not None]
        hint = (f" The Keras port (its own padding and BatchNorm constants) is "
                f"{', '.join(keras_twins)}." if keras_twins else "")
        raise ValueError(f"{name} reproduces {info.reference}, not a keras.applications "
                         f"model.{hint}")
    tensors = {}
    layer_weights = keras_layer_weights(weights)
    renames = _fresh_session_names(layer_weights)
    for layer, arrays in layer_weights.items():
        if keras_layer_key(layer).startswith(_KERAS_INPUT_LAYERS):
            continue
        for i, array in enumerate(arrays):
            tensors[f"{keras_layer_key(renames.get(layer, layer))}/{i}"] = array

    def key_fn(module, leaf, config):
        layer = info.keras_name(module_path(module), config)
        layer, offset = (layer, 0) if isinstance(layer, str) else layer
        return f"{keras_layer_key(layer)}/{offset + _KERAS_LEAF_INDEX[leaf]}"

    config = {**info.config, **overrides}
    if num_classes is None:
        num_classes = _infer_num_classes(
            name, tensors, functools.partial(key_fn, config=config), -1, overrides)
    options = inspect.signature(info.builder).parameters
    if (num_classes == 0 and "pre_logits" in options
            and key_fn("root/pre_logits", "w", config) not in tensors):
        overrides = {**overrides, "pre_logits": False}
        config["pre_logits"] = False
    return _convert(name, tensors, functools.partial(key_fn, config=config), _from_keras_layout,
                    num_classes, overrides, "Keras checkpoint")

