"""The model zoo: a registry of variants, each exact to a reference implementation.

    import nets
    nets.list_models("*resnet*")
    f = nets.transformed("resnet50", num_classes=10)
    params, state = f.init(rng, images, is_training=True)
    logits, state = f.apply(params, state, rng, images, is_training=False)
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re

import haiku as hk

from nets import (csp, densenet, efficientnet, layers, mobilenet, nfnet, p3d, resnet_family,
                  shake_shake, shufflenet)
from nets.registry import ModelInfo, Preprocessing, module_path

_FAMILIES = (resnet_family, nfnet, efficientnet, mobilenet, shufflenet, densenet, csp, p3d,
             shake_shake)
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


def check_overrides(info: ModelInfo, overrides: dict) -> None:
    accepted = [p for p in inspect.signature(info.builder).parameters if p != "self"]
    for key in overrides:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise TypeError(f"{info.name} has no option {key!r}.{hint} Options: "
                            f"{', '.join(accepted)}.")


def create(name: str, num_classes: int = 1000, **overrides) -> hk.Module:
    """Builds the variant's module (call inside a Haiku transform). `overrides` replace entries
    of the variant's configuration (e.g. stochastic_depth_rate=0.1)."""
    info = model_info(name)
    check_overrides(info, overrides)
    return info.builder(**{**info.config, "num_classes": num_classes, **overrides})


def transformed(name: str, num_classes: int = 1000, *, fused: bool = False,
                **overrides) -> hk.TransformedWithState:
    """`hk.transform_with_state` of the variant's forward: f(images, is_training) -> logits.
    fused=True: the inference form with every BatchNorm folded into its conv, for the
    parameters `nets.fusion.fuse` returns (eval mode only)."""
    check_overrides(model_info(name), overrides)
    fusing = fusion.plan(name, num_classes, **overrides).fusion if fused else None

    def forward(images, is_training: bool):
        with layers.fused(fusing):
            return create(name, num_classes, **overrides)(images, is_training=is_training)

    return hk.transform_with_state(forward)


def transformed_features(name: str, *, fused: bool = False,
                         **overrides) -> hk.TransformedWithState:
    """`hk.transform_with_state` of `features(images, is_training)`: the per-stage maps
    (fused=True as in `transformed`, for the parameters `nets.fusion.fuse(name, ...)` gives
    with num_classes=0)."""
    check_overrides(model_info(name), overrides)
    fusing = fusion.plan(name, 0, **overrides).fusion if fused else None

    def forward(images, is_training: bool):
        with layers.fused(fusing):
            return create(name, 0, **overrides).features(images, is_training=is_training)

    return hk.transform_with_state(forward)


# The role of each leaf, from the leaf names our layers give their parameters.
_LEAF_ROLES = {"w": "weight", "b": "bias", "gain": "gain", "bias": "bias", "scale": "gain",
               "offset": "bias", "skip_gain": "skip_gain"}


def param_roles(name: str, params):
    """The role of every parameter, for optimiser masks: "weight" (conv kernels and dense
    weights), "gain" (WS gains, BN scales), "bias", "skip_gain", and "classifier_weight" /
    "classifier_bias" for the head, which the variant's registry entry names."""
    info = model_info(name)

    def role(module, leaf):
        if module.split("/", 1)[-1] == info.classifier:
            return f"classifier_{_LEAF_ROLES[leaf]}"
        return _LEAF_ROLES[leaf]

    return {module: {leaf: role(module, leaf) for leaf in leaves}
            for module, leaves in params.items()}


def stacked_axes(name: str, params):
    """For every parameter, how many leading axes stack blocks (hk.layer_stack): 0 or 1."""
    pattern = model_info(name).stacked_modules

    def count(module):
        return int(bool(pattern and re.match(pattern, module_path(module))))

    return {module: {leaf: count(module) for leaf in leaves}
            for module, leaves in params.items()}


from nets import convert, fusion, weights  # noqa: E402  (they need the registry above)

__all__ = ["ModelInfo", "Preprocessing", "convert", "create", "fusion", "layers", "list_models",
           "model_info", "param_roles", "stacked_axes", "transformed", "transformed_features",
           "weights"]
