"""nets.fusion: every BatchNorm folded into the conv before it gives the eval-mode function of
the unfused model (< 1e-5) for every family with BatchNorm, and the fused model has no
BatchNorm statistics. Random weights with BatchNorm away from the identity, 32 px."""

import re

import jax
import numpy as np
import pytest

import nets
from tests.helpers import random_variables
from tools import export as export_tool
from tools import fuse as fuse_tool

# One variant per block kind: the list, then the rest of the zoo's BatchNorm families
# (shallow ResNet-family variants where depth adds nothing but compile time).
MODELS = [
    ("resnet50", {}), ("resnext50_32x4d", {}), ("seresnet50", {}), ("efficientnet_b0", {}),
    ("mobilenet_v2", {}), ("mobilenet_v3_large", {}), ("shufflenet_v2_x1_0", {}),
    ("densenet121", {}),
    # The CIFAR DenseNet's stem conv feeds the first BatchNorm and every later concatenation.
    ("densenet_bc_100_12", {"block_config": (2, 2, 2)}),
    ("resnest50d", {"layers": (1, 1, 1, 1)}), ("skresnext50_32x4d", {"layers": (1, 1, 1, 1)}),
    ("skresnet18", {}), ("cbam_resnet50", {"layers": (1, 1, 1, 1)}),
    ("gcresnet50t", {"layers": (1, 1, 1, 1)}),
    ("resnet50", {"layers": (1, 1, 1, 1), "deformable_stages": (3, 4)}),
    ("cspdarknet53", {}), ("mobilenet_v1", {}), ("shufflenet_v1_g3", {}),
    ("shake_shake_26_2x32d", {}),
    # Keras' ResNet: BatchNorm folded into convs that have a bias already; Xception's
    # separable convs (the BatchNorm folds into the pointwise half).
    ("keras_resnet50", {"layers": (1, 1, 1, 1)}), ("xception", {"middle_blocks": 1}),
    ("p3d_resnet50", {}),
    # A detector (a BiFPN and heads of 1 repeat and 16 channels: the pairs are the same kinds).
    ("efficientdet_d0", {"fpn_width": 16, "fpn_cells": 1, "head_repeats": 1}),
]
# BatchNorms with no conv right before them: they become affines (x * scale + offset).
UNFOLDABLE = {
    "densenet121": r".*/(norm1|norm5|transition\d/norm)$",   # pre-activation, after a concat
    "densenet_bc_100_12": r".*/(norm1|norm5|transition\d/norm)$",
    "shake_shake_26_2x32d": r".*/shortcut_bn$",              # after the two paths' concat
    # One head conv shared by every level, each level with its own BatchNorm.
    "efficientdet_d0": r".*/(class|box)_net/bn_rep_\d+_\d+$",
}


@pytest.fixture(autouse=True)
def native_convs(monkeypatch):
    # Fusion does not depend on how convs are lowered; XLA's own grouped convs compile 3-5x
    # faster than the CPU lowering's per-group convs (ResNeXt: 46 s -> 8 s).
    monkeypatch.setenv("NETS_CONV_LOWERING", "native")


def _variables(name, overrides, size=32):
    f = nets.transformed(name, 10, **overrides)
    example = nets.introspect.example_images(name, 2, size, **overrides)
    params, state = random_variables(f, example)
    images = np.random.RandomState(0).randn(*example.shape).astype(np.float32)
    return f, params, state, images


@pytest.mark.parametrize("name,overrides", MODELS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={v}" for k, v in v.items()).replace(" ", ""))
def test_fused_model_computes_the_eval_mode_function(name, overrides):
    f, params, state, images = _variables(name, overrides)
    fused_params, fused_state = nets.fusion.fuse(name, params, state, **overrides)
    fused = nets.transformed(name, 10, fused=True, **overrides)

    # The fused trees are exactly what the fused model builds: no BatchNorm statistics, a bias
    # on each conv a BatchNorm was folded into, the unfoldable ones as scale/offset.
    expected = jax.eval_shape(lambda x: fused.init(jax.random.key(0), x, is_training=False),
                              images)
    assert jax.tree.map(lambda a: a.shape, (fused_params, fused_state)) == jax.tree.map(
        lambda s: s.shape, expected)
    assert fused_state == {}
    plan = nets.fusion.plan(name, 10, **overrides)
    assert len(plan.folded) > 0 and len(plan.folded) + len(plan.affine) == len(state)
    pattern = UNFOLDABLE.get(name, r"$^")
    assert sorted(plan.affine) == sorted(m for m in state if re.match(pattern, m))
    for bn, conv in plan.folded.items():
        assert bn not in fused_params and "b" in fused_params[conv]

    apply = jax.jit(f.apply, static_argnames="is_training")
    logits, _ = apply(params, state, None, images, is_training=False)
    fused_logits, _ = jax.jit(fused.apply, static_argnames="is_training")(
        fused_params, fused_state, None, images, is_training=False)
    outputs = jax.tree.leaves(logits)   # a detector's: per-level class and box maps
    assert max(float(np.abs(x).max()) for x in outputs) > 0.1   # a function worth comparing
    for fused_output, output in zip(jax.tree.leaves(fused_logits), outputs, strict=True):
        np.testing.assert_allclose(fused_output, output, atol=1e-5, rtol=0)


def test_fused_features():
    # (A conv that has its own bias before its BatchNorm - ResNeSt's fc1 - is in MODELS.)
    name = "resnet18"
    f = nets.transformed_features(name)
    example = nets.introspect.example_images(name, 2, 32)
    params, state = random_variables(f, example)
    images = np.random.RandomState(0).randn(*example.shape).astype(np.float32)
    maps, _ = jax.jit(f.apply, static_argnames="is_training")(params, state, None, images,
                                                              is_training=False)
    fused_params, fused_state = nets.fusion.fuse(name, params, state)  # no head: num_classes 0
    fused = nets.transformed_features(name, fused=True)
    fused_maps, _ = jax.jit(fused.apply, static_argnames="is_training")(
        fused_params, fused_state, None, images, is_training=False)
    assert set(fused_maps) == set(maps) == {"stage1", "stage2", "stage3", "stage4"}
    for k in maps:
        np.testing.assert_allclose(fused_maps[k], maps[k], atol=1e-5, rtol=0)


def test_fused_model_refuses_training_and_foreign_weights():
    name = "mobilenet_v1_025"
    f = nets.transformed(name, 10)
    example = nets.introspect.example_images(name, 1, 32)
    params, state = random_variables(f, example)
    fused_params, fused_state = nets.fusion.fuse(name, params, state)
    fused = nets.transformed(name, 10, fused=True)
    with pytest.raises(ValueError, match="inference only; call it with is_training=False"):
        jax.eval_shape(lambda p, s, x: fused.apply(p, s, None, x, is_training=True),
                       fused_params, fused_state, example)
    other_params, other_state = random_variables(nets.transformed("mobilenet_v2", 10), example)
    with pytest.raises(ValueError, match="not those of mobilenet_v1_025.*BatchNorms"):
        nets.fusion.fuse(name, other_params, other_state)


def test_models_without_batchnorm_fuse_to_themselves():
    params, state = nets.introspect.shapes("nfnet_f0", 10)
    plan = nets.fusion.plan("nfnet_f0", 10)
    assert plan.folded == {} and plan.eps == {}
    fused_params, fused_state = nets.fusion.fuse("nfnet_f0", params, state)
    assert jax.tree.structure(fused_params) == jax.tree.structure(params)


def test_fuse_command_writes_weights_of_the_fused_model(tmp_path, capsys):
    name = "mobilenet_v1_025"
    f, params, state, images = _variables(name, {})
    source, out = tmp_path / "w.safetensors", tmp_path / "fused.safetensors"
    nets.weights.save(source, params, state, model=name)
    fuse_tool.main(["--weights", str(source), "--out", str(out)])
    assert "27 BatchNorms folded into their convs, 0 kept as affines" in capsys.readouterr().out
    meta = nets.weights.read_metadata(out)
    assert (meta["model"], meta["num_classes"], meta["overrides"]) == (name, 10, {"fused": True})
    fused_params, fused_state = nets.weights.load(out)   # checked against the fused model
    fused = nets.transformed(name, 10, **meta["overrides"])
    logits, _ = jax.jit(f.apply, static_argnames="is_training")(params, state, None, images,
                                                                is_training=False)
    fused_logits, _ = jax.jit(fused.apply, static_argnames="is_training")(
        fused_params, fused_state, None, images, is_training=False)
    np.testing.assert_allclose(fused_logits, logits, atol=1e-5, rtol=0)
    # tools.export takes the fused file as it is.
    artifact = tmp_path / "m.jaxexport"
    export_tool.main([name, "--weights", str(out), "--out", str(artifact), "--size", "32"])
    exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    np.testing.assert_allclose(exported.call(images), logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already fused"):
        fuse_tool.fuse_file(str(out), str(tmp_path / "again.safetensors"))
