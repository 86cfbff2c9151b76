"""Learning-rate schedules."""

from __future__ import annotations

import jax.numpy as jnp


def scaled_learning_rate(base: float, batch_size: int, base_batch: int = 256) -> float:
    """The linear scaling rule: base * batch / 256 (e.g. NFNets: 0.1 * 4096 / 256 = 1.6)."""
    return base * batch_size / base_batch


def warmup_cosine(peak: float, warmup_steps: float, total_steps: int, end: float = 0.0):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `end` at
    `total_steps` (§11 of the NFNet spec). `warmup_steps` may be fractional (5 epochs of
    1,281,167 images at batch 4096 is 1563.92 steps), which optax's warmup_cosine_decay_schedule
    does not take; the step t counts the updates already applied."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((t - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cosine = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * progress))
        if warmup_steps <= 0:
            return cosine
        return jnp.where(t <= warmup_steps, peak * t / warmup_steps, cosine)

    return schedule


def warmup_cosine_global_step(peak: float, warmup_steps: float, total_steps: int,
                              warmup_init: float = 0.0):
    """The official EfficientDet schedule (automl's CosineLrSchedule): a linear warm-up from
    `warmup_init` to `peak` over `warmup_steps`, then 0.5 * peak * (1 + cos(pi * t / (T - W)))
    with t the global step, not t - W: the cosine starts a little below the peak and reaches 0
    at t = T - W; the last W steps climb back up its far side, as the official code does."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        cosine = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * t / (total_steps - warmup_steps)))
        if warmup_steps <= 0:
            return cosine
        warmup = warmup_init + t / warmup_steps * (peak - warmup_init)
        return jnp.where(t < warmup_steps, warmup, cosine)

    return schedule


def warmup_step_decay(peak: float, warmup_steps: float, boundaries, factor: float = 0.1):
    """Linear warm-up from 0 to `peak` over `warmup_steps` (none if 0), then `peak` multiplied
    by `factor` at each step in `boundaries` (the ResNet recipe: x0.1 at epochs 30, 60, 80)."""
    boundaries = jnp.asarray(sorted(boundaries), jnp.float32)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        decayed = peak * factor ** jnp.sum(t >= boundaries).astype(jnp.float32)
        if warmup_steps <= 0:
            return decayed
        return jnp.where(t < warmup_steps, peak * t / warmup_steps, decayed)

    return schedule


def warmup_exponential_decay(peak: float, warmup_steps: float, decay_steps: float,
                             rate: float, staircase: bool = True):
    """The official EfficientNet/MobileNet TF schedule: `peak * rate ** (t / decay_steps)`
    (the exponent floored when `staircase`), counted from step 0, replaced by the linear warm-up
    `peak * t / warmup_steps` while t < warmup_steps (e.g. 0.97 every 2.4 epochs, 5 warm-up
    epochs; torchvision's MobileNetV2 recipe: 0.98 every epoch, no warm-up)."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        exponent = t / decay_steps
        decayed = peak * rate ** (jnp.floor(exponent) if staircase else exponent)
        if warmup_steps <= 0:
            return decayed
        return jnp.where(t < warmup_steps, peak * t / warmup_steps, decayed)

    return schedule
