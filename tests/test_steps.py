"""The real train step (training/steps.py) learns, and keeps the EMA it promises: a fixed batch
memorised in a few steps, and the EMA of parameters and BatchNorm statistics recomputed by hand
from the parameters each step returns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import common
from tests.helpers import random_train_state
from training import classification, distributed, optimizers, steps

SIZE, BATCH, CLASSES, STEPS, DECAY = 32, 8, 10, 12, 0.9


def _optimizer_config():
    config = common.base()
    config.optimizer.update(dict(base_lr=0.8, weight_decay=1e-4, schedule="cosine"))
    return config.optimizer


def _schedule():
    return optimizers.learning_rate(_optimizer_config(), BATCH, 10.0 * STEPS, 10)


@pytest.fixture(scope="module")
def fixed_batch_run():
    """resnet18 at 32 px trained STEPS times on one fixed batch of 8 (SGD with momentum, weight
    decay, EMA decay 0.9): (metrics per step, numpy train states before and after each step)."""
    mesh = distributed.data_mesh()
    model = nets.transformed("resnet18", num_classes=CLASSES)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                               is_training=True))
    schedule = _schedule()
    optimizer = optimizers.optimizer(_optimizer_config(), "resnet18", shapes[0], schedule)
    loss = classification.objective(model, dtype=jnp.float32, label_smoothing=0.0)
    step = steps.train_step(loss, optimizer, schedule, ema_decay=DECAY, mesh=mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
             "targets": np.eye(CLASSES, dtype=np.float32)[rng.permutation(CLASSES)[:BATCH]]}
    batch = distributed.global_batch(batch, distributed.batch_sharded(mesh))
    state = random_train_state(model, optimizer, SIZE, ema=True)
    states, metrics = [jax.device_get(state)], []
    for _ in range(STEPS):
        state, m = step(state, batch)   # the step donates `state`: keep host copies
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return metrics, states


def test_a_few_steps_memorise_a_fixed_batch(fixed_batch_run):
    metrics, states = fixed_batch_run
    losses = [float(m["loss"]) for m in metrics]
    assert np.all(np.isfinite(losses))
    # Chance is ln 10 = 2.3; gradient descent drives the loss of one batch far below it.
    assert losses[-1] < 0.25 * losses[0], losses
    assert max(losses[-3:]) < min(losses[:3]), losses
    assert float(metrics[-1]["top1"]) == 1.0
    assert [int(s.step) for s in states] == list(range(STEPS + 1))


def test_step_metrics_are_the_schedule_and_the_parameter_norm(fixed_batch_run):
    metrics, states = fixed_batch_run
    schedule = _schedule()
    for t, m in enumerate(metrics):
        # The lr reported is the schedule at the number of updates applied before the step.
        np.testing.assert_allclose(m["lr"], schedule(t), rtol=1e-5)
        norm = np.sqrt(sum(np.sum(np.square(np.asarray(p, np.float64)))
                           for p in jax.tree.leaves(states[t + 1].params)))
        np.testing.assert_allclose(m["param_norm"], norm, rtol=1e-5)


def _hand_ema(states, field):
    """The TF1-warm-up EMA by hand in float64: e <- d e + (1 - d) p after each update, with
    d = min(0.9, (1 + t) / (10 + t)) at the t updates applied before it, from e = the initial
    values."""
    ema = [np.asarray(v, np.float64) for v in jax.tree.leaves(getattr(states[0], field))]
    for t, after in enumerate(states[1:]):
        d = min(DECAY, (1 + t) / (10 + t))
        ema = [d * e + (1 - d) * np.asarray(p, np.float64)
               for e, p in zip(ema, jax.tree.leaves(getattr(after, field)), strict=True)]
    return ema


@pytest.mark.parametrize("field,ema_field", [("params", "ema_params"),
                                             ("model_state", "ema_model_state")])
def test_the_ema_is_the_hand_computation_after_every_step(fixed_batch_run, field, ema_field):
    _, states = fixed_batch_run
    names = [jax.tree_util.keystr(k)
             for k, _ in jax.tree_util.tree_flatten_with_path(getattr(states[0], field))[0]]
    for k in range(1, STEPS + 1):
        got = jax.tree.leaves(getattr(states[k], ema_field))
        for name, e, g in zip(names, _hand_ema(states[:k + 1], field), got, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6,
                                       err_msg=f"after {k} steps: {name}")
        # The average lags the parameters: it is not simply the latest values.
        latest = jax.tree.leaves(getattr(states[k], field))
        assert any(not np.allclose(g, p) for g, p in zip(got, latest))
