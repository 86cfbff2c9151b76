"""Conv-BatchNorm fusion for inference: every BatchNorm that directly follows a conv is folded
into it (the conv gains a bias), so the eval-mode network computes the same function with
fewer ops and no running statistics.

    fused_params, fused_state = nets.fusion.fuse("resnet50", params, state)
    f = nets.transformed("resnet50", fused=True)
    logits, _ = f.apply(fused_params, fused_state, None, images, is_training=False)

Which BatchNorm follows which conv is read from the model itself: its eval-mode forward is
traced (`jax.eval_shape`, nothing computed) and a BatchNorm is paired with the conv whose output
it receives unchanged and no other module receives. (Nor may the conv's output feed an op
outside modules, which the trace does not see; no model in the zoo does that -
tests/test_fusion.py compares every family's fused and unfused outputs.) For a pair, with
s = gamma / sqrt(running_var + eps) per channel,

    W' = W * s (over the output channels),    b' = (b - running_mean) * s + beta,

b = 0 for a conv without bias. A BatchNorm with no conv right before it (DenseNet's
pre-activation norms, which follow a concatenation; Shake-Shake's shortcut norm) cannot be
folded into a conv; it becomes the affine x * s + (beta - running_mean * s) under its own name,
so the fused model keeps no BatchNorm statistics at all; so does a BatchNorm whose conv also
feeds other BatchNorms (EfficientDet's heads share a conv across levels, each level with its
own BatchNorm).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import haiku as hk
import jax
import numpy as np

from nets import deformable, introspect, layers, registry

_CONVS = (layers.Conv, deformable.DeformableConv)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What fusing a variant does: `folded` maps each BatchNorm that follows a conv to that
    conv; `eps` holds every BatchNorm's epsilon (the unfolded ones become affines)."""

    folded: dict[str, str]
    eps: dict[str, float]

    @property
    def fusion(self) -> layers.Fusion:
        return layers.Fusion(frozenset(self.folded.values()), frozenset(self.folded))

    @property
    def affine(self) -> list[str]:
        """The BatchNorms with no conv right before them."""
        return [bn for bn in self.eps if bn not in self.folded]


_PLANS: dict[str, Plan] = {}


def plan(name: str, num_classes: int | None = None, **overrides) -> Plan:
    """The variant's `Plan`, from one abstract trace of its eval-mode forward (cached)."""
    if num_classes is None:
        num_classes = registry.default_num_classes(name)
    key = json.dumps([name, num_classes, overrides], sort_keys=True, default=repr)
    if key in _PLANS:
        return _PLANS[key]
    produced: dict[int, tuple[str, Any]] = {}
    folded: dict[str, str] = {}
    eps: dict[str, float] = {}
    receivers: dict[str, set[str]] = collections.defaultdict(set)

    def record(next_f, args, kwargs, context):
        out = next_f(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        for x in jax.tree.leaves((args, kwargs)):
            conv, conv_out = produced.get(id(x), (None, None))
            if conv_out is x:
                receivers[conv].add(module.module_name)
        if isinstance(module, _CONVS):
            produced[id(out)] = (module.module_name, out)  # holding `out` keeps its id unique
        elif isinstance(module, layers.BatchNorm):
            x = args[0] if args else kwargs["x"]
            eps[module.module_name] = module.eps
            conv, conv_out = produced.get(id(x), (None, None))
            if conv_out is x:
                folded[module.module_name] = conv
        return out

    def forward(images):  # only the dataflow matters: zeros, not the initialisers
        with hk.intercept_methods(record), registry.zero_init():
            return registry.create(name, num_classes, **overrides)(images, is_training=False)

    images = introspect.example_images(name, 1, 64, **overrides)
    jax.eval_shape(hk.transform_with_state(forward).init, jax.random.key(0), images)
    # A conv shared by several BatchNorms (a detector head's conv, applied to every level
    # with a BatchNorm per level) cannot take any one of them: they stay affines. Nor can a
    # conv whose output another module also receives (the CIFAR DenseNet's stem conv feeds the
    # first layer's BatchNorm and every later layer's concatenation): folding would change
    # what that module sees.
    uses = collections.Counter(folded.values())
    folded = {bn: conv for bn, conv in folded.items()
              if uses[conv] == 1 and receivers[conv] == {bn}}
    _PLANS[key] = Plan(folded, eps)
    return _PLANS[key]


def _norm_affine(params, state, eps):
    """(s, beta - mean * s) of an eval-mode BatchNorm, in float64."""
    scale = params.get("scale", 1.0)  # a BatchNorm without scale (Keras' scale=False): 1
    s = np.asarray(scale, np.float64) / np.sqrt(
        np.asarray(state["var"], np.float64) + eps)
    return s, np.asarray(params["offset"], np.float64) - np.asarray(state["mean"], np.float64) * s


def _f32(x):
    return np.asarray(x, np.float32)


def fuse(name: str, params, state, num_classes: int | None = None, **overrides):
    """(params, state) for `nets.transformed(name, fused=True, ...)` that compute what
    (params, state) compute in eval mode. num_classes defaults to the head's width in `params`.
    Leaves are NumPy float32 arrays; the fused state holds whatever is not BatchNorm's (usually
    nothing)."""
    if num_classes is None:
        num_classes = introspect.num_classes_of(name, params, overrides)
    p = plan(name, num_classes, **overrides)
    missing = [m for m in p.eps if m not in state or m not in params]
    if missing:
        raise ValueError(f"these params/state are not those of {name} (num_classes="
                         f"{num_classes}): they lack the BatchNorms {', '.join(missing[:5])}")
    conv_norm = {conv: bn for bn, conv in p.folded.items()}
    fused_params = {}
    for module, leaves in params.items():
        if module in p.folded:
            continue
        if module in p.eps:
            s, shift = _norm_affine(leaves, state[module], p.eps[module])
            fused_params[module] = {"scale": _f32(s), "offset": _f32(shift)}
        elif module in conv_norm:
            bn = conv_norm[module]
            s, shift = _norm_affine(params[bn], state[bn], p.eps[bn])
            w = np.asarray(leaves["w"], np.float64)
            b = np.asarray(leaves.get("b", 0.0), np.float64)
            fused_params[module] = {**leaves, "w": _f32(w * s), "b": _f32(b * s + shift)}
        else:
            fused_params[module] = dict(leaves)
    fused_state = {m: dict(leaves) for m, leaves in state.items() if m not in p.eps}
    return fused_params, fused_state
