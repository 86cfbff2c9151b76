"""Exponential moving average of parameters with TF1's warm-up (the NFNet code's "tf1_ema")."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_decay(step, decay: float):
    """min(decay, (1 + t) / (10 + t)): short horizons early, `decay` once t is large."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(ema, params, step, decay: float = 0.99999):
    """The average after an optimiser step; `step` counts the updates applied before it.
    Start from a copy of the initial parameters."""
    d = ema_decay(step, decay)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
