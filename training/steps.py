"""The jitted train and eval steps, sharded over the data mesh. Task-free: a task module
(`training.tasks`) supplies the loss and the eval sums; this module differentiates, updates,
keeps the EMA and shards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import optim
from training import distributed
from training.state import TrainState


class Objective(NamedTuple):
    """What a task trains: `loss(params, model_state, rng, batch, extra)` returns
    `(loss, (model_state, metrics))`, `metrics` a dict of scalars the task reports (e.g.
    accuracy). `extra` is a pytree every step receives replicated and never donates nor updates
    (the weights of a second, fixed model, as distillation has), or None; `notes` are lines the
    run prints once. `prepare`: batch -> batch, applied in the step before the loss (the input
    work the data pipeline leaves to the accelerator, data.augment_on_device), or None.
    `update_state`: (params, model_state, step, total_steps) -> model_state, applied at the
    start of each step before the loss (model state that follows the step count, as
    CondenseNet's condensation masks), or None."""

    loss: Callable
    extra: Any = None
    notes: tuple[str, ...] = ()
    prepare: Callable | None = None
    update_state: Callable | None = None


def compute_dtype(name: str):
    """"auto": bfloat16 on accelerators, float32 on CPU (where bfloat16 is emulated and slow)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"compute_dtype={name!r}: expected auto, float32, bfloat16 or float16")
    return jnp.dtype(name)


def _ema(state: TrainState, params, model_state, decay: float):
    if not decay:
        return state.ema_params, state.ema_model_state
    return (optim.ema_update(state.ema_params, params, state.step, decay),
            optim.ema_update(state.ema_model_state, model_state, state.step, decay))


def _keep(mask, old, new):
    """`new` with the leaves where `mask` is True taken from `old`."""
    if mask is None or old is None:
        return new
    return jax.tree.map(lambda f, o, n: o if f else n, mask, old, new)


def train_step(loss: Callable, optimizer: optax.GradientTransformation, schedule: Callable, *,
               ema_decay: float, mesh, frozen=None, extra: bool = False,
               prepare: Callable | None = None,
               update_state: Callable | None = None) -> Callable:
    """(state, batch[, extra]) -> (state, metrics); the state is donated. `loss` is an
    `Objective.loss`; metrics are its own plus loss, lr, grad_norm and param_norm. The step's
    randomness (dropout, stochastic depth) is fold_in(rng, step) over the global batch, so it
    does not depend on how many devices share the batch.

    frozen: (params mask, state mask) from training.transfer.frozen_masks, or None; the
    gradient stops at frozen parameters (sparing their backward pass), the optimizer must zero
    their updates (training.optimizers.optimizer(frozen=...)), and the step keeps the frozen
    BatchNorm statistics and EMA leaves as they were.
    extra=True: the step takes the objective's `extra` as a third argument, replicated and not
    donated. prepare: an `Objective.prepare`, or None. update_state: (params, model_state,
    step) -> model_state (an `Objective.update_state` with the run's total steps bound), or
    None."""
    frozen_params, frozen_state = frozen if frozen is not None else (None, None)

    def loss_of_params(params, model_state, rng, batch, extra_inputs):
        if frozen_params is not None:
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                                  frozen_params)
        return loss(params, model_state, rng, batch, extra_inputs)

    def step(state: TrainState, batch, extra_inputs=None):
        if prepare is not None:
            batch = prepare(batch)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        model_state = state.model_state
        if update_state is not None:
            model_state = update_state(state.params, model_state, state.step)
        (value, (model_state, task_metrics)), grads = jax.value_and_grad(
            loss_of_params, has_aux=True)(state.params, model_state, rng, batch, extra_inputs)
        model_state = _keep(frozen_state, state.model_state, model_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params, ema_model_state = _ema(state, params, model_state, ema_decay)
        # d * e + (1 - d) * p rounds even where e == p: a frozen leaf's EMA is kept exactly.
        ema_params = _keep(frozen_params, state.ema_params, ema_params)
        ema_model_state = _keep(frozen_state, state.ema_model_state, ema_model_state)
        metrics = {
            "loss": value,
            **task_metrics,
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        new_state = TrainState(state.step + 1, state.rng, params, model_state, opt_state,
                               ema_params, ema_model_state)
        return new_state, metrics

    replicated = distributed.replicated(mesh)
    in_shardings = (replicated, distributed.batch_sharded(mesh))
    if extra:
        in_shardings += (replicated,)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(replicated, replicated),
                   donate_argnums=0)


def eval_step(sums: Callable, mesh) -> Callable:
    """`sums(params, model_state, batch)` (a task's eval sums over the unmasked examples of
    the global batch) jitted with the batch sharded and the result replicated."""
    replicated = distributed.replicated(mesh)
    return jax.jit(sums, in_shardings=(replicated, replicated, distributed.batch_sharded(mesh)),
                   out_shardings=replicated)
