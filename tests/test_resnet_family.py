"""ResNet family: parameter counts, options, and the ResNeXt equal-complexity templates."""

import haiku as hk
import jax
import numpy as np
import pytest

import nets
from tests.helpers import count, jitted_apply, random_images

RESNETS = [n for n in nets.list_models() if nets.model_info(n).family == "resnet"]
WITH_REFERENCE = [n for n in RESNETS if nets.model_info(n).reference_params is not None]


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_parameter_and_bn_statistic_counts_equal_the_reference(name):
    info = nets.model_info(name)
    params, state = nets.convert.shapes(name, 1000)
    no_head, _ = nets.convert.shapes(name, 0)
    assert count(params) == info.reference_params
    assert count(no_head) == info.reference_params_no_head
    assert count(state) == info.reference_bn_stat_elems
    assert set(jax.tree.leaves(jax.tree.map(lambda s: s.ndim, state))) == {1}


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_registry_counts_are_those_of_the_shared_reference_table(name, reference_counts):
    info = nets.model_info(name)
    source, ref_name = info.reference.split(":")
    row = reference_counts[(source, ref_name)]
    assert (info.reference_params, info.reference_params_no_head,
            info.reference_bn_stat_elems) == (row["params_with_head"], row["params_no_head"],
                                              row["bn_stat_elems"])


def _bottleneck_resnet_count(layers, groups, width_per_group, num_classes=1000):
    """Parameters of a torchvision-style bottleneck ResNet, counted by hand from the paper's
    table: 7x7 stem, per block 1x1 -> grouped 3x3 -> 1x1 (each with BN), projection shortcut on
    the first block of every stage, linear head."""
    total, c_in = 7 * 7 * 3 * 64 + 2 * 64, 64
    for planes, depth in zip((64, 128, 256, 512), layers):
        width, out = planes * width_per_group // 64 * groups, planes * 4
        for i in range(depth):
            total += c_in * width + 2 * width
            total += 9 * (width // groups) * width + 2 * width
            total += width * out + 2 * out
            if i == 0:
                total += c_in * out + 2 * out
            c_in = out
    return total + (2048 * num_classes + num_classes if num_classes else 0)


@pytest.mark.parametrize("groups,width_per_group,stage1_width",
                         [(1, 64, 64), (2, 40, 80), (4, 24, 96), (8, 14, 112), (32, 4, 128)])
def test_resnext_equal_complexity_templates(groups, width_per_group, stage1_width):
    name = f"resnext50_{groups}x{width_per_group}d"
    params, _ = nets.convert.shapes(name, 1000)
    assert params["resnet/layer1_0/conv2"]["w"].shape == (3, 3, stage1_width // groups,
                                                          stage1_width)
    assert count(params) == _bottleneck_resnet_count((3, 4, 6, 3), groups, width_per_group)
    # "Nearly equal complexity" (the paper's 25.5M vs 25.0M): within 3% of ResNet-50.
    assert abs(count(params) / nets.model_info("resnet50").reference_params - 1) < 0.03


def test_the_hand_count_reproduces_torchvision_resnet50():
    assert _bottleneck_resnet_count((3, 4, 6, 3), 1, 64) == 25_557_032
    assert _bottleneck_resnet_count((3, 4, 23, 3), 32, 8) == 88_791_336


@pytest.mark.parametrize("dilate,stride", [((False, False, True), 16),
                                           ((False, True, True), 8)])
def test_replace_stride_with_dilation_gives_output_stride(dilate, stride):
    f = nets.transformed_features("resnet50", replace_stride_with_dilation=dilate)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   images)
    maps, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                             params, state, images)
    assert maps["stage4"].shape == (1, 64 // stride, 64 // stride, 2048)
    assert count(params) == nets.model_info("resnet50").reference_params_no_head


def test_zero_init_residual_zeroes_the_last_bn_scale_of_every_block():
    f = nets.transformed("resnet18", num_classes=10, zero_init_residual=True)
    params, _ = f.init(jax.random.key(0), random_images(1, 32), is_training=True)
    last = {k: v for k, v in params.items() if k.endswith("/bn2")}
    assert len(last) == 8 and all(np.all(v["scale"] == 0) for v in last.values())
    assert np.all(params["resnet/layer1_0/bn1"]["scale"] == 1)
    default, _ = nets.transformed("resnet18", 10).init(jax.random.key(0), random_images(1, 32),
                                                       is_training=True)
    assert np.all(default["resnet/layer1_0/bn2"]["scale"] == 1)


def test_torchvision_init_is_he_normal_fan_out():
    params, _ = nets.transformed("resnet50").init(jax.random.key(0), random_images(1, 32),
                                                  is_training=True)
    w = np.asarray(params["resnet/layer3_0/conv2"]["w"])  # 3x3, 256 -> 256
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 256)), rtol=0.02)


def test_stochastic_depth_rates_decay_linearly_to_the_last_block():
    def rates(**kw):
        return hk.transform(lambda: nets.create("resnet50", **kw).block_rates()).apply({}, None)

    linear = rates(stochastic_depth_rate=0.2)
    assert len(linear) == 16
    np.testing.assert_allclose(linear, [0.2 * block / 16 for block in range(1, 17)])
    assert rates(stochastic_depth_rate=0.2, stochastic_depth_decay="uniform") == [0.2] * 16


def test_stochastic_depth_is_random_in_training_and_inactive_in_eval():
    images = random_images(2, 32)
    f = nets.transformed("resnet18", num_classes=10, stochastic_depth_rate=0.5)
    params, state = f.init(jax.random.key(0), images, is_training=True)
    train = jitted_apply("resnet18", 10, stochastic_depth_rate=0.5)
    a, _ = train(params, state, jax.random.key(1), images, is_training=True)
    b, _ = train(params, state, jax.random.key(2), images, is_training=True)
    assert not np.allclose(a, b)
    plain = jitted_apply("resnet18", 10)
    np.testing.assert_allclose(train(params, state, None, images, is_training=False)[0],
                               plain(params, state, None, images, is_training=False)[0],
                               rtol=1e-6, atol=1e-6)
    paper = jitted_apply("resnet18", 10, stochastic_depth_rate=0.5,
                         stochastic_depth_scale_at="test")
    assert not np.allclose(paper(params, state, None, images, is_training=False)[0],
                           plain(params, state, None, images, is_training=False)[0])


def test_bad_option_values_are_rejected():
    images = random_images(1, 32)
    for bad, match in [(dict(block="wide"), "block must be"), (dict(stem="9x9"), "stem must"),
                       (dict(attention="cbam"), "unknown attention"),
                       (dict(replace_stride_with_dilation=(True,)), "one flag")]:
        with pytest.raises(ValueError, match=match):
            nets.transformed("resnet50", **bad).init(jax.random.key(0), images,
                                                     is_training=True)
