"""The optimizer and learning-rate schedule a config names, built from `optim/`."""

from __future__ import annotations

import jax
import ml_collections
import optax

import nets
import optim

# The names config.optimizer.name and config.optimizer.schedule take.
OPTIMIZERS = ("sgd", "sgd_agc", "rmsprop")
SCHEDULES = ("cosine", "cosine_global_step", "step", "exponential")


def learning_rate(cfg: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: float,
                  total_steps: int):
    peak = optim.scaled_learning_rate(cfg.base_lr, batch_size, cfg.lr_batch_base)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return optim.warmup_cosine(peak, warmup, total_steps)
    if cfg.schedule == "cosine_global_step":   # the official EfficientDet's
        warmup_init = optim.scaled_learning_rate(cfg.warmup_init, batch_size, cfg.lr_batch_base)
        return optim.warmup_cosine_global_step(peak, warmup, total_steps, warmup_init)
    if cfg.schedule == "step":
        return optim.warmup_step_decay(peak, warmup, [e * steps_per_epoch for e in cfg.step_epochs],
                                       cfg.step_factor)
    if cfg.schedule == "exponential":
        return optim.warmup_exponential_decay(peak, warmup, cfg.decay_epochs * steps_per_epoch,
                                              cfg.decay_rate)
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}: expected one of "
                     f"{', '.join(SCHEDULES)}")


def optimizer(cfg: ml_collections.ConfigDict, model: str, params, schedule, *, frozen=None
              ) -> optax.GradientTransformation:
    """`sgd`: coupled weight decay on `decay_roles`, then SGD with (Nesterov) momentum.
    `sgd_agc`: the NFNet optimizer (AGC on all but the classifier weight first; Nesterov
    momentum as the paper where `nesterov`, which experiments/nfnet.py sets).
    `rmsprop`: coupled weight decay (the papers' L2 loss term), then TF1's RMSProp.
    `sgd` and `rmsprop` clip the gradients (weight decay included, as the L2 term of a loss
    is) where `grad_clip_norm` > 0: each tensor, then all, to that norm.
    `frozen` (a tree of bools like `params`, training.transfer.frozen_masks) zeroes the final
    updates of those leaves, weight decay included, so they stay bit-identical."""
    if frozen is None:
        frozen = jax.tree.map(lambda _: False, params)
    # Last in the chain, so nothing the chain adds (decay, momentum) reaches a frozen leaf; and
    # always there (set_to_zero keeps no state), so the optimizer state has one structure
    # whatever is frozen: a run can resume with another config.freeze.
    return optax.chain(_optimizer(cfg, model, params, schedule),
                       optax.masked(optax.set_to_zero(), frozen))


def _optimizer(cfg, model, params, schedule):
    roles = nets.param_roles(model, params)
    decay_roles = tuple(cfg.decay_roles)
    unknown = set(decay_roles) - set(jax.tree.leaves(roles))
    if unknown - set(nets.ROLES):
        raise ValueError(f"optimizer.decay_roles: unknown roles {sorted(unknown)}")
    if cfg.name == "sgd_agc":
        return optim.nfnet_optimizer(
            roles, schedule, stacked=nets.stacked_axes(model, params), clipping=cfg.agc_clipping,
            eps=cfg.agc_eps, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            nesterov=cfg.nesterov, decay_roles=decay_roles,
            classifier_roles=nets.registry.CLASSIFIER_ROLES)
    decay = optax.masked(optax.add_decayed_weights(cfg.weight_decay),
                         jax.tree.map(lambda role: role in decay_roles, roles))
    if cfg.grad_clip_norm > 0:
        decay = optax.chain(decay, optim.clip_each_then_global(cfg.grad_clip_norm))
    if cfg.name == "sgd":
        return optax.chain(decay, optax.sgd(schedule, momentum=cfg.momentum,
                                            nesterov=cfg.nesterov))
    if cfg.name == "rmsprop":
        return optax.chain(decay, optim.tf1_rmsprop(schedule, decay=cfg.rms_decay,
                                                    momentum=cfg.momentum, eps=cfg.rms_eps))
    raise ValueError(f"optimizer.name={cfg.name!r}: expected 'sgd', 'sgd_agc' or 'rmsprop'")
