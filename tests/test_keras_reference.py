"""The Keras-ported variants equal keras.applications (JAX backend, weights=None, BatchNorm
statistics randomised) on weights converted with `nets.convert.from_keras`: logits and the maps
at strides 8, 16, 32 in eval mode, outputs and running statistics in training mode, and every
weight format from_keras reads.

Comparisons run at 64 px: every stride-2 layer still sees an even input, as at 224 px, so the
padding paths are those of the paper's resolutions. Each Keras model is built once per module
(`_keras_model` is cached), its initialisers drawing from NumPy rather than compiling one XLA
program per weight shape; Keras forwards run jitted."""

import contextlib
import functools

import jax
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import count, jitted_apply, jitted_logits_and_features, random_images

SIZE = 64


def _efficientnet(width, depth, **kwargs):
    """keras.applications' EfficientNet builder, without dropout and drop connect (identities
    in eval mode; random in training mode, where both sides disable them)."""
    return ("EfficientNet", dict(width_coefficient=width, depth_coefficient=depth,
                                 default_size=224, dropout_rate=0.0, drop_connect_rate=0.0,
                                 **kwargs))


B0 = _efficientnet(1.0, 1.0, name="efficientnetb0")
# Our variant -> (Keras constructor and arguments, input scale, the Keras layers our stages 2-4
# equal). Keras' EfficientNet rescales its input by 1/255 itself (its Normalization layer is the
# identity with weights=None); ours takes normalised images. B3 (width 1.2, depth 1.4) rounds
# 16 * 1.2 up to 24 (make_divisible's 10% rule) and has identity shortcuts in every stage.
CASES = {
    "efficientnet_b0": (B0, 255.0, ("block3b_add", "block5c_add", "block7a_project_bn")),
    "efficientnet_b3": (_efficientnet(1.2, 1.4, name="efficientnetb3"), 255.0,
                        ("block3c_add", "block5e_add", "block7b_add")),
    "mobilenet_v1": (("MobileNet", {}), 1.0,
                     ("conv_pw_5_relu", "conv_pw_11_relu", "conv_pw_13_relu")),
    "mobilenet_v1_050": (("MobileNet", dict(alpha=0.5)), 1.0,
                         ("conv_pw_5_relu", "conv_pw_11_relu", "conv_pw_13_relu")),
    "keras_mobilenet_v2": (("MobileNetV2", {}), 1.0,
                           ("block_5_add", "block_12_add", "block_16_project_BN")),
    "keras_mobilenet_v3_small": (("MobileNetV3Small", {}), 1.0,
                                 ("expanded_conv_2_add", "expanded_conv_7_add",
                                  "expanded_conv_10_add")),
    "keras_mobilenet_v3_large": (("MobileNetV3Large", {}), 1.0,
                                 ("expanded_conv_5_add", "expanded_conv_11_add",
                                  "expanded_conv_14_add")),
}


@contextlib.contextmanager
def _numpy_initializers(seed=0):
    """Keras' random initialisers drawing from NumPy: on the JAX backend each weight shape
    otherwise compiles its own XLA program, ~20 s per model on a loaded CPU. The weights are
    random either way; the comparisons convert whichever Keras holds."""
    from keras.src import backend

    rng = np.random.RandomState(seed)
    dtype_of = lambda dtype: np.dtype(dtype or "float32")  # noqa: E731

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        return (rng.standard_normal(shape) * stddev + mean).astype(dtype_of(dtype))

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        return rng.uniform(minval, maxval, shape).astype(dtype_of(dtype))

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        x = rng.standard_normal(shape)
        while np.any(out := np.abs(x) > 2):
            x[out] = rng.standard_normal(int(out.sum()))
        return (x * stddev + mean).astype(dtype_of(dtype))

    names = ("normal", "uniform", "truncated_normal")
    saved = [getattr(backend.random, n) for n in names]
    try:
        for n, fn in zip(names, (normal, uniform, truncated_normal)):
            setattr(backend.random, n, fn)
        yield
    finally:
        for n, fn in zip(names, saved):
            setattr(backend.random, n, fn)


@functools.cache
def _cached_keras_model(constructor, size, kwargs):
    keras = reference.keras()
    kwargs = dict(kwargs)
    if constructor.startswith("MobileNetV3"):
        kwargs.setdefault("include_preprocessing", False)
    if kwargs.get("include_top", True):
        kwargs.setdefault("classifier_activation", None)
    if constructor == "EfficientNet":  # the builder behind EfficientNetB0-B7, not exported
        from keras.src.applications.efficientnet import EfficientNet as build
    else:
        build = getattr(keras.applications, constructor)
    with _numpy_initializers():
        model = build(weights=None, input_shape=(size, size, 3), **kwargs)
    reference.randomize_keras_batchnorm(model)
    return model


def _keras_model(constructor, size=SIZE, **kwargs):
    """The Keras model, built once per module for each (constructor, size, arguments)."""
    return _cached_keras_model(constructor, size, tuple(sorted(kwargs.items())))


def _keras_eval(model, images):
    """The Keras model's eval-mode outputs, in one compiled call."""
    return jax.tree.map(np.asarray, jax.jit(functools.partial(model, training=False))(images))


def _keras_outputs(model, layers, images):
    keras = reference.keras()
    outputs = [model.output] + [model.get_layer(layer).output for layer in layers]
    return _keras_eval(keras.Model(model.inputs, outputs), [images])


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_stage_maps_equal_keras(name):
    (constructor, kwargs), scale, stage_layers = CASES[name]
    model = _keras_model(constructor, **kwargs)
    images = random_images(2, SIZE)
    ref_logits, *ref_maps = _keras_outputs(model, stage_layers, images * scale)

    params, state = nets.convert.from_keras(name, model)
    (logits, maps), _ = jitted_logits_and_features(name)(params, state, None, images)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    for stage, ref_map, stride in zip(("stage2", "stage3", "stage4"), ref_maps, (8, 16, 32)):
        assert ref_map.shape[1] == SIZE // stride
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


def test_mobilenet_v1_truncates_widths_that_alpha_does_not_divide():
    """alpha 0.6: Keras' int(c * alpha) (19, 38, 76, ...), not rounding nor multiples of 8; the
    registered multipliers (0.25, 0.5, 0.75) divide every width and cannot tell them apart."""
    model = _keras_model("MobileNet", alpha=0.6)
    images = random_images(2, SIZE, seed=1)
    params, state = nets.convert.from_keras("mobilenet_v1", model, alpha=0.6)
    assert params["mobilenet_v1/conv_pw_3"]["w"].shape == (1, 1, 76, 76)
    logits, _ = jitted_apply("mobilenet_v1", alpha=0.6)(params, state, None, images,
                                                        is_training=False)
    np.testing.assert_allclose(logits, _keras_eval(model, images), atol=1e-4)


def test_efficientnet_training_mode_outputs_and_running_statistics_equal_keras():
    """Batch statistics, and moving averages with Keras' momentum 0.99, eps 1e-3 and biased
    variance (after one step the averages hold 1% batch statistics; with decay 0.9 they would
    hold 10%, off by ~0.07, thousands of times the tolerance)."""
    (constructor, kwargs), scale, _ = CASES["efficientnet_b0"]
    model = _keras_model(constructor, **kwargs)
    images = random_images(2, SIZE, seed=3)
    params, state = nets.convert.from_keras("efficientnet_b0", model)
    # The training step without side effects, then its moving statistics put in the model
    # (shared with the other tests) just long enough to convert them.
    stats = model.non_trainable_variables
    saved = [v.value for v in stats]
    train = jax.jit(functools.partial(model.stateless_call, training=True))
    ref, updated = train([v.value for v in model.trainable_variables], saved, images * scale)
    try:
        for v, value in zip(stats, updated):
            v.assign(value)
        _, ref_state = nets.convert.from_keras("efficientnet_b0", model)
    finally:
        for v, value in zip(stats, saved):
            v.assign(value)
    f = jitted_apply("efficientnet_b0", dropout_rate=0.0, drop_connect_rate=0.0)
    logits, new_state = f(params, state, None, images, is_training=True)
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    assert jax.tree.structure(new_state) == jax.tree.structure(ref_state)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_state, state)
    assert min(jax.tree.leaves(moved)) > 1e-4  # every running statistic was updated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 new_state, ref_state)


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
    with _numpy_initializers():  # the .keras archive is loaded by rebuilding the model
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

    model = _keras_model("MobileNetV3Small", include_top=False, pooling="avg")
    with h5py.File(tmp_path / "notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    params, state = nets.convert.from_keras("keras_mobilenet_v3_small", tmp_path / "notop.h5")
    assert not {"mobilenet_v3/pre_logits", "mobilenet_v3/classifier"} & set(params)
    images = random_images(1, SIZE, seed=2)
    pooled, _ = jitted_apply("keras_mobilenet_v3_small", 0, pre_logits=False)(
        params, state, None, images, is_training=False)
    np.testing.assert_allclose(pooled, _keras_eval(model, images), atol=1e-4)


def test_notop_efficientnet_gives_the_pooled_features():
    """include_top=False, pooling="avg" is the model up to its "avg_pool" layer: the same
    layers, so the B0 already built serves."""
    keras = reference.keras()
    (constructor, kwargs), scale, _ = CASES["efficientnet_b0"]
    full = _keras_model(constructor, **kwargs)
    model = keras.Model(full.inputs, full.get_layer("avg_pool").output)
    params, state = nets.convert.from_keras("efficientnet_b0", model)
    assert "efficientnet/predictions" not in params
    images = random_images(1, SIZE, seed=2)
    pooled, _ = jitted_apply("efficientnet_b0", 0)(params, state, None, images,
                                                   is_training=False)
    np.testing.assert_allclose(pooled, _keras_eval(model, images * scale), atol=1e-4)


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


RESOLUTION_VARIANTS = [n for n in nets.list_models("*mobilenet*")
                       if nets.model_info(n).train_size != 224]


@pytest.mark.parametrize("name", RESOLUTION_VARIANTS)
def test_resolution_variants_are_their_networks_at_keras_input_sizes(name):
    """The resolution multiplier changes the input only: the variant at px is the 224-px
    variant's network, trained and evaluated at px, one of the sizes keras.applications has
    weights for (MobileNet 128/160/192, MobileNetV2 96/128/160/192)."""
    info = nets.model_info(name)
    base = nets.model_info(name.rsplit("_", 1)[0])
    px = int(name.rsplit("_", 1)[1])
    assert (info.train_size, info.test_size) == (px, px) and base.train_size == 224
    assert px in {"MobileNet": (128, 160, 192), "MobileNetV2": (96, 128, 160, 192)}[
        info.keras_builder]
    assert (info.builder, info.config, info.preprocessing, info.keras_builder) == (
        base.builder, base.config, base.preprocessing, base.keras_builder)
    assert info.reference_params == base.reference_params


def test_a_resolution_variant_equals_keras_built_at_its_size():
    model = _keras_model("MobileNet", size=128, alpha=0.5)
    images = random_images(1, 128, seed=4)
    params, state = nets.convert.from_keras("mobilenet_v1_050_128", model)
    logits, _ = jitted_apply("mobilenet_v1_050_128")(params, state, None, images,
                                                     is_training=False)
    np.testing.assert_allclose(logits, _keras_eval(model, images), atol=1e-4)
