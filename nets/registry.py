"""The registry: every variant's `ModelInfo` row, the functions that find and build them, and the
parameter-role vocabulary optimisers build their masks from.

    nets.list_models("*resnet*")
    f = nets.transformed("resnet50", num_classes=10)

Family modules declare their variants as rows of `nets.records.ModelInfo` (re-exported here)
and never import this module; this module imports every family and collects their rows.
Modules above it (`introspect`, `convert`, `fusion`, `weights`) import it; it imports none of
them at module level (`transformed(..., fused=True)` imports `nets.fusion` when called), so the
module-level imports inside `nets/` form no cycle.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import re

import haiku as hk
import jax.numpy as jnp

from nets import (condensenet, csp, densenet, efficientdet, efficientnet, inception, layers,
                  mobilenet, nfnet, p3d, resnet_family, shake_shake, shufflenet, wide_resnet,
                  xception)
from nets.records import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, Preprocessing, module_path

_FAMILIES = (resnet_family, nfnet, efficientnet, mobilenet, shufflenet, densenet, csp, p3d,
             shake_shake, wide_resnet, efficientdet, xception, condensenet, inception)
_MODELS: dict[str, ModelInfo] = {}
for _family in _FAMILIES:
    for _info in _family.VARIANTS:
        if _info.name in _MODELS:
            raise RuntimeError(f"model {_info.name!r} is registered twice")
        _MODELS[_info.name] = _info


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered variants matching an fnmatch pattern."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} nets.list_models() lists all "
                         f"{len(_MODELS)}.") from None


def network_key(name: str) -> tuple:
    """Equal for variants that build the same network on the same inputs and differ only in
    their train / test size, preprocessing or reference (MobileNet's resolution multipliers):
    what tools and tests that trace a network once key their caches by."""
    info = model_info(name)
    return (info.builder, repr(sorted(info.config.items())), info.num_frames,
            info.feature_strides, info.min_input_size, info.feature_sizes, info.task)


def check_overrides(info: ModelInfo, overrides: dict) -> None:
    accepted = [p for p in inspect.signature(info.builder).parameters if p != "self"]
    for key in overrides:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise TypeError(f"{info.name} has no option {key!r}.{hint} Options: "
                            f"{', '.join(accepted)}.")


def default_num_classes(name: str) -> int:
    """The head's classes when none are asked for: ImageNet's 1000, or what the variant's
    task says (a COCO detector's 90)."""
    return int(model_info(name).task_metadata.get("num_classes", 1000))


def create(name: str, num_classes: int | None = None, **overrides) -> hk.Module:
    """Builds the variant's module (call inside a Haiku transform). num_classes defaults to
    `default_num_classes`; `overrides` replace entries of the variant's configuration (e.g.
    stochastic_depth_rate=0.1)."""
    info = model_info(name)
    check_overrides(info, overrides)
    if num_classes is None:
        num_classes = default_num_classes(name)
    return info.builder(**{**info.config, "num_classes": num_classes, **overrides})


def _fusion_of(name: str, num_classes: int, overrides: dict) -> layers.Fusion:
    from nets import fusion  # fusion builds on this module; imported on use, not at load

    return fusion.plan(name, num_classes, **overrides).fusion


def _zeros(next_creator, shape, dtype, init, context):
    return jnp.zeros(shape, dtype)


@contextlib.contextmanager
def zero_init():
    """Inside a transform: parameters and state are created as zeros of their shapes, without
    running their initialisers. An abstract trace (`jax.eval_shape`) needs no more, and tracing
    the initialisers takes about two thirds of its time."""
    with hk.custom_creator(_zeros, params=True, state=True):
        yield


def transformed(name: str, num_classes: int | None = None, *, fused: bool = False,
                bn_eval: bool = False, shapes_only: bool = False,
                **overrides) -> hk.TransformedWithState:
    """`hk.transform_with_state` of the variant's forward: f(images, is_training) -> logits.
    fused=True: the inference form with every BatchNorm folded into its conv, for the
    parameters `nets.fusion.fuse` returns (eval mode only). bn_eval=True: every BatchNorm
    uses (and keeps) its running statistics in training too (`layers.batch_norm_eval`).
    shapes_only=True: init creates zeros (`zero_init`), for shapes under jax.eval_shape."""
    check_overrides(model_info(name), overrides)
    if num_classes is None:
        num_classes = default_num_classes(name)
    fusing = _fusion_of(name, num_classes, overrides) if fused else None

    def forward(images, is_training: bool):
        with (layers.fused(fusing), layers.batch_norm_eval(bn_eval),
              zero_init() if shapes_only else contextlib.nullcontext()):
            return create(name, num_classes, **overrides)(images, is_training=is_training)

    return hk.transform_with_state(forward)


def transformed_features(name: str, *, fused: bool = False,
                         **overrides) -> hk.TransformedWithState:
    """`hk.transform_with_state` of `features(images, is_training)`: the per-stage maps
    (fused=True as in `transformed`, for the parameters `nets.fusion.fuse(name, ...)` gives
    with num_classes=0)."""
    check_overrides(model_info(name), overrides)
    fusing = _fusion_of(name, 0, overrides) if fused else None

    def forward(images, is_training: bool):
        with layers.fused(fusing):
            return create(name, 0, **overrides).features(images, is_training=is_training)

    return hk.transform_with_state(forward)


# ----------------------------------------------------------------------------------------------
# The head.


def head_module(name: str, **overrides) -> str | None:
    """The Haiku module path of the variant's classifier ("resnet/fc"), as the keys of its
    params tree spell it: the root module's Haiku name and the head the registry entry declares
    (`ModelInfo.classifier`), the one place a head is declared. None for a model without a
    classifier. (The root's name comes from constructing the module, which computes nothing.)"""
    info = model_info(name)
    if info.classifier is None:
        return None
    overrides.pop("fused", None)  # `transformed`'s option (as in shapes(...)); names unchanged
    root = hk.transform(lambda: create(name, 1, **overrides).module_name).apply({}, None)
    return f"{root}/{info.classifier}"


# ----------------------------------------------------------------------------------------------
# Parameter roles: the one vocabulary optimiser masks are built from (training/optimizers.py,
# optim/ through its arguments, experiments' decay_roles).

WEIGHT = "weight"                        # conv kernels, dense weights
GAIN = "gain"                            # WS gains, BatchNorm scales
BIAS = "bias"                            # biases, BatchNorm offsets
SKIP_GAIN = "skip_gain"                  # NFNet's skip-init gains
CLASSIFIER_WEIGHT = "classifier_weight"  # the head's (`head_module`) weight ...
CLASSIFIER_BIAS = "classifier_bias"      # ... and bias
ROLES = (WEIGHT, GAIN, BIAS, SKIP_GAIN, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS)
CLASSIFIER_ROLES = (CLASSIFIER_WEIGHT, CLASSIFIER_BIAS)  # the head's (weight, bias) roles
# A role of the head's leaves: the classifier form of the role the leaf has elsewhere.
_CLASSIFIER_ROLES = {WEIGHT: CLASSIFIER_WEIGHT, BIAS: CLASSIFIER_BIAS}

# The role of each leaf name our layers give their parameters. A layer that introduces a new
# leaf name declares its role here (code outside this package: `declare_leaf_role`).
LEAF_ROLES: dict[str, str] = {"w": WEIGHT, "b": BIAS, "gain": GAIN, "bias": BIAS,
                              "scale": GAIN, "offset": BIAS, "skip_gain": SKIP_GAIN,
                              "fusion_weights": GAIN}  # BiFPN's: not weight-decayed officially


def declare_leaf_role(leaf: str, role: str) -> None:
    """Declares the role of parameters named `leaf` (for a layer defined outside `nets/`; the
    package's own layers declare theirs in `LEAF_ROLES` above). Re-declaring the same role is a
    no-op; another role for a known leaf is an error."""
    base_roles = [r for r in ROLES if r not in CLASSIFIER_ROLES]
    if role not in base_roles:
        raise ValueError(f"role {role!r} for leaf {leaf!r}: expected one of "
                         f"{', '.join(base_roles)} (the head's roles follow from these)")
    if LEAF_ROLES.get(leaf, role) != role:
        raise ValueError(f"leaf {leaf!r} already has the role {LEAF_ROLES[leaf]!r}")
    LEAF_ROLES[leaf] = role


def param_roles(name: str, params):
    """The role of every parameter, for optimiser masks: one of `ROLES` - "weight" (conv
    kernels and dense weights), "gain" (WS gains, BN scales), "bias", "skip_gain", and
    "classifier_weight" / "classifier_bias" for the head (`head_module`)."""
    head = head_module(name)

    def role(module, leaf):
        if leaf not in LEAF_ROLES:
            raise ValueError(
                f"{name}: parameter {module}/{leaf} has the leaf name {leaf!r}, which has no "
                f"declared role; declare it in LEAF_ROLES in nets/registry.py (or call "
                f"nets.declare_leaf_role({leaf!r}, role) for a layer outside nets/), role one "
                f"of {', '.join(r for r in ROLES if r not in CLASSIFIER_ROLES)}.")
        base = LEAF_ROLES[leaf]
        if module == head:
            if base not in _CLASSIFIER_ROLES:
                raise ValueError(f"{name}: the head's parameter {module}/{leaf} has the role "
                                 f"{base!r}; a head has only weights and biases.")
            return _CLASSIFIER_ROLES[base]
        return base

    return {module: {leaf: role(module, leaf) for leaf in leaves}
            for module, leaves in params.items()}


def stacked_axes(name: str, params):
    """For every parameter, how many leading axes stack blocks (hk.layer_stack): 0 or 1."""
    pattern = model_info(name).stacked_modules

    def count(module):
        return int(bool(pattern and re.match(pattern, module_path(module))))

    return {module: {leaf: count(module) for leaf in leaves}
            for module, leaves in params.items()}


__all__ = ["BIAS", "CLASSIFIER_BIAS", "CLASSIFIER_ROLES", "CLASSIFIER_WEIGHT", "GAIN",
           "IMAGENET_MEAN", "IMAGENET_STD", "LEAF_ROLES", "ModelInfo", "Preprocessing", "ROLES",
           "SKIP_GAIN",
           "WEIGHT", "check_overrides", "create", "declare_leaf_role", "head_module",
           "list_models", "model_info", "module_path", "param_roles", "stacked_axes",
           "transformed", "transformed_features"]
