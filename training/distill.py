"""Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network"): the student learns from the targets and from a trained teacher's softened outputs,

    loss = alpha * CE(student, targets)
           + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

CE as `training.classification.cross_entropy` (label smoothing, MixUp / CutMix targets). The
T^2 keeps the soft term's gradient on the scale of the hard term's as T changes: the gradient of
T^2 * KL wrt the student's logits z is T * (softmax(z / T) - softmax(teacher / T)) per example,
which tends to (z - mean z - teacher + mean teacher) / C for large T (the paper's "matching
logits" limit). Everything is computed in float32.

The teacher runs in eval mode (is_training=False) on the student's (augmented) images; its
parameters and statistics are an argument of the train step under stop_gradient, never part of
the train state, the optimizer or the checkpoints.

As a task (`config.task="distillation"`, with `config.distill`), it is the classification task
with this objective: data, evaluation and reports are classification's.
"""

from __future__ import annotations

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import data
import nets
from training import classification, steps, weight_sources


def soften(logits, temperature: float):
    """softmax(logits / T) in float32: T > 1 flattens the distribution, T -> inf makes it
    uniform."""
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


def kl_divergence(student_logits, teacher_logits, temperature: float):
    """Mean over the batch of KL(softmax(teacher / T) || softmax(student / T))."""
    log_p = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
    return optax.losses.kl_divergence_with_log_targets(log_q, log_p).mean()


def terms(student_logits, teacher_logits, targets, temperature: float,
          label_smoothing: float = 0.0):
    """(CE(student, targets), KL at temperature T), unweighted."""
    return (classification.cross_entropy(student_logits, targets, label_smoothing),
            kl_divergence(student_logits, teacher_logits, temperature))


def loss(student_logits, teacher_logits, targets, alpha: float, temperature: float,
         label_smoothing: float = 0.0):
    """alpha * CE + (1 - alpha) * T^2 * KL, as the module docstring writes it. `targets` are
    distributions [B, C] (one-hot or mixed)."""
    ce, kl = terms(student_logits, teacher_logits, targets, temperature, label_smoothing)
    return combine(ce, kl, alpha, temperature)


def combine(ce, kl, alpha: float, temperature: float):
    """The loss from its two terms: alpha * ce + (1 - alpha) * T^2 * kl."""
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * kl


class Teacher(NamedTuple):
    """The teacher's forward and the loss weights; its variables travel separately."""

    model: hk.TransformedWithState
    alpha: float
    temperature: float
    description: str


def check_weights(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the weight of the hard-target term must be in [0, 1]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")


def load_teacher(cfg, num_classes: int) -> tuple[Teacher, tuple[dict, dict]]:
    """The teacher `cfg` (config.distill) names and its (params, state): `teacher_from` is a
    nets.weights file, a training workdir (teacher_ema: its EMA) or a PyTorch state dict of
    `teacher`'s reference; `teacher`, when set, must be the model those weights are for. The
    teacher must predict the `num_classes` classes of the student's data."""
    check_weights(cfg.alpha, cfg.temperature)
    source = weight_sources.read(cfg.teacher_from, model=cfg.teacher or None,
                                 ema=cfg.teacher_ema)
    if cfg.teacher and cfg.teacher != source.model:
        raise ValueError(f"distill.teacher={cfg.teacher!r}, but {source.description} holds "
                         f"{source.model}; leave distill.teacher empty to use the weights' model")
    if source.num_classes != num_classes:
        raise ValueError(f"the teacher {source.description} predicts {source.num_classes} "
                         f"classes, the data has {num_classes}: a teacher must predict the "
                         "student's classes (fine-tune it on this data first)")
    variables = weight_sources.variables(source)   # complete for its model, or an error
    model = nets.transformed(source.model, num_classes=num_classes, **source.overrides)
    teacher = Teacher(model, float(cfg.alpha), float(cfg.temperature), source.description)
    return teacher, variables


def objective(model: hk.TransformedWithState, teacher: Teacher, *, dtype,
              label_smoothing: float):
    """The classification objective with `loss` above in place of the cross-entropy:
    (params, model_state, rng, batch, teacher_variables) -> (loss, (model_state, metrics)),
    metrics = classification's plus the two terms {"ce", "kl"}. The teacher's variables pass
    under stop_gradient, so no gradient reaches them."""

    def distillation_loss(params, model_state, rng, batch, teacher_variables):
        logits, model_state = classification.forward(model, params, model_state, rng,
                                                     batch["images"], dtype)
        teacher_params, teacher_state = jax.lax.stop_gradient(teacher_variables)
        teacher_logits, _ = teacher.model.apply(teacher_params, teacher_state, None,
                                                batch["images"].astype(dtype), is_training=False)
        ce, kl = terms(logits, teacher_logits, batch["targets"], teacher.temperature,
                       label_smoothing)
        metrics = {**classification.train_metrics(logits, batch["targets"]), "ce": ce, "kl": kl}
        return combine(ce, kl, teacher.alpha, teacher.temperature), (model_state, metrics)

    return distillation_loss


def validate(config) -> None:
    cfg = config.distill
    if not cfg.teacher_from:
        teacher = f"config.distill.teacher={cfg.teacher!r}" if cfg.teacher else "the teacher"
        raise ValueError(f"{teacher} needs its weights: pass "
                         "--config.distill.teacher_from=PATH (a nets.weights .safetensors file "
                         "or a training workdir)")
    try:
        check_weights(cfg.alpha, cfg.temperature)
    except ValueError as e:
        raise ValueError(f"config.distill: {e}") from None


def _objective(config, model, *, dtype) -> steps.Objective:
    try:
        teacher, variables = load_teacher(config.distill, config.data.num_classes)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"config.distill.teacher_from={config.distill.teacher_from!r}: {e}"
                         ) from None
    note = (f"distilling from {teacher.description} (eval mode): loss = {teacher.alpha} * CE + "
            f"{1 - teacher.alpha:g} * {teacher.temperature}^2 * KL; train/ce and train/kl in "
            "metrics.jsonl")
    loss = objective(model, teacher, dtype=dtype, label_smoothing=config.label_smoothing)
    return steps.Objective(loss, extra=variables, notes=(note,),
                           prepare=data.device_preparer(config.data))


TASK = classification.TASK._replace(name="distillation", validate=validate,
                                    objective=_objective)
