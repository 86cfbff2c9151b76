"""The training loop: build everything from the config, resume from the workdir's newest
checkpoint, train, checkpoint, evaluate, stop cleanly on SIGTERM and on a non-finite loss."""

from __future__ import annotations

import functools
import math
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections

import data
import nets
from training import checkpoint, distill, distributed, metrics, optimizers, steps, transfer
from training.state import TrainState


class NonFiniteLossError(RuntimeError):
    pass


class _Preemption:
    """SIGTERM (what schedulers send before they preempt) asks the loop to checkpoint and exit."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class ConfigError(ValueError):
    pass


def _field(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _validate(config: ml_collections.ConfigDict, mesh) -> None:
    try:
        info = nets.model_info(config.model)   # an unknown name lists close ones
        nets.check_overrides(info, config.model_kwargs.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None
    for field, what in config.required:
        if not _field(config, field):
            raise ConfigError(f"config.{field} is empty, and this experiment needs it: pass "
                              f"--config.{field}=PATH with {what}")
    if config.distill.teacher and not config.distill.teacher_from:
        raise ConfigError(f"config.distill.teacher={config.distill.teacher!r} needs its weights: "
                          "pass --config.distill.teacher_from=PATH (a nets.weights .safetensors "
                          "file or a training workdir)")
    try:
        distill.check_weights(config.distill.alpha, config.distill.temperature)
    except ValueError as e:
        raise ConfigError(f"config.distill: {e}") from None
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % mesh.size:
            raise ConfigError(f"config.{field}={config[field]} must be a multiple of the "
                              f"{mesh.size} devices the batch is sharded over")


def _model_init(config, model):
    size = config.data.train_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return lambda key: model.init(key, images, is_training=True)


def init_state(config, model, optimizer_fn, mesh, prepare=None) -> tuple[TrainState, object]:
    """The initial state, built under jit straight into its replicated sharding. `prepare`
    ((params, model_state) -> (params, model_state)) replaces the fresh init before the optimizer
    state and the EMA are built from it (e.g. with weights loaded for fine-tuning)."""
    key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(key)
    replicated = distributed.replicated(mesh)
    params, model_state = jax.jit(_model_init(config, model), out_shardings=replicated)(
        init_key)
    if prepare is not None:
        params, model_state = jax.device_put(prepare(params, model_state), replicated)
    optimizer = optimizer_fn(params)
    ema = config.ema_decay > 0

    def build(params, model_state):
        return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(step_key),
                          params=params, model_state=model_state,
                          opt_state=optimizer.init(params),
                          ema_params=params if ema else None,
                          ema_model_state=model_state if ema else None)

    state = jax.jit(build, out_shardings=distributed.replicated(mesh))(params, model_state)
    return state, optimizer


def _load_init_from(config, params_shapes, state_shapes):
    """(description, transfer.Loaded) of config.init_from merged over the model's shapes: the
    leaves loaded as arrays, the fresh ones as ShapeDtypeStructs for `_over_fresh` to fill."""
    try:
        source = transfer.read_source(config.init_from, ema=config.init_from_ema)
        head = nets.convert.head_module(config.model, **config.model_kwargs.to_dict())
        loaded = transfer.merge(params_shapes, state_shapes, source, head=head,
                                reset_head=config.reset_head)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
    return source.description, loaded


def _over_fresh(loaded, params, model_state):
    """The loaded leaves over the fresh init (init_state's `prepare`)."""
    take = lambda merged, fresh: fresh if isinstance(merged, jax.ShapeDtypeStruct) else merged
    return (jax.tree.map(take, loaded.params, params),
            jax.tree.map(take, loaded.state, model_state))


def evaluate(config, eval_fn, state: TrainState, mesh) -> dict[str, dict]:
    """Top-1, top-5 and cross-entropy over the whole eval split, for the params and (when kept)
    their EMA."""
    variants = {"eval": (state.params, state.model_state)}
    if state.ema_params is not None:
        variants["eval_ema"] = (state.ema_params, state.ema_model_state)
    sums = {name: None for name in variants}
    sharding = distributed.batch_sharded(mesh)
    for local in data.eval_batches(config.data, global_batch=config.eval_batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()):
        batch = distributed.global_batch(local, sharding)
        for name, (params, model_state) in variants.items():
            out = eval_fn(params, model_state, batch)
            sums[name] = out if sums[name] is None else jax.tree.map(jnp.add, sums[name], out)
    results = {}
    for name, total in jax.device_get(sums).items():
        count = float(total["count"])
        results[name] = {"top1": float(total["top1"]) / count, "top5": float(total["top5"]) / count,
                         "loss": float(total["loss"]) / count, "count": count}
    return results


def _check_finite(step_metrics: dict, step: int, ckpt: checkpoint.Checkpoints) -> None:
    loss, param_norm = float(step_metrics["loss"]), float(step_metrics["param_norm"])
    if math.isfinite(loss) and math.isfinite(param_norm):
        return
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint (step {last}) stays in {ckpt.directory}" if last
            else "no checkpoint was written yet")
    what = f"loss {loss}" if not math.isfinite(loss) else f"parameter norm {param_norm}"
    raise NonFiniteLossError(
        f"{what} at step {step}: training stopped; {kept}. Lower the learning rate "
        "(config.optimizer.base_lr) or check the input data.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains to the end of the schedule (or until SIGTERM) and returns the final evaluation
    ({"eval": {...}, "eval_ema": {...}}; empty when preempted)."""
    mesh = distributed.data_mesh()
    _validate(config, mesh)
    dtype = steps.compute_dtype(config.compute_dtype)
    model = nets.transformed(config.model, num_classes=config.data.num_classes,
                             **config.model_kwargs.to_dict())
    # Shapes only (nothing compiled): the checkpoint signature, the freeze masks and the checks
    # of init_from.
    shapes = jax.eval_shape(_model_init(config, model), jax.random.key(0))
    frozen = None
    if config.freeze:
        try:
            frozen = transfer.frozen_masks(config.freeze, *shapes)
        except ValueError as e:
            raise ConfigError(f"config.freeze: {e}") from None
    teacher = None
    if config.distill.teacher_from:
        try:
            teacher, teacher_variables = distill.load_teacher(config.distill,
                                                              config.data.num_classes)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config.distill.teacher_from={config.distill.teacher_from!r}: "
                              f"{e}") from None
        teacher_variables = jax.device_put(teacher_variables, distributed.replicated(mesh))
    train_data = data.train_iterator(config.data, global_batch=config.batch_size,
                                     seed=config.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    ckpt = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
                                  checkpoint.model_signature(config, shapes[0]),
                                  config.to_json())
    start = ckpt.latest_step() or 0
    loaded = None
    if config.init_from and not start:   # resuming always wins over init_from
        try:
            loaded = _load_init_from(config, *shapes)
        except ConfigError:
            train_data.close()
            ckpt.close()
            raise
    steps_per_epoch = train_data.num_examples / config.batch_size
    total_steps = config.num_steps or max(1, round(config.num_epochs * steps_per_epoch))
    schedule = optimizers.learning_rate(config.optimizer, config.batch_size, steps_per_epoch,
                                        total_steps)
    report = metrics.Reporter(workdir, total_steps, steps_per_epoch, config.batch_size)
    if loaded is not None:
        report.print(f"init_from {loaded[0]}: {loaded[1].summary()}")
    state, optimizer = init_state(
        config, model, lambda p: optimizers.optimizer(config.optimizer, config.model, p, schedule,
                                                      frozen=frozen[0] if frozen else None),
        mesh, prepare=None if loaded is None else functools.partial(_over_fresh, loaded[1]))

    if start:
        state, data_state = ckpt.restore(start, state)
        train_data.set_state(data_state)
        report.print(f"resumed from the checkpoint at step {start} in {ckpt.directory}"
                     + (" (config.init_from is for fresh runs only)" if config.init_from else ""))
    if frozen is not None:
        sizes = [(x.size, f) for x, f in zip(jax.tree.leaves(shapes[0]),
                                             jax.tree.leaves(frozen[0]), strict=True)]
        n_frozen = sum(size for size, f in sizes if f)
        report.print(f"freeze {tuple(config.freeze)}: {n_frozen:,} parameters frozen (and "
                     f"their BN statistics), {sum(s for s, _ in sizes) - n_frozen:,} trainable")
    if teacher is not None:
        report.print(f"distilling from {teacher.description} (eval mode): loss = "
                     f"{teacher.alpha} * CE + {1 - teacher.alpha:g} * {teacher.temperature}^2 * "
                     "KL; train/ce and train/kl in metrics.jsonl")
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    report.print(
        f"training {config.model} ({n_params:,} parameters) on {config.data.name} for "
        f"{total_steps} steps of {config.batch_size} images "
        f"({total_steps / steps_per_epoch:.1f} epochs) over {mesh.size} {jax.default_backend()} "
        f"device(s) in {jax.process_count()} process(es), "
        f"computing in {jnp.dtype(dtype).name}")

    train_fn = steps.train_step(model, optimizer, schedule, dtype=dtype,
                                label_smoothing=config.label_smoothing,
                                ema_decay=config.ema_decay, mesh=mesh, frozen=frozen,
                                teacher=teacher)
    teacher_args = (teacher_variables,) if teacher is not None else ()
    eval_fn = steps.eval_step(model, mesh)
    sharding = distributed.batch_sharded(mesh)
    preemption = _Preemption()
    history, previous = [], None
    report.start(start)
    try:
        for step in range(start + 1, total_steps + 1):
            batch = distributed.global_batch(next(train_data), sharding)
            state, step_metrics = train_fn(state, batch, *teacher_args)
            history.append(step_metrics)
            if previous is not None:   # one step behind, so the host never stalls the devices
                _check_finite(previous, step - 1, ckpt)
            previous = step_metrics
            last = step == total_steps
            if step % config.log_every == 0 or last:
                _check_finite(step_metrics, step, ckpt)
                report.train(step, history)
                history = []
            stop = distributed.any_process(preemption.requested)
            if stop or last or step % config.checkpoint_every == 0:
                _check_finite(step_metrics, step, ckpt)
                ckpt.save(step, state, train_data.get_state())
            if stop:
                ckpt.wait()
                report.print(f"SIGTERM: saved the checkpoint at step {step} in "
                             f"{ckpt.directory}; run the same command to resume")
                return {}
            if config.eval_every and step % config.eval_every == 0 and not last:
                report.eval(step, evaluate(config, eval_fn, state, mesh))
        results = evaluate(config, eval_fn, state, mesh)
        report.eval(total_steps, results)
        return results
    finally:
        preemption.restore()
        train_data.close()
        ckpt.wait()
        ckpt.close()
        report.close()
