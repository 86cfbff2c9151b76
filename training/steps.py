"""The jitted train and eval steps, sharded over the data mesh."""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import optim
from training import distributed
from training.state import TrainState


def compute_dtype(name: str):
    """"auto": bfloat16 on accelerators, float32 on CPU (where bfloat16 is emulated and slow)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"compute_dtype={name!r}: expected auto, float32, bfloat16 or float16")
    return jnp.dtype(name)


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy against (possibly mixed) target distributions, smoothed after
    mixing as the NFNet code does: y = (1 - s) y + s / C. Computed in float32."""
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def _ema(state: TrainState, params, model_state, decay: float):
    if not decay:
        return state.ema_params, state.ema_model_state
    return (optim.ema_update(state.ema_params, params, state.step, decay),
            optim.ema_update(state.ema_model_state, model_state, state.step, decay))


def objective(model: hk.TransformedWithState, *, dtype, label_smoothing: float,
              teacher=None, frozen_params=None) -> Callable:
    """The training loss as a function of the parameters:
    (params, model_state, rng, batch, teacher_variables) -> (loss, (logits, model_state, terms)).
    With a `training.distill.Teacher`, the loss is `distill.loss` against the teacher's eval-mode
    logits on the same images, `terms` its two parts {"ce", "kl"}; the teacher's variables
    (params, state) pass under stop_gradient, so no gradient reaches them. `frozen_params` (a
    mask, training.transfer.frozen_masks) stops the gradient at frozen leaves, which spares
    their backward pass."""

    def loss_fn(params, model_state, rng, batch, teacher_variables=None):
        if frozen_params is not None:
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                                  frozen_params)
        images = batch["images"].astype(dtype)
        logits, model_state = model.apply(params, model_state, rng, images, is_training=True)
        logits = logits.astype(jnp.float32)
        if teacher is None:
            return cross_entropy(logits, batch["targets"], label_smoothing), (logits, model_state,
                                                                              {})
        from training import distill   # distill builds on cross_entropy above

        teacher_params, teacher_state = jax.lax.stop_gradient(teacher_variables)
        teacher_logits, _ = teacher.model.apply(teacher_params, teacher_state, None, images,
                                                is_training=False)
        ce, kl = distill.terms(logits, teacher_logits, batch["targets"], teacher.temperature,
                               label_smoothing)
        loss = distill.combine(ce, kl, teacher.alpha, teacher.temperature)
        return loss, (logits, model_state, {"ce": ce, "kl": kl})

    return loss_fn


def _keep(mask, old, new):
    """`new` with the leaves where `mask` is True taken from `old`."""
    if mask is None or old is None:
        return new
    return jax.tree.map(lambda f, o, n: o if f else n, mask, old, new)


def train_step(model: hk.TransformedWithState, optimizer: optax.GradientTransformation,
               schedule: Callable, *, dtype, label_smoothing: float, ema_decay: float,
               mesh, frozen=None, teacher=None) -> Callable:
    """(state, batch) -> (state, metrics); the state is donated. The step's randomness
    (dropout, stochastic depth) is fold_in(rng, step) over the global batch, so it does not
    depend on how many devices share the batch.

    frozen: (params mask, state mask) from training.transfer.frozen_masks, or None; the
    optimizer must zero the frozen updates (training.optimizers.optimizer(frozen=...)); the
    step keeps the frozen BatchNorm statistics and EMA leaves as they were.
    teacher: a training.distill.Teacher; the step is then (state, batch, teacher_variables),
    the teacher's (params, state) replicated and not donated."""
    frozen_params, frozen_state = frozen if frozen is not None else (None, None)
    loss_fn = objective(model, dtype=dtype, label_smoothing=label_smoothing, teacher=teacher,
                        frozen_params=frozen_params)

    def step(state: TrainState, batch, teacher_variables=None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, (logits, model_state, terms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params, state.model_state, rng, batch,
                                   teacher_variables)
        model_state = _keep(frozen_state, state.model_state, model_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params, ema_model_state = _ema(state, params, model_state, ema_decay)
        # d * e + (1 - d) * p rounds even where e == p: a frozen leaf's EMA is kept exactly.
        ema_params = _keep(frozen_params, state.ema_params, ema_params)
        ema_model_state = _keep(frozen_state, state.ema_model_state, ema_model_state)
        metrics = {
            "loss": loss,
            "top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["targets"], -1)),
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            **terms,
        }
        new_state = TrainState(state.step + 1, state.rng, params, model_state, opt_state,
                               ema_params, ema_model_state)
        return new_state, metrics

    replicated = distributed.replicated(mesh)
    in_shardings = (replicated, distributed.batch_sharded(mesh))
    if teacher is not None:
        in_shardings += (replicated,)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(replicated, replicated),
                   donate_argnums=0)


def eval_step(model: hk.TransformedWithState, mesh) -> Callable:
    """(params, model_state, batch) -> sums over the unmasked examples of the global batch:
    top-1 and top-5 correct, un-smoothed cross-entropy, count. Runs in float32."""

    def step(params, model_state, batch):
        logits, _ = model.apply(params, model_state, None, batch["images"], is_training=False)
        logits = logits.astype(jnp.float32)
        labels, mask = batch["labels"], batch["mask"].astype(jnp.float32)
        k = min(5, logits.shape[-1])
        top_k = jax.lax.top_k(logits, k)[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "top1": jnp.sum((top_k[:, 0] == labels) * mask),
            "top5": jnp.sum(jnp.any(top_k == labels[:, None], -1) * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    replicated = distributed.replicated(mesh)
    return jax.jit(step, in_shardings=(replicated, replicated, distributed.batch_sharded(mesh)),
                   out_shardings=replicated)
