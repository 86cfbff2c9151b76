"""The classification task: softmax cross-entropy on (possibly mixed) target distributions,
train top-1, and evaluation by top-1 / top-5 / cross-entropy over the whole eval split."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import data
from nets import layers
from training import steps
from training.tasks import Task


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy against (possibly mixed) target distributions, smoothed after
    mixing as the NFNet code does: y = (1 - s) y + s / C. Computed in float32."""
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def forward_with_auxiliary(model: hk.TransformedWithState, params, model_state, rng, images,
                           dtype):
    """Training-mode logits (float32), the auxiliary heads' [(loss weight, logits)] (empty
    unless the model returns `nets.layers.AuxiliaryOutputs`: GoogLeNet and Inception-v3 with
    aux_logits=True) and the updated model state."""
    outputs, model_state = model.apply(params, model_state, rng, images.astype(dtype),
                                       is_training=True)
    auxiliary = []
    if isinstance(outputs, layers.AuxiliaryOutputs):
        auxiliary = [(w, a.astype(jnp.float32))
                     for w, a in zip(outputs.weights, outputs.auxiliary, strict=True)]
        outputs = outputs.logits
    return outputs.astype(jnp.float32), auxiliary, model_state


def forward(model: hk.TransformedWithState, params, model_state, rng, images, dtype):
    """Training-mode logits (float32; a model's main logits where it also has auxiliary heads)
    and the updated model state."""
    logits, _, model_state = forward_with_auxiliary(model, params, model_state, rng, images,
                                                    dtype)
    return logits, model_state


def train_metrics(logits, targets) -> dict:
    """Top-1 against the targets' argmax (the larger share of a mixed pair)."""
    return {"top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))}


def objective(model: hk.TransformedWithState, *, dtype, label_smoothing: float):
    """The loss `steps.Objective` wants: cross-entropy of the training-mode forward, plus each
    auxiliary head's cross-entropy times its weight where the model has auxiliary heads (the
    weights come with the model's outputs: GoogLeNet's 0.3, Inception-v3's 0.4)."""

    def loss(params, model_state, rng, batch, extra=None):
        logits, auxiliary, model_state = forward_with_auxiliary(
            model, params, model_state, rng, batch["images"], dtype)
        targets = batch["targets"]
        total = cross_entropy(logits, targets, label_smoothing)
        for weight, aux_logits in auxiliary:
            total = total + weight * cross_entropy(aux_logits, targets, label_smoothing)
        return total, (model_state, train_metrics(logits, targets))

    return loss


def validate(config) -> None:
    if config.distill.teacher_from or config.distill.teacher:
        raise ValueError("config.distill is read by the distillation task: add "
                         "--config.task=distillation (experiments/distill_mobilenet_v2.py sets it)")


def _objective(config, model, *, dtype) -> steps.Objective:
    return steps.Objective(objective(model, dtype=dtype, label_smoothing=config.label_smoothing),
                           prepare=data.device_preparer(config.data))


def train_data(config, *, process_index: int, process_count: int):
    return data.train_iterator(config.data, global_batch=config.batch_size, seed=config.seed,
                               process_index=process_index, process_count=process_count)


def num_train_examples(config) -> int:
    return data.num_train_examples(config.data)


def eval_data(config, *, process_index: int, process_count: int):
    return data.eval_batches(config.data, global_batch=config.eval_batch_size,
                             process_index=process_index, process_count=process_count)


def eval_sums(model: hk.TransformedWithState, per_class: bool = False):
    """(params, model_state, batch) -> sums over the unmasked examples of the batch: top-1 and
    top-5 correct, un-smoothed cross-entropy, count; per_class=True adds per label the top-1
    correct ("class_top1") and the examples ("class_count"). Runs in float32."""

    def sums(params, model_state, batch):
        logits, _ = model.apply(params, model_state, None, batch["images"], is_training=False)
        logits = logits.astype(jnp.float32)
        labels, mask = batch["labels"], batch["mask"].astype(jnp.float32)
        k = min(5, logits.shape[-1])
        top_k = jax.lax.top_k(logits, k)[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (top_k[:, 0] == labels) * mask
        out = {
            "top1": jnp.sum(correct),
            "top5": jnp.sum(jnp.any(top_k == labels[:, None], -1) * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }
        if per_class:
            rows = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
            out["class_top1"] = correct @ rows
            out["class_count"] = mask @ rows
        return out

    return sums


def summarize(total) -> dict:
    """Means over the examples; with per-class sums also "per_class_top1" (a list over the
    labels, None for a label without examples) and "per_class_count"."""
    count = float(total["count"])
    result = {"top1": float(total["top1"]) / count, "top5": float(total["top5"]) / count,
              "loss": float(total["loss"]) / count, "count": count}
    if "class_top1" in total:
        result["per_class_top1"] = [float(c) / float(n) if n else None for c, n in
                                    zip(total["class_top1"], total["class_count"])]
        result["per_class_count"] = [int(n) for n in total["class_count"]]
    return result


def train_line(means) -> str:
    return f"top-1 {100 * means['top1']:.1f}%"


def eval_line(result) -> str:
    return (f"top-1 {100 * result['top1']:.2f}% | top-5 {100 * result['top5']:.2f}% | "
            f"loss {result['loss']:.4f}")


def final_line(label: str, result) -> str:
    return (f"test accuracy ({label}): top-1 {100 * result['top1']:.2f}%, "
            f"top-5 {100 * result['top5']:.2f}%")


def _eval_sums(config, model):
    return eval_sums(model)


def _summarize(total, config):
    return summarize(total)


TASK = Task(name="classification", validate=validate, objective=_objective,
            train_data=train_data, num_train_examples=num_train_examples,
            eval_data=eval_data, eval_sums=_eval_sums,
            summarize=_summarize,
            train_line=train_line, eval_line=eval_line, final_line=final_line)
