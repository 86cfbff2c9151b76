"""What a registered variant looks like, found without computing anything: its example input,
its parameter and state trees as `jax.ShapeDtypeStruct`s (`jax.eval_shape`), its parameter
count, the head width of a params tree; and the one message format for names that do not fit
(used by `convert`, `weights` and training's transfer).

    params, state = nets.introspect.shapes("resnet50", num_classes=10)
    nets.introspect.count_params("nfnet_f0")

Imports the registry (`nets.registry`) and nothing above it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nets import registry


def example_images(name: str, batch: int = 1, size: int | None = None, **overrides):
    """A `jax.ShapeDtypeStruct` for the variant's input (for eval_shape, init or tracing):
    `size` px (default its train size), at least its `min_input_size`."""
    info = registry.model_info(name)
    size = max(size or info.train_size, info.min_input_size)
    channels = overrides.get("in_channels", info.config.get("in_channels", 3))
    frames = (info.num_frames,) if info.num_frames else ()  # video: [B, T, H, W, C]
    return jax.ShapeDtypeStruct((batch, *frames, size, size, channels), jnp.float32)


def shapes(name: str, num_classes: int | None = None, **overrides):
    """(params, state) of the variant as trees of ShapeDtypeStructs, without computing.
    `fused=True` (among the overrides): those of its inference form (`nets.fusion`)."""
    f = registry.transformed(name, num_classes, shapes_only=True, **overrides)
    init = functools.partial(f.init, is_training=not overrides.get("fused", False))
    return jax.eval_shape(init, jax.random.key(0), example_images(name, **overrides))


def count_params(name: str, num_classes: int | None = None, **overrides) -> int:
    """Trainable parameters of the variant, counted without computing anything."""
    params, _ = shapes(name, num_classes, **overrides)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def outputs_per_class(name: str, overrides=None) -> int:
    """How many head outputs each class has: 1, or a detector's anchors (point slots) per
    location (its class head predicts num_anchors x num_classes channels)."""
    config = {**registry.model_info(name).config, **(overrides or {})}
    return int(config.get("points_per_cell") or config.get("num_anchors", 1))


def num_classes_of(name: str, params, overrides=None) -> int:
    """The number of classes of the head in `params` (0 without one)."""
    head = registry.head_module(name, **(overrides or {}))
    weight = params.get(head, {}).get("w") if head is not None else None
    return 0 if weight is None else int(np.shape(weight)[-1]) // outputs_per_class(name,
                                                                                   overrides)


def mismatch_report(header: str, *, missing=(), mismatched=(), unexpected=()) -> str:
    """One message for names that do not fit: the header, then per kind its count and first 10
    (a whole list can be thousands of names, which hides the few that matter)."""
    lines = [header]
    for title, items in (("missing", missing), ("shape mismatch", mismatched),
                         ("unexpected", unexpected)):
        if items:
            shown = "; ".join(items[:10]) + (f"; ... {len(items) - 10} more"
                                             if len(items) > 10 else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    return "\n".join(lines)
