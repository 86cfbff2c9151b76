"""The model zoo: a registry of variants, each exact to a reference implementation.

    import nets
    nets.list_models("*resnet*")
    f = nets.transformed("resnet50", num_classes=10)
    params, state = f.init(rng, images, is_training=True)
    logits, state = f.apply(params, state, rng, images, is_training=False)

This file only re-exports. Where things live:
  records.py     ModelInfo, Preprocessing, module_path (the rows families declare; no imports)
  registry.py    the registry functions (list_models, model_info, create, transformed,
                 transformed_features, head_module, param_roles, stacked_axes ...) and the
                 parameter-role vocabulary (ROLES, LEAF_ROLES, declare_leaf_role)
  introspect.py  example_images, shapes, count_params, num_classes_of, mismatch_report
  convert.py     reference weights (torch / keras / official NFNet) -> our trees
  weights.py     safetensors files; fusion.py conv-BN folding; layers.py building blocks
Inside the package, modules import the specific module they need (`from nets import registry`),
never the package itself, and module-level imports form no cycle.
"""

from __future__ import annotations

from nets import convert, fusion, introspect, layers, records, registry, weights
from nets.records import ModelInfo, Preprocessing
from nets.registry import (ROLES, LEAF_ROLES, check_overrides, create, declare_leaf_role,
                           default_num_classes, head_module, list_models, model_info,
                           param_roles, stacked_axes, transformed, transformed_features)

__all__ = ["LEAF_ROLES", "ModelInfo", "Preprocessing", "ROLES", "check_overrides", "convert",
           "create", "declare_leaf_role", "default_num_classes", "fusion", "head_module",
           "introspect", "layers", "list_models", "model_info", "param_roles", "records",
           "registry", "stacked_axes", "transformed", "transformed_features", "weights"]
