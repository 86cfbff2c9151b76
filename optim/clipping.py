"""Gradient clipping by norm, per tensor and global (the official EfficientDet trainer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
    """Every gradient tensor scaled to norm <= max_norm on its own (tf.clip_by_norm)."""

    def clip(g):
        norm = jnp.sqrt(jnp.sum(jnp.square(g)))
        return g * (max_norm / jnp.maximum(norm, max_norm))

    return optax.stateless(lambda updates, params=None: jax.tree.map(clip, updates))


def clip_each_then_global(max_norm: float) -> optax.GradientTransformation:
    """Each tensor clipped to `max_norm`, then the whole set to global norm `max_norm`: the
    official EfficientDet's `clip_gradients_norm` (tf2/train_lib.py)."""
    return optax.chain(clip_each_by_norm(max_norm), optax.clip_by_global_norm(max_norm))
