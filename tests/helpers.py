"""Shared test utilities: counting leaves and jitted applies shared across tests."""

import functools

import jax
import numpy as np

import nets


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@functools.cache
def jitted_apply(name: str, num_classes: int = 1000, features: bool = False, **overrides):
    """One compiled apply per (model, options), shared by every test that needs it."""
    if features:
        f = nets.transformed_features(name, **overrides)
    else:
        f = nets.transformed(name, num_classes, **overrides)
    return jax.jit(f.apply, static_argnames="is_training")


def random_images(batch=2, size=64, channels=3, seed=0):
    return np.random.RandomState(seed).randn(batch, size, size, channels).astype(np.float32)
