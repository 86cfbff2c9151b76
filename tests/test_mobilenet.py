"""MobileNet V1/V2/V3: counts, options, and outputs equal torchvision's on converted weights.
The Keras variants against keras.applications: tests/test_keras_reference.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import mobilenet
from tests import reference
from tests.helpers import count, jitted_apply, jitted_logits_and_features, random_images

MOBILENETS = [n for n in nets.list_models() if nets.model_info(n).family == "mobilenet"]
WITH_REFERENCE = [n for n in MOBILENETS if nets.model_info(n).reference_params is not None]
# The reference table's rows: timm's mobilenetv1_100 has Keras MobileNet's parameters.
TABLE_ROW = {"mobilenet_v1": ("timm", "mobilenetv1_100")}


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_registry_figures_are_the_reference_table_rows(name, reference_counts):
    """tests/test_all_models.py counts ours against the registry's figures."""
    info = nets.model_info(name)
    if info.train_size != 224:  # a resolution variant: its 224-px network's row
        name = name.rsplit("_", 1)[0]
    arch = name.removeprefix("keras_")
    row = reference_counts[TABLE_ROW.get(name, ("torchvision", arch))]
    assert info.reference_params == row["params_with_head"]
    # MobileNetV3 without head keeps the pre-logits layer (timm's and the table's convention).
    assert info.reference_params_no_head == row["params_no_head"]
    assert info.reference_bn_stat_elems == row["bn_stat_elems"]


def test_keras_and_torchvision_variants_differ_only_in_conventions():
    for arch in ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"):
        torch_cfg, keras_cfg = (nets.model_info(n).config for n in (arch, f"keras_{arch}"))
        assert torch_cfg.get("padding", "torch") == "torch" and keras_cfg["padding"] == "same"
        assert keras_cfg["unbiased_running_var"] is False
    assert nets.model_info("keras_mobilenet_v3_small").config["bn_decay"] == 0.999
    assert nets.model_info("keras_mobilenet_v2").preprocessing.mean == (0.5, 0.5, 0.5)


def test_mobilenet_v2_block_table_and_shortcuts():
    rows = mobilenet.v2_blocks(1.0)
    assert len(rows) == 17
    assert [r[2] for r in rows] == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160,
                                    160, 160, 320]
    assert rows[0][1] == 32 and rows[1][1] == 96  # t=1 keeps 32 channels; t=6 expands 16 to 96
    params, _ = nets.introspect.shapes("mobilenet_v2")
    assert "mobilenet_v2/block0/expand_conv" not in params
    assert params["mobilenet_v2/head_conv"]["w"].shape == (1, 1, 320, 1280)
    # width multipliers round to multiples of 8; the head widens only above 1.0
    assert [r[2] for r in mobilenet.v2_blocks(0.35)][:4] == [8, 8, 8, 16]
    wide, _ = nets.introspect.shapes("mobilenet_v2", alpha=1.4)
    assert wide["mobilenet_v2/head_conv"]["w"].shape[-1] == 1792


def test_mobilenet_v3_se_widths_and_reduced_tail():
    rows = mobilenet.v3_blocks("large", 1.0, False)
    assert [r[4] for r in rows if r[4]] == [24, 32, 32, 120, 168, 168, 240, 240]
    tail = mobilenet.v3_blocks("large", 1.0, True)
    assert [r[1:3] for r in tail[-3:]] == [(672, 80), (480, 80), (480, 80)]


def _torch_model(name, **kwargs):
    torch = reference.torch()
    torch.manual_seed(0)
    model = getattr(reference.torchvision().models, name)(**kwargs).eval()
    reference.randomize_batchnorm(model)
    with torch.no_grad():  # torchvision's N(0, 0.01) classifier gives tiny logits; widen it
        for module in model.classifier.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(30.0)
    return model


def test_reduced_tail_counts_equal_torchvision():
    model = _torch_model("mobilenet_v3_large", reduced_tail=True)
    params, state = nets.introspect.shapes("mobilenet_v3_large", reduced_tail=True)
    assert count(params) == sum(p.numel() for p in model.parameters())
    assert count(state) == sum(b.numel() for n, b in model.named_buffers() if "running" in n)


def _torch_stage_outputs(model, images, stage_indices):
    """Logits and the outputs of model.features[i] for each stage (forward hooks)."""
    torch = reference.torch()
    maps = {}
    hooks = [model.features[i].register_forward_hook(
        lambda m, inp, out, key=key: maps.__setitem__(key, out.numpy().transpose(0, 2, 3, 1)))
        for key, i in stage_indices.items()]
    with torch.no_grad():
        logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    for hook in hooks:
        hook.remove()
    return logits, maps


# features[i] is block i - 1; the last block at strides 8, 16, 32.
STAGES = {"mobilenet_v2": {"stage2": 6, "stage3": 13, "stage4": 17},
          "mobilenet_v3_large": {"stage2": 6, "stage3": 12, "stage4": 15},
          "mobilenet_v3_small": {"stage2": 3, "stage3": 8, "stage4": 11}}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_logits_and_stage_maps_equal_torchvision(name):
    model = _torch_model(name)
    images = random_images(2, 64)
    ref_logits, ref_maps = _torch_stage_outputs(model, images, STAGES[name])
    params, state = nets.convert.from_torch(name, model.state_dict())
    (logits, maps), _ = jitted_logits_and_features(name)(params, state, None, images)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    for stage, ref_map in ref_maps.items():
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


def test_mobilenet_v3_large_equals_torchvision_at_224_px():
    model = _torch_model("mobilenet_v3_large")
    images = random_images(1, 224, seed=1)
    ref_logits, _ = _torch_stage_outputs(model, images, {})
    params, state = nets.convert.from_torch("mobilenet_v3_large", model.state_dict())
    logits, _ = jitted_apply("mobilenet_v3_large")(params, state, None, images,
                                                   is_training=False)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


def test_training_mode_outputs_and_running_statistics_equal_torchvision():
    torch = reference.torch()
    model = _torch_model("mobilenet_v3_small").train()
    model.classifier[2].p = 0.0  # dropout is random in both; compare the rest
    images = random_images(4, 64, seed=3)
    params, state = nets.convert.from_torch("mobilenet_v3_small", model.state_dict())
    f = jitted_apply("mobilenet_v3_small", dropout_rate=0.0)
    logits, new_state = f(params, state, None, images, is_training=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    _, ref_state = nets.convert.from_torch("mobilenet_v3_small", model.state_dict())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 new_state, ref_state)


def test_a_state_dict_of_another_architecture_is_rejected_with_the_difference():
    small = _torch_model("mobilenet_v3_small")
    with pytest.raises(ValueError, match="(?s)cannot convert this state dict into "
                                         "mobilenet_v3_large.*shape mismatch"):
        nets.convert.from_torch("mobilenet_v3_large", small.state_dict())


def test_pre_logits_false_returns_the_pooled_head_conv():
    f = nets.transformed("mobilenet_v3_small", 0, pre_logits=False)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   images)
    out, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                            params, state, images)
    assert out.shape == (1, 576) and "mobilenet_v3/pre_logits" not in params


def test_mobilenet_v1_alpha_scales_every_width():
    params, _ = nets.introspect.shapes("mobilenet_v1_025")
    assert params["mobilenet_v1/conv1"]["w"].shape == (3, 3, 3, 8)
    assert params["mobilenet_v1/conv_pw_13"]["w"].shape == (1, 1, 256, 256)
    assert params["mobilenet_v1/conv_dw_12"]["w"].shape == (3, 3, 1, 128)
