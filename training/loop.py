"""The training loop: build everything from the config, resume from the workdir's newest
checkpoint, train, checkpoint, evaluate, stop cleanly on SIGTERM and on a non-finite loss.
Task-free: what the model predicts, how it is scored and reported, is the task's
(`config.task`, training/tasks.py)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

import nets
from training import (checkpoint, config_checks, distributed, metrics, optimizers, resume,
                      steps, tasks, transfer, weight_sources)
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


def _validate(config: ml_collections.ConfigDict, mesh) -> tasks.Task:
    """The run's task, once the config's fields it and the loop read are checked: a ConfigError
    with one line per problem, all of them, before anything is built."""
    found, task = [], None
    try:
        task = tasks.get(config.task)
    except ValueError as e:
        found.append(f"config.task: {e}")
    try:
        info = nets.model_info(config.model)   # an unknown name lists close ones
        nets.check_overrides(info, config.model_kwargs.to_dict())
    except (ValueError, TypeError) as e:
        found.append(f"config.model: {e}")
    for field, what in config.required:
        if not _field(config, field):
            found.append(f"config.{field} is empty, and this experiment needs it: pass "
                         f"--config.{field}=PATH with {what}")
    if task is not None:
        try:
            task.validate(config)
        except ValueError as e:
            found.append(str(e))
    found += config_checks.problems(config, mesh.size)
    if not found:   # only then open the train split (no image is read) for its size
        size = config_checks.train_split_size(config, task)
        found = [] if size is None else config_checks.train_split_problems(config, size)
    if found:
        raise ConfigError("\n".join(found))
    return task


class Variables(NamedTuple):
    params: Any
    state: Any


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


class InitFrom(NamedTuple):
    description: str
    loaded: transfer.Loaded


def _load_init_from(config, shapes: Variables) -> InitFrom:
    """config.init_from merged over the model's shapes: the leaves loaded as arrays, the fresh
    ones as ShapeDtypeStructs for `_over_fresh` to fill."""
    try:
        # A PyTorch state dict is read as the reference of this run's model.
        source = weight_sources.read(config.init_from, model=config.model,
                                     ema=config.init_from_ema)
        backbone = nets.model_info(config.model).backbone
        if source.model != config.model and source.model == backbone:
            source = transfer.as_backbone(source, shapes.params, shapes.state)
        elif source.model != config.model and not config.init_from_any_model:
            raise ValueError(
                f"it holds {source.model} weights and this run builds {config.model}"
                f"{f' (whose backbone is {backbone})' if backbone else ''}; set "
                "config.init_from_any_model=True to load the arrays that fit by name and shape")
        head = nets.head_module(config.model, **config.model_kwargs.to_dict())
        loaded = transfer.merge(shapes.params, shapes.state, source, head=head,
                                reset_head=config.reset_head)
        if not loaded.loaded:
            raise ValueError(f"none of its arrays fits {config.model} ({loaded.summary()})")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
    return InitFrom(source.description, loaded)


def _check_resume(config, saved: checkpoint.Saved | None, ckpt) -> list[str]:
    """Before anything is built: the saved model must be this config's, and the saved config
    may differ only in harmless fields (training/resume.py) unless config.resume_with_changes.
    Returns the lines to log."""
    if saved is None:
        return []
    checkpoint.check_compatible(saved.signature, ckpt.signature, ckpt.directory)
    found = resume.changes(saved.config, json.loads(config.to_json()))
    if found.meaningful and not config.resume_with_changes:
        raise ConfigError(
            f"the checkpoint at step {saved.step} in {ckpt.directory} was written with another "
            f"config; resuming would report this config's results for that run. Differences: "
            f"{'; '.join(found.meaningful)}. Use another --workdir, or pass "
            "--config.resume_with_changes=True to resume with these changes.")
    lines = []
    if found.meaningful:
        lines.append("resuming with config changes (config.resume_with_changes): "
                     + "; ".join(found.meaningful))
    if found.harmless:
        lines.append("config changes since the checkpoint (harmless): "
                     + "; ".join(found.harmless))
    return lines


def _over_fresh(loaded, params, model_state):
    """The loaded leaves over the fresh init (init_state's `prepare`)."""
    take = lambda merged, fresh: fresh if isinstance(merged, jax.ShapeDtypeStruct) else merged
    return (jax.tree.map(take, loaded.params, params),
            jax.tree.map(take, loaded.state, model_state))


class Evaluation(NamedTuple):
    """A task's results (dicts of floats) for the trained parameters and for their EMA (None
    when the run keeps none)."""

    params: dict
    ema: dict | None

    def named(self) -> dict[str, tuple[str, dict]]:
        """{metrics prefix: (label, result)}: "eval" for the parameters, "eval_ema" for the
        EMA."""
        named = {"eval": ("params", self.params)}
        if self.ema is not None:
            named["eval_ema"] = ("EMA params", self.ema)
        return named

    def final(self) -> tuple[str, dict]:
        """(label, result) of the weights a run reports: the EMA where there is one."""
        return ("EMA params", self.ema) if self.ema is not None else ("params", self.params)


class Results(NamedTuple):
    """What `run` returns: the final evaluation and the task's closing line, both None when
    SIGTERM stopped the run before the end (`preempted`: a checkpoint holds `step`)."""

    step: int
    evaluation: Evaluation | None
    final_line: str | None
    preempted: bool = False


def _add(total, out):
    return out if total is None else jax.tree.map(jnp.add, total, out)


def evaluate_variables(batches, eval_fn, variables: dict, mesh, stop=lambda: False,
                       on_batch=None, combine=None) -> dict | None:
    """{name: the outputs `eval_fn` gives, added over `batches` (host-local eval batches)} for
    each {name: (params, model_state)}, fetched to the host; None when `stop()` (asked between
    batches, the same on every process) says to stop. `combine(collected, outputs)` replaces
    the addition (a task's `eval_combine`). `on_batch(local_batch)` follows each batch (e.g. a
    progress bar). The trainer's evaluation and tools.evaluate both run here."""
    combine = combine or _add
    collected = {name: None for name in variables}
    sharding = distributed.batch_sharded(mesh)
    for local in batches:
        if stop():
            return None
        batch = distributed.global_batch(local, sharding)
        for name, (params, model_state) in variables.items():
            collected[name] = combine(collected[name], eval_fn(params, model_state, batch))
        if on_batch is not None:
            on_batch(local)
    return jax.device_get(collected)


def evaluate(task: tasks.Task, config, eval_fn, state: TrainState, mesh,
             stop=lambda: False) -> Evaluation | None:
    """The task's results over the whole eval split, for the params and (when kept) their
    EMA; None when `stop()` (asked between batches, the same on every process) says to stop."""
    variants = {"params": (state.params, state.model_state)}
    if state.ema_params is not None:
        variants["ema"] = (state.ema_params, state.ema_model_state)
    batches = task.eval_data(config, process_index=jax.process_index(),
                             process_count=jax.process_count())
    summed = evaluate_variables(batches, eval_fn, variants, mesh, stop,
                                combine=task.eval_combine)
    if summed is None:
        return None
    return Evaluation(task.summarize(summed["params"], config),
                      task.summarize(summed["ema"], config) if "ema" in summed else None)


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


def _frozen_masks(config, shapes: Variables):
    if not config.freeze:
        return None
    try:
        return transfer.frozen_masks(config.freeze, shapes.params, shapes.state)
    except ValueError as e:
        raise ConfigError(f"config.freeze: {e}") from None


def _objective(task: tasks.Task, config, model, dtype, mesh) -> steps.Objective:
    try:
        objective = task.objective(config, model, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if objective.extra is None:
        return objective
    return objective._replace(extra=jax.device_put(objective.extra,
                                                   distributed.replicated(mesh)))


def _stop_check(mesh, preemption: _Preemption, every: int):
    """step -> whether to stop for SIGTERM, the same answer on every process. One process asks
    its own flag each step; several agree (an all-gather, a barrier) only every `every` steps,
    so hosts are not synchronised each step yet all stop at the same one."""
    if jax.process_count() == 1:
        return lambda step: preemption.requested
    return lambda step: step % every == 0 and distributed.any_process(preemption.requested)


def run(config: ml_collections.ConfigDict, workdir: str) -> Results:
    """Trains to the end of the schedule (or until SIGTERM) and returns the final evaluation."""
    mesh = distributed.data_mesh()
    task = _validate(config, mesh)
    dtype = steps.compute_dtype(config.compute_dtype)
    model = nets.transformed(config.model, num_classes=config.data.num_classes,
                             bn_eval=config.bn_eval, **config.model_kwargs.to_dict())
    # Shapes only (nothing compiled): the checkpoint signature, the freeze masks and the checks
    # of init_from.
    shapes = Variables(*jax.eval_shape(_model_init(config, model), jax.random.key(0)))
    frozen = _frozen_masks(config, shapes)
    objective = _objective(task, config, model, dtype, mesh)   # config errors before the data
    with contextlib.ExitStack() as cleanup:
        ckpt = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                      config.keep_checkpoints,
                                      checkpoint.model_signature(config, shapes.params),
                                      config.to_json(), keep_every=config.keep_every_steps)
        cleanup.callback(ckpt.close)
        cleanup.callback(ckpt.wait)
        saved = ckpt.newest_readable()
        notes = _check_resume(config, saved, ckpt)   # before the data and the init
        # Resuming always wins over init_from.
        init_from = _load_init_from(config, shapes) if config.init_from and not saved else None
        train_data = task.train_data(config, process_index=jax.process_index(),
                                     process_count=jax.process_count())
        cleanup.callback(train_data.close)
        steps_per_epoch = train_data.num_examples / config.batch_size
        total_steps = config.num_steps or max(1, round(config.num_epochs * steps_per_epoch))
        schedule = optimizers.learning_rate(config.optimizer, config.batch_size,
                                            steps_per_epoch, total_steps)
        state, optimizer = init_state(
            config, model,
            lambda p: optimizers.optimizer(config.optimizer, config.model, p, schedule,
                                           frozen=frozen.params if frozen else None),
            mesh, prepare=None if init_from is None else functools.partial(_over_fresh,
                                                                           init_from.loaded))
        start = 0
        if saved is not None:
            start, state, data_state = ckpt.restore(saved, state)
            train_data.set_state(data_state)
            notes += [f"set aside an unreadable checkpoint: {s}" for s in ckpt.skipped]
            notes.append(f"resumed from the checkpoint at step {start} in {ckpt.directory}"
                         + (" (config.init_from is for fresh runs only)" if config.init_from
                            else ""))
        # Rows logged after `start` by a run killed before its next checkpoint are dropped.
        report = metrics.Reporter(workdir, total_steps, steps_per_epoch, config.batch_size,
                                  task, resume_step=start)
        cleanup.callback(report.close)
        if init_from is not None:
            report.print(f"init_from {init_from.description}: {init_from.loaded.summary()}")
        for note in notes:
            report.print(note)
        if frozen is not None:
            sizes = [(x.size, f) for x, f in zip(jax.tree.leaves(shapes.params),
                                                 jax.tree.leaves(frozen.params), strict=True)]
            n_frozen = sum(size for size, f in sizes if f)
            report.print(f"freeze {tuple(config.freeze)}: {n_frozen:,} parameters frozen (and "
                         f"their BN statistics), {sum(s for s, _ in sizes) - n_frozen:,} "
                         "trainable")
        for note in objective.notes:
            report.print(note)
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        report.print(
            f"training {config.model} ({n_params:,} parameters) on {config.data.name} for "
            f"{total_steps} steps of {config.batch_size} images "
            f"({total_steps / steps_per_epoch:.1f} epochs) over {mesh.size} "
            f"{jax.default_backend()} device(s) in {jax.process_count()} process(es), "
            f"computing in {jnp.dtype(dtype).name}")

        extra = objective.extra is not None
        update_state = objective.update_state and functools.partial(
            objective.update_state, total_steps=total_steps)
        train_fn = steps.train_step(objective.loss, optimizer, schedule,
                                    ema_decay=config.ema_decay, mesh=mesh, frozen=frozen,
                                    extra=extra, prepare=objective.prepare,
                                    update_state=update_state)
        extra_args = (objective.extra,) if extra else ()
        eval_fn = steps.eval_step(task.eval_sums(config, model), mesh)
        sharding = distributed.batch_sharded(mesh)
        preemption = _Preemption()
        cleanup.callback(preemption.restore)
        should_stop = _stop_check(mesh, preemption, config.log_every)
        eval_stop = lambda: distributed.any_process(preemption.requested)  # noqa: E731

        def preempted(step: int, saved_step: int | None) -> Results:
            if saved_step != step:
                _check_finite(previous, step, ckpt)
                ckpt.save(step, state, train_data.get_state())
            ckpt.wait()
            report.print(f"SIGTERM: saved the checkpoint at step {step} in {ckpt.directory}; "
                         "run the same command to resume")
            return Results(step, None, None, preempted=True)

        def report_unreadable():
            if config.data.skip_unreadable:
                total = distributed.total_over_processes(getattr(train_data, "unreadable", 0))
                report.print(f"unreadable training examples replaced so far: {total} "
                             "(data.skip_unreadable)")

        history, previous = [], None
        report.start(start)
        for step in range(start + 1, total_steps + 1):
            batch = distributed.global_batch(next(train_data), sharding)
            state, step_metrics = train_fn(state, batch, *extra_args)
            history.append(step_metrics)
            if previous is not None:   # one step behind, so the host never stalls the devices
                _check_finite(previous, step - 1, ckpt)
            previous = step_metrics
            last = step == total_steps
            if step % config.log_every == 0 or last:
                _check_finite(step_metrics, step, ckpt)
                report.train(step, history)
                history = []
            stop = should_stop(step)
            if stop or last or step % config.checkpoint_every == 0:
                _check_finite(step_metrics, step, ckpt)
                ckpt.save(step, state, train_data.get_state())
            if stop:
                return preempted(step, step)
            if config.eval_every and step % config.eval_every == 0 and not last:
                evaluation = evaluate(task, config, eval_fn, state, mesh, eval_stop)
                if evaluation is None:
                    return preempted(step, step if step % config.checkpoint_every == 0
                                     else None)
                report.eval(step, evaluation)
                report_unreadable()
        evaluation = evaluate(task, config, eval_fn, state, mesh, eval_stop)
        if evaluation is None:   # the last step's checkpoint is written: a rerun evaluates
            return preempted(total_steps, total_steps)
        report.eval(total_steps, evaluation)
        report_unreadable()
        return Results(total_steps, evaluation, task.final_line(*evaluation.final()))
