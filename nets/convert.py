"""Converting reference weights into our parameters and model state.

Conversion is driven by our own parameter tree: every leaf of the model (found with
`jax.eval_shape`, nothing is computed) is looked up under the reference's name, its layout is
changed (PyTorch OIHW -> HWIO, (out, in) -> (in, out)) and its shape checked. Every one of our
leaves must be found and every reference tensor used; otherwise the error lists what is missing,
unexpected or mismatched.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import nets

# Our leaf names -> PyTorch's parameter and buffer names.
_TORCH_LEAF = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias",
               "mean": "running_mean", "var": "running_var"}
_TORCH_IGNORED = ("num_batches_tracked",)


def example_images(name: str, batch: int = 1, size: int | None = None, **overrides):
    """A `jax.ShapeDtypeStruct` for the variant's input (for eval_shape, init or tracing)."""
    info = nets.model_info(name)
    size = size or info.train_size
    channels = overrides.get("in_channels", info.config.get("in_channels", 3))
    return jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)


def shapes(name: str, num_classes: int = 1000, **overrides):
    """(params, state) of the variant as trees of ShapeDtypeStructs, without computing."""
    f = nets.transformed(name, num_classes, **overrides)
    init = functools.partial(f.init, is_training=True)
    return jax.eval_shape(init, jax.random.key(0), example_images(name, **overrides))


def count_params(name: str, num_classes: int = 1000, **overrides) -> int:
    """Trainable parameters of the variant, counted without computing anything."""
    params, _ = shapes(name, num_classes, **overrides)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _torch_key(info, module_path: str, leaf: str, config) -> str:
    # Haiku paths look like "resnet/~/layer1_0/conv1"; "~" marks method scopes.
    dotted = ".".join(p for p in module_path.split("/")[1:] if not p.startswith("~"))
    return f"{info.torch_name(dotted, config)}.{_TORCH_LEAF[leaf]}"


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
    return t


def _infer_num_classes(name, info, tensors, overrides) -> int:
    config = {**info.config, **overrides}
    with_head, _ = shapes(name, 1, **overrides)
    without, _ = shapes(name, 0, **overrides)
    for module, leaves in with_head.items():
        if module not in without and "w" in leaves:
            weight = tensors.get(_torch_key(info, module, "w", config))
            return 0 if weight is None else int(weight.shape[0])
    return 0


def from_torch(name: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
               **overrides):
    """Converts a PyTorch state dict of the variant's reference (torchvision / timm) into
    `(params, state)`. `state_dict` maps names to torch tensors or numpy arrays; a
    "module." prefix (DataParallel) is dropped. num_classes defaults to the checkpoint's."""
    info = nets.model_info(name)
    if info.torch_name is None:
        raise ValueError(f"{name} ({info.reference}) has no PyTorch reference to convert from.")
    tensors = {}
    for key, value in state_dict.items():
        if not key.endswith(_TORCH_IGNORED):
            tensors[key.removeprefix("module.")] = _to_numpy(value)
    if num_classes is None:
        num_classes = _infer_num_classes(name, info, tensors, overrides)
    config = {**info.config, **overrides}
    params_shape, state_shape = shapes(name, num_classes, **overrides)

    used, missing, mismatched = set(), [], []

    def convert(tree):
        out = {}
        for module, leaves in tree.items():
            out[module] = {}
            for leaf, spec in leaves.items():
                key = _torch_key(info, module, leaf, config)
                if key not in tensors:
                    missing.append(f"{key} (for {module}/{leaf})")
                    continue
                used.add(key)
                value = _from_torch_layout(tensors[key], spec.shape)
                if value.shape != spec.shape:
                    mismatched.append(f"{key}: {tensors[key].shape} cannot become {spec.shape} "
                                      f"({module}/{leaf})")
                    continue
                out[module][leaf] = jnp.asarray(value)
        return out

    params, state = convert(params_shape), convert(state_shape)
    unexpected = sorted(set(tensors) - used)
    if missing or mismatched or unexpected:
        lines = [f"cannot convert this state dict into {name} (num_classes={num_classes}):"]
        for title, items in (("missing", missing), ("shape mismatch", mismatched),
                             ("unexpected", unexpected)):
            if items:
                shown = "; ".join(items[:10]) + (f"; ... {len(items) - 10} more"
                                                 if len(items) > 10 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise ValueError("\n".join(lines))
    return params, state
