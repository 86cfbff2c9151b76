"""The Keras-ported variants equal keras.applications (JAX backend, weights=None, BatchNorm
statistics randomised) on weights converted with `nets.convert.from_keras`: logits at 224 px and
the maps at strides 8, 16, 32; and every weight format from_keras reads."""

import jax
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import count, jitted_apply, random_images

# Our variant -> (Keras constructor, input scale, the Keras layers our stages 2-4 equal).
# Keras' EfficientNet rescales its input by 1/255 itself (its Normalization layer is the
# identity with weights=None); ours takes normalised images.
CASES = {
    "efficientnet_b0": ("EfficientNetB0", 255.0, ("block3b_add", "block5c_add",
                                                  "block7a_project_bn")),
    "mobilenet_v1": ("MobileNet", 1.0, ("conv_pw_5_relu", "conv_pw_11_relu", "conv_pw_13_relu")),
    "keras_mobilenet_v2": ("MobileNetV2", 1.0, ("block_5_add", "block_12_add",
                                                "block_16_project_BN")),
    "keras_mobilenet_v3_small": ("MobileNetV3Small", 1.0, ("expanded_conv_2_add",
                                                           "expanded_conv_7_add",
                                                           "expanded_conv_10_add")),
}


def _keras_model(constructor, size=224, **kwargs):
    keras = reference.keras()
    if constructor.startswith("MobileNetV3"):
        kwargs.setdefault("include_preprocessing", False)
    if kwargs.get("include_top", True):
        kwargs.setdefault("classifier_activation", None)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, constructor)(weights=None,
                                                     input_shape=(size, size, 3), **kwargs)
    reference.randomize_keras_batchnorm(model)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_stage_maps_equal_keras_at_224_px(name):
    keras = reference.keras()
    constructor, scale, stage_layers = CASES[name]
    model = _keras_model(constructor)
    outputs = [model.output] + [model.get_layer(layer).output for layer in stage_layers]
    probe = keras.Model(model.inputs, outputs)
    images = random_images(1, 224)
    ref_logits, *ref_maps = (np.asarray(o) for o in probe(images * scale, training=False))

    params, state = nets.convert.from_keras(name, model)
    logits, _ = jitted_apply(name)(params, state, None, images, is_training=False)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    head = nets.model_info(name).classifier
    body = {k: v for k, v in params.items() if not k.endswith(f"/{head}")}
    maps, _ = jitted_apply(name, features=True)(body, state, None, images, is_training=False)
    for stage, ref_map, stride in zip(("stage2", "stage3", "stage4"), ref_maps, (8, 16, 32)):
        assert ref_map.shape[1] == 224 // stride
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


def _same_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def small_v3():
    """A MobileNetV3Small with a 10-class head (built at 32 px; weights do not depend on it)."""
    return _keras_model("MobileNetV3Small", size=32, classes=10)


def test_keras_files_convert_like_the_model(small_v3, tmp_path):
    keras = reference.keras()
    from keras.src.legacy.saving import legacy_h5_format
    import h5py

    expected = nets.convert.from_keras("keras_mobilenet_v3_small", small_v3)
    assert expected[0]["mobilenet_v3/classifier"]["w"].shape == (1024, 10)
    small_v3.save(tmp_path / "model.keras")
    small_v3.save(tmp_path / "model.h5")  # legacy full-model HDF5 ("model_weights" group)
    # The layout of the weight files keras.applications downloads (layer_names at the root).
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, small_v3)
    for path in ("model.keras", "model.h5", "weights.h5"):
        _same_trees(nets.convert.from_keras("keras_mobilenet_v3_small", tmp_path / path),
                    expected)
    small_v3.save_weights(tmp_path / "model.weights.h5")
    with pytest.raises(ValueError, match="names its weights by layer class.*load_weights"):
        nets.convert.from_keras("keras_mobilenet_v3_small", tmp_path / "model.weights.h5")
    with pytest.raises(FileNotFoundError, match="no Keras weights file"):
        nets.convert.from_keras("keras_mobilenet_v3_small", tmp_path / "absent.h5")
    assert keras  # the reference library was importable


def test_notop_mobilenet_v3_converts_without_the_pre_logits_layer(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format
    import h5py

    model = _keras_model("MobileNetV3Small", size=64, include_top=False, pooling="avg")
    with h5py.File(tmp_path / "notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    params, state = nets.convert.from_keras("keras_mobilenet_v3_small", tmp_path / "notop.h5")
    assert not {"mobilenet_v3/pre_logits", "mobilenet_v3/classifier"} & set(params)
    images = random_images(1, 64, seed=2)
    pooled, _ = jitted_apply("keras_mobilenet_v3_small", 0, pre_logits=False)(
        params, state, None, images, is_training=False)
    np.testing.assert_allclose(pooled, np.asarray(model(images, training=False)), atol=1e-4)


def test_notop_efficientnet_gives_the_pooled_features():
    model = _keras_model("EfficientNetB0", size=64, include_top=False, pooling="avg")
    params, state = nets.convert.from_keras("efficientnet_b0", model)
    assert "efficientnet/predictions" not in params
    images = random_images(1, 64, seed=2)
    pooled, _ = jitted_apply("efficientnet_b0", 0)(params, state, None, images,
                                                   is_training=False)
    np.testing.assert_allclose(pooled, np.asarray(model(images * 255.0, training=False)),
                               atol=1e-4)


def test_keras_weights_for_a_torchvision_variant_point_to_its_keras_twin(small_v3):
    with pytest.raises(ValueError, match="reproduces torchvision:mobilenet_v3_small.*"
                                         "keras_mobilenet_v3_small"):
        nets.convert.from_keras("mobilenet_v3_small", small_v3)


def test_keras_weights_of_another_variant_are_rejected_with_the_difference(small_v3):
    with pytest.raises(ValueError, match="(?s)into keras_mobilenet_v3_large.*missing.*"
                                         "shape mismatch"):
        nets.convert.from_keras("keras_mobilenet_v3_large", small_v3)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_mobilenet_v1_width_multipliers_count_as_keras(alpha):
    model = _keras_model("MobileNet", alpha=alpha)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    name = f"mobilenet_v1_{int(alpha * 100):03d}"
    params, state = nets.introspect.shapes(name)
    assert count(params) == trainable
    assert count(state) == sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
