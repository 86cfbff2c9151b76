"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=4: two train steps on one device
and on four, from the same state and the same global batches; prints the largest differences
as JSON."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import nets
from experiments import common
from training import classification, distributed, loop, optimizers, steps
from jax.sharding import Mesh

assert jax.device_count() == 4, jax.devices()
config = common.base()
config.model = "resnet18"
config.model_kwargs = ml_collections.ConfigDict({"stochastic_depth_rate": 0.2})
config.data.num_classes, config.data.train_size = 10, 32
config.ema_decay = 0.99
config.optimizer.update(dict(name="sgd_agc", nesterov=True, base_lr=0.5, warmup_epochs=0.0))
model = nets.transformed(config.model, num_classes=10, **config.model_kwargs.to_dict())
schedule = optimizers.learning_rate(config.optimizer, 16, 10.0, 100)
rng = np.random.default_rng(0)
batches = [{"images": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
            "targets": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]} for _ in range(2)]


def train(devices):
    mesh = Mesh(np.asarray(devices), (distributed.DATA_AXIS,))
    state, optimizer = loop.init_state(
        config, model, lambda p: optimizers.optimizer(config.optimizer, config.model, p,
                                                      schedule), mesh)
    loss = classification.objective(model, dtype=jnp.float32, label_smoothing=0.1)
    step = steps.train_step(loss, optimizer, schedule, ema_decay=config.ema_decay, mesh=mesh)
    for batch in batches:
        sharded = distributed.global_batch(batch, distributed.batch_sharded(mesh))
        state, metrics = step(state, sharded)
    assert len(state.params["resnet/fc"]["w"].sharding.device_set) == len(devices)
    return jax.device_get(state), jax.device_get(metrics)


one, one_metrics = train(jax.devices()[:1])
four, four_metrics = train(jax.devices())
diff = lambda a, b: max(float(np.max(np.abs(x - y), initial=0.0))
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
print(json.dumps({
    "params": diff(one.params, four.params),
    "model_state": diff(one.model_state, four.model_state),
    "ema_params": diff(one.ema_params, four.ema_params),
    "loss": abs(float(one_metrics["loss"]) - float(four_metrics["loss"])),
    "param_change": diff(one.params, jax.device_get(loop.init_state(
        config, model, lambda p: optimizers.optimizer(config.optimizer, config.model, p,
                                                      schedule),
        Mesh(np.asarray(jax.devices()[:1]), ("data",)))[0].params)),
}))
