"""Adaptive gradient clipping and the NFNet optimizer (../shared/reference/nfnet_spec.md §10).

The optimiser's parameter groups come from roles the model declares for its leaves
(`nets.param_roles`, whose vocabulary is `nets.registry.ROLES`), not from substring matches on
names. This package imports no project code, so the role names it acts on are arguments: the
caller passes them from that vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax


def adaptive_grad_clip(clipping: float, eps: float = 1e-3, mask: Any = None,
                       stacked: Any = None) -> optax.GradientTransformation:
    """`optax.adaptive_grad_clip` (unit-wise: per output unit of a dense or conv kernel, whole
    tensor for vectors and scalars), applied to the leaves where `mask` is True and per block
    for leaves that stack `stacked` blocks along their leading axes (hk.layer_stack)."""
    clip = optax.adaptive_grad_clip(clipping, eps)

    def clip_leaf(grad, param, masked_in, n_stacked):
        if not masked_in:
            return grad
        fn = lambda g, p: clip.update(g, clip.init(p), p)[0]
        for _ in range(n_stacked):
            fn = jax.vmap(fn)
        return fn(grad, param)

    def update(updates, state, params):
        if params is None:
            raise ValueError("adaptive_grad_clip needs the parameters: update(g, state, params)")
        masks = mask if mask is not None else jax.tree.map(lambda _: True, params)
        counts = stacked if stacked is not None else jax.tree.map(lambda _: 0, params)
        return jax.tree.map(clip_leaf, updates, params, masks, counts), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def nfnet_optimizer(roles: Any, learning_rate: optax.ScalarOrSchedule, *, stacked: Any = None,
                    clipping: float = 0.01, eps: float = 1e-3, weight_decay: float = 2e-5,
                    momentum: float = 0.9, nesterov: bool = True,
                    clip_classifier_bias: bool = True,
                    decay_roles: Sequence[str],
                    classifier_roles: tuple[str, str]) -> optax.GradientTransformation:
    """SGD-AGC of the NFNet paper: AGC on every parameter but the classifier weight, then
    coupled weight decay on the leaves whose role is in `decay_roles` (the paper: weights only,
    not gains, biases or skip gains), then SGD with Nesterov momentum (the paper's; heavy-ball
    momentum if not `nesterov`). `classifier_roles`: the roles of the classifier's (weight,
    bias). The paper says not to clip the final linear layer; the official code excludes only
    its weight and clips its bias: `clip_classifier_bias` chooses (default: as the code)."""
    weight_role, bias_role = classifier_roles
    unclipped = (weight_role,) + (() if clip_classifier_bias else (bias_role,))
    clip_mask = jax.tree.map(lambda role: role not in unclipped, roles)
    decay_mask = jax.tree.map(lambda role: role in decay_roles, roles)
    return optax.chain(
        adaptive_grad_clip(clipping, eps, mask=clip_mask, stacked=stacked),
        optax.masked(optax.add_decayed_weights(weight_decay), decay_mask),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
