import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets


def test_list_models_is_sorted_and_filters_by_fnmatch_pattern():
    names = nets.list_models()
    assert names == sorted(names)
    assert {"resnet18", "resnet50", "resnext50_32x4d", "seresnet50", "resnet50d"} <= set(names)
    assert nets.list_models("resnext*") == [n for n in names if n.startswith("resnext")]
    assert nets.list_models("*resnet*50*") == sorted(n for n in names if "resnet" in n
                                                    and "50" in n)


def test_model_info_carries_the_reference_and_its_resolution():
    info = nets.model_info("resnet50")
    assert (info.name, info.family, info.reference) == ("resnet50", "resnet",
                                                        "torchvision:resnet50")
    assert (info.train_size, info.test_size) == (224, 224)
    assert info.reference_params == 25_557_032
    assert info.preprocessing.mean == (0.485, 0.456, 0.406)


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet05'.*Did you mean: .*resnet50"):
        nets.model_info("resnet05")
    with pytest.raises(ValueError, match="unknown model"):
        nets.transformed("not_a_model")


def test_unknown_override_is_an_error_with_a_suggestion():
    with pytest.raises(TypeError, match=r"no option 'stochastic_depth'.*stochastic_depth_rate"):
        nets.transformed("resnet50", stochastic_depth=0.1)
    with pytest.raises(TypeError, match="no option 'widht_per_group'"):
        nets.create("resnet50", widht_per_group=4)


def _init(images, name="resnet18"):
    f = nets.transformed(name, num_classes=10)
    return f.init(jax.random.key(0), images, is_training=True)


def test_wrong_rank_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"expects float images of shape \[batch, height, width, "
                                         r"channels\] with 3 channels; got an array of rank 3"):
        _init(jnp.zeros((32, 32, 3)))


def test_channels_first_images_get_a_transpose_hint():
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 32, 32\) with 32 channels.*"
                                         r"transpose NCHW to NHWC"):
        _init(jnp.zeros((2, 3, 32, 32)))


def test_wrong_channel_count_is_an_error_and_in_channels_overrides_it():
    with pytest.raises(ValueError, match="with 3 channels; got shape .* with 1 channels"):
        _init(jnp.zeros((2, 32, 32, 1)))
    f = nets.transformed("resnet18", num_classes=10, in_channels=1)
    params, _ = f.init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)), is_training=True)
    assert params["resnet/conv1"]["w"].shape == (7, 7, 1, 64)


def test_integer_images_are_rejected():
    with pytest.raises(ValueError, match="dtype uint8"):
        _init(jnp.zeros((2, 32, 32, 3), jnp.uint8))


def test_features_are_the_four_stages_at_strides_4_to_32():
    f = nets.transformed_features("resnet50")
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   images)
    maps, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                             params, state, images)
    assert {k: v.shape for k, v in maps.items()} == {
        "stage1": (1, 16, 16, 256), "stage2": (1, 8, 8, 512),
        "stage3": (1, 4, 4, 1024), "stage4": (1, 2, 2, 2048)}
    assert nets.model_info("resnet50").feature_strides == (4, 8, 16, 32)


def test_logits_are_float32_under_bfloat16_compute():
    f = nets.transformed("resnet18", num_classes=10)
    images = np.zeros((1, 32, 32, 3), np.float32)
    params, state = f.init(jax.random.key(0), images, is_training=True)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    logits = jax.eval_shape(
        lambda p, s, x: f.apply(p, s, None, x, is_training=True)[0], params, state,
        jnp.asarray(images, jnp.bfloat16))
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name,source", [("resnet50", "torchvision"),
                                         ("efficientnet_b0", "torchvision"),
                                         ("mobilenet_v2", "torchvision"),
                                         ("mobilenet_v3_small", "torchvision"),
                                         ("shufflenet_v2_x1_0", "torchvision"),
                                         ("resnest50d", "timm"),
                                         ("skresnext50_32x4d", "timm"),
                                         ("cbam_resnet50", "timm-constructed"),
                                         ("cspresnext50", "timm"),
                                         ("densenet121", "torchvision")])
def test_multiply_adds_equal_the_reference_table(name, source, reference_counts):
    from bench.inference import multiply_adds

    row = reference_counts[(source, name)]
    assert multiply_adds(name, row["input_res"]) / 1e9 == pytest.approx(row["gmacs"], abs=6e-4)


def test_the_head_is_the_declared_classifier_under_the_root():
    assert nets.head_module("resnet50") == "resnet/fc"
    assert nets.head_module("nfnet_f0") == "nfnet/linear"
    assert nets.head_module("efficientnet_b0") == "efficientnet/predictions"
    params, _ = nets.introspect.shapes("resnet18", 10)
    assert nets.introspect.num_classes_of("resnet18", params) == 10
    no_head, _ = nets.introspect.shapes("resnet18", 0)
    assert nets.introspect.num_classes_of("resnet18", no_head) == 0


def test_a_model_without_a_classifier_declares_none():
    import dataclasses

    from nets import registry

    info = dataclasses.replace(nets.model_info("resnet18"), name="headless_test",
                               classifier=None, task="detection",
                               preprocessing=nets.Preprocessing(crop_fraction=None))
    registry._MODELS[info.name] = info
    try:
        assert nets.head_module("headless_test") is None
        params, _ = nets.introspect.shapes("headless_test", 10)
        roles = nets.param_roles("headless_test", params)
        assert "classifier_weight" not in jax.tree.leaves(roles)
    finally:
        del registry._MODELS[info.name]


def test_roles_come_from_one_vocabulary_and_unknown_leaves_say_where_to_declare():
    params, _ = nets.introspect.shapes("resnet18", 10)
    roles = nets.param_roles("resnet18", params)
    assert set(jax.tree.leaves(roles)) <= set(nets.ROLES)
    assert roles["resnet/fc"] == {"w": "classifier_weight", "b": "classifier_bias"}
    odd = {**params, "resnet/odd": {"alpha": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=r"resnet18.*resnet/odd/alpha.*'alpha'.*LEAF_ROLES"):
        nets.param_roles("resnet18", odd)
    nets.declare_leaf_role("alpha", "gain")
    try:
        assert nets.param_roles("resnet18", odd)["resnet/odd"] == {"alpha": "gain"}
        with pytest.raises(ValueError, match="already has the role"):
            nets.declare_leaf_role("alpha", "weight")
    finally:
        del nets.LEAF_ROLES["alpha"]
    with pytest.raises(ValueError, match="role 'classifier_weight'"):
        nets.declare_leaf_role("beta", "classifier_weight")
