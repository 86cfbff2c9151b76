"""ResNet family: parameter counts, options, and the ResNeXt equal-complexity templates."""

import haiku as hk
import jax
import numpy as np
import pytest

import nets
from tests.helpers import (count, jitted_apply, random_images)

RESNETS = [n for n in nets.list_models() if nets.model_info(n).family == "resnet"]
WITH_REFERENCE = [n for n in RESNETS if nets.model_info(n).reference_params is not None]


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
    params, _ = nets.introspect.shapes(name, 1000)
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
    for bad, match in [(dict(block="wide"), "block must be one of"),
                       (dict(stem="9x9"), "stem must be one of"),
                       (dict(attention="nonlocal"), "attention must be one of"),
                       (dict(attention_stages=(0, 1)), "1-based stage numbers"),
                       (dict(radix=0), "radix must be"),
                       (dict(selective_kernel=True, radix=2), "one of selective-kernel"),
                       (dict(radix=2, deformable_stages=(4,)), "split-attention and deform"),
                       (dict(replace_stride_with_dilation=(True,)), "one flag")]:
        with pytest.raises(ValueError, match=match):
            nets.transformed("resnet50", **bad).init(jax.random.key(0), images,
                                                     is_training=True)
    with pytest.raises(ValueError, match="need the bottleneck block"):
        nets.transformed("resnet18", radix=2).init(jax.random.key(0), images, is_training=True)


@pytest.mark.parametrize("name", RESNETS)
def test_features_are_four_stages_at_strides_4_to_32(name):
    info = nets.model_info(name)
    f = nets.transformed_features(name)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   images)
    maps, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                             params, state, images)
    expansion = 1 if info.config.get("block") == "basic" else 4
    assert info.feature_strides == (4, 8, 16, 32)
    assert {k: v.shape for k, v in maps.items()} == {
        f"stage{i + 1}": (1, 64 // stride, 64 // stride, 64 * 2**i * expansion)
        for i, stride in enumerate(info.feature_strides)}


# ResNeSt, SKNet, GCNet, CBAM ----------------------------------------------------------------

SHALLOW = dict(layers=(1, 1, 1, 1))


@pytest.mark.parametrize("groups,width_per_group", [(1, 64), (32, 4)])
def test_resnest_with_radix_1_is_resnet_d_and_resnext_d(groups, width_per_group):
    """Radix 1 and cardinality 1 is the plain bottleneck, cardinality > 1 ResNeXt's: the same
    parameters and the same function (with avd off: avg-pool downsampling inside the block is
    ResNeSt's, not the radix's)."""
    plain = dict(groups=groups, width_per_group=width_per_group, **SHALLOW)
    resnest = dict(radix=1, avd=False, **plain)
    assert jax.tree.map(np.shape, nets.introspect.shapes("resnest50d", 10, **resnest)) == \
        jax.tree.map(np.shape, nets.introspect.shapes("resnet50d", 10, **plain))
    images = random_images(2, 32)
    params, state = jax.jit(nets.transformed("resnet50d", 10, **plain).init,
                            static_argnames="is_training")(jax.random.key(0), images,
                                                           is_training=True)
    state = jax.tree.map(lambda v: v + 0.1, state)
    expected, _ = jitted_apply("resnet50d", 10, **plain)(params, state, None, images,
                                                         is_training=False)
    got, _ = jitted_apply("resnest50d", 10, **resnest)(params, state, None, images,
                                                       is_training=False)
    np.testing.assert_array_equal(got, expected)
    # Radix 2 (or one split with the attention kept) adds the split-attention layers.
    for split in (dict(radix=2), dict(split_attention=True)):
        params, _ = nets.introspect.shapes("resnest50d", 10, **{**resnest, **split})
        assert {"resnet/layer1_0/conv2/fc1", "resnet/layer1_0/conv2/bn1"} <= set(params)


def test_resnest_split_attention_widths():
    params, _ = nets.introspect.shapes("resnest50d", 10)
    assert params["resnet/layer2_0/conv2/conv"]["w"].shape == (3, 3, 64, 256)  # radix 2 x 128
    params, _ = nets.introspect.shapes("resnest50d_1s4x24d", 10)
    # One split: fc1 grouped by the 4 cardinal groups, width max(96 / 4, 32) (the reference's
    # minimum); the 3x3 pools before it (avd_first), so the 3x3 itself is stride 1.
    assert params["resnet/layer1_0/conv2/fc1"]["w"].shape == (1, 1, 96 // 4, 32)
    assert params["resnet/layer2_0/conv2/conv"]["w"].shape == (3, 3, 192 // 4, 192)


@pytest.mark.parametrize("name,attn_width", [("skresnet18", 16), ("skresnet50", 8),
                                             ("skresnext50_32x4d", 32)])
def test_selective_kernel_fuse_width_is_max_of_c_over_r_and_l(name, attn_width):
    params, _ = nets.introspect.shapes(name, 10)
    first = "conv1" if nets.model_info(name).config.get("block") == "basic" else "conv2"
    reduce = params[f"resnet/layer1_0/{first}/attn/fc_reduce"]["w"]
    assert reduce.shape[-1] == attn_width
    # two paths: a 3x3 and a dilated 3x3 standing for the 5x5
    paths = {k for k in params if f"layer1_0/{first}/paths_" in k and k.endswith("/conv")}
    assert len(paths) == 2


def test_gcnet_places_global_context_blocks_in_stages_2_to_4_only():
    params, _ = nets.introspect.shapes("gcnet_resnet50", 10)
    with_gc = {k.split("/")[1] for k in params if "/gc/" in k}
    assert with_gc == {f"layer{s}_{i}" for s, n in ((2, 4), (3, 6), (4, 3)) for i in range(n)}
    # bottleneck transform C -> C/16 -> C with a LayerNorm, attention pooling C -> 1
    assert params["resnet/layer4_0/gc/mlp_add/fc1"]["w"].shape == (1, 1, 2048, 128)
    assert params["resnet/layer4_0/gc/mlp_add/norm"]["scale"].shape == (128,)
    assert params["resnet/layer4_0/gc/conv_attn"]["w"].shape == (1, 1, 2048, 1)


def test_global_context_starts_as_the_identity_or_a_half_gate():
    """The transform's last conv starts at zero (the authors' init): fusion by addition is the
    identity at init, the scale form a constant 0.5 gate. (Its numerics are checked against
    timm's GlobalContext in test_resnet_reference.)"""
    x = random_images(2, 6, channels=8)
    for fusion, expected in (("add", x), ("scale", 0.5 * x)):
        f = hk.transform(lambda x, fusion=fusion: nets.attention.GlobalContext(2, fusion)(x))
        params = jax.jit(f.init)(jax.random.key(0), x)
        assert np.abs(params["global_context/conv_attn"]["w"]).max() > 0
        np.testing.assert_allclose(jax.jit(f.apply)(params, None, x), expected, rtol=1e-6)


def test_cbam_is_timms_module_on_every_bottleneck():
    params, _ = nets.introspect.shapes("cbam_resnet50", 10)
    blocks = {k.split("/")[1] for k in params if "/cbam/" in k}
    assert len(blocks) == 16
    assert params["resnet/layer1_0/cbam/channel/fc1"]["w"].shape == (1, 1, 256, 16)
    assert params["resnet/layer1_0/cbam/spatial/conv"]["w"].shape == (7, 7, 2, 1)
    assert "b" not in params["resnet/layer1_0/cbam/channel/fc1"]


def test_deformable_stage_4_starts_as_half_the_regular_3x3():
    """deformable_stages=(4,): the 3x3 convs of stage 4 become modulated deformable convs whose
    offset/mask predictor (mmcv's `conv2.conv_offset`) starts at zero, i.e. offsets 0 and
    modulation 0.5: the network equals the plain one with those 3x3 kernels halved."""
    plain = dict(layers=(1, 1, 1, 2))
    images = random_images(2, 32)
    params, state = jax.jit(nets.transformed("resnet50", 10, **plain).init,
                            static_argnames="is_training")(jax.random.key(0), images,
                                                           is_training=True)
    state = jax.tree.map(lambda v: v + 0.1, state)
    shapes, _ = nets.introspect.shapes("resnet50", 10, deformable_stages=(4,), **plain)
    added = set(shapes) - set(params)
    assert added == {"resnet/layer4_0/conv2/conv_offset", "resnet/layer4_1/conv2/conv_offset"}
    assert shapes["resnet/layer4_0/conv2/conv_offset"]["w"].shape == (3, 3, 512, 27)
    zeros = lambda s: np.zeros(s.shape, s.dtype)  # noqa: E731
    deformable = {**params, **{k: jax.tree.map(zeros, shapes[k]) for k in added}}
    halved = {k: {"w": v["w"] / 2} if k.startswith("resnet/layer4") and k.endswith("/conv2")
              else v for k, v in params.items()}
    expected, _ = jitted_apply("resnet50", 10, **plain)(halved, state, None, images,
                                                        is_training=False)
    got, _ = jitted_apply("resnet50", 10, deformable_stages=(4,), **plain)(
        deformable, state, None, images, is_training=False)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert nets.model_info("resnet50").torch_name("layer4_0.conv2.conv_offset", {}) == \
        "layer4.0.conv2.conv_offset"
