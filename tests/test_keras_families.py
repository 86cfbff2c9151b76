"""Xception and the Keras twins of ResNet (v1) and DenseNet equal keras.applications (JAX
backend, weights=None, He-normal kernels, BatchNorm statistics randomised) on weights converted
with `nets.convert.from_keras`: logits and the four stage maps in eval mode, outputs and moving
statistics in training mode, a legacy .h5 weights file with Keras 2's layer numbering, and the
parameter counts of Keras' own models.

Sizes: ResNet-50 at 64 px; Xception at 96 px (Keras takes 71 px or more; 96 leaves odd and even
maps before its "same" max pools: 45, 23, 12, 6). DenseNet is compared with two dense layers per
block (Keras' DenseNet builder and our keras_densenet121 with that block_config): the same
layers, names and padding as DenseNet-121 at a fraction of its compile time; the full depths'
counts are tests/reference/params.json's Keras rows (tests/test_all_models.py)."""

import functools

import jax
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import count, jitted_apply, jitted_logits_and_features, random_images
from tests.test_keras_reference import _keras_eval, _numpy_initializers

SMALL_DENSENET = (2, 2, 2, 2)


def _stage_taps(model, taps):
    """The Keras tensors our stages equal: ("layer", "output") or ("layer", "input") (Xception's
    block outputs are unnamed Add layers: the input of the next block's first ReLU)."""
    return [getattr(model.get_layer(layer), end) for layer, end in taps]


# Our variant -> (Keras builder, its arguments, our overrides, size, the Keras tensors our
# stages 1-4 equal, whether the Keras model reads BGR).
CASES = {
    "xception": ("Xception", {}, {}, 96,
                 (("block3_sepconv1_act", "input"), ("block4_sepconv1_act", "input"),
                  ("block13_sepconv1_act", "input"), ("block14_sepconv2_act", "output")), False),
    "keras_resnet50": ("ResNet50", {}, {}, 64,
                       tuple((f"conv{s}_block{n}_out", "output")
                             for s, n in ((2, 3), (3, 4), (4, 6), (5, 3))), True),
    "keras_densenet121": ("DenseNet", dict(blocks=SMALL_DENSENET),
                          dict(block_config=SMALL_DENSENET), 64,
                          (("conv2_block2_concat", "output"), ("conv3_block2_concat", "output"),
                           ("conv4_block2_concat", "output"), ("relu", "output")), False),
}


@functools.cache
def _keras_model(name):
    """The case's Keras model (built once per module) with He-normal kernels and random
    BatchNorm statistics."""
    keras = reference.keras()
    constructor, kwargs, _, size, _, _ = CASES[name]
    if constructor == "DenseNet":  # the builder behind DenseNet121/169/201, not exported
        from keras.src.applications.densenet import DenseNet as build
    else:
        build = getattr(keras.applications, constructor)
    with _numpy_initializers():
        model = build(weights=None, input_shape=(size, size, 3), classifier_activation=None,
                      **kwargs)
    reference.randomize_keras_batchnorm(model)
    reference.he_normal_keras_kernels(model)
    return model


def _keras_images(name, images):
    """Our images as the Keras model reads them: Keras' ResNets take BGR (ours reverse the RGB
    channels themselves)."""
    return np.ascontiguousarray(images[..., ::-1]) if CASES[name][5] else images


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_stage_maps_equal_keras(name):
    keras = reference.keras()
    _, _, overrides, size, taps, _ = CASES[name]
    model = _keras_model(name)
    images = random_images(2, size)
    probe = keras.Model(model.inputs, [model.output, *_stage_taps(model, taps)])
    ref_logits, *ref_maps = _keras_eval(probe, [_keras_images(name, images)])

    params, state = nets.convert.from_keras(name, model, **overrides)
    (logits, maps), _ = jitted_logits_and_features(name, **overrides)(params, state, None,
                                                                       images)
    # The logits depend on the image (not only on the BatchNorm offsets) far beyond the
    # tolerance, so the comparison sees the whole network.
    assert np.abs(ref_logits[0] - ref_logits[1]).max() > 1e-3
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert [m.shape[1] for m in maps.values()] == list(nets.model_info(name).stage_sizes(size))
    for (stage, ours), ref_map in zip(maps.items(), ref_maps):
        np.testing.assert_allclose(ours, ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


def test_training_mode_outputs_and_moving_statistics_equal_keras():
    """Keras' DenseNet BatchNorm in training: batch statistics, eps 1.001e-5, moving averages
    with momentum 0.99 of the biased batch variance (torchvision's twin averages with 0.9 and
    the unbiased variance: off by far more than the tolerance after one step)."""
    name = "keras_densenet121"
    overrides = CASES[name][2]
    model = _keras_model(name)
    images = random_images(2, CASES[name][3], seed=3)
    params, state = nets.convert.from_keras(name, model, **overrides)
    stats = model.non_trainable_variables
    saved = [v.value for v in stats]
    train = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=True))
    ref, updated = train([v.value for v in model.trainable_variables], saved, images)
    try:  # the moving statistics put in the (shared) model just long enough to convert them
        for v, value in zip(stats, updated):
            v.assign(value)
        _, ref_state = nets.convert.from_keras(name, model, **overrides)
    finally:
        for v, value in zip(stats, saved):
            v.assign(value)
    logits, new_state = jitted_apply(name, **overrides)(params, state, None, images,
                                                        is_training=True)
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_state, state)
    assert min(jax.tree.leaves(moved)) > 1e-4  # every moving statistic was updated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 new_state, ref_state)


def test_xception_weights_file_with_keras_2_layer_numbers_converts_like_the_model(tmp_path):
    """A legacy .h5 weights file (the layout keras.applications downloads) whose unnamed
    shortcut layers carry Keras 2's numbers (conv2d_1 ... conv2d_4, batch_normalization_1 ...):
    Keras numbers unnamed layers per session, so the converter ranks them by number."""
    h5py = pytest.importorskip("h5py")
    model = _keras_model("xception")
    expected = nets.convert.from_keras("xception", model)
    layers = nets.convert.keras_layer_weights(model)
    renumbered, seen = {}, {}
    for layer, arrays in layers.items():
        if layer.startswith(("conv2d", "batch_normalization")):
            kind = "conv2d" if layer.startswith("conv2d") else "batch_normalization"
            seen[kind] = seen.get(kind, 0) + 1
            layer = f"{kind}_{seen[kind]}"
        renumbered[layer] = arrays
    assert seen == {"conv2d": 4, "batch_normalization": 4}
    with h5py.File(tmp_path / "xception.h5", "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in renumbered]
        for layer, arrays in renumbered.items():
            names = [f"{layer}/{i}:0" for i in range(len(arrays))]
            f.create_group(layer).attrs["weight_names"] = [n.encode() for n in names]
            for n, array in zip(names, arrays):
                f[layer][n] = array
    params, state = nets.convert.from_keras("xception", tmp_path / "xception.h5")
    for ours, theirs in zip((params, state), expected):
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)


# model.count_params() of keras.applications' Xception and ResNet50: every weight, BatchNorm
# moving statistics included (the figures Keras' documentation rounds to 22.9M and 25.6M).
KERAS_TOTALS = {"xception": 22910480, "keras_resnet50": 25636712}


@pytest.mark.parametrize("name", sorted(KERAS_TOTALS))
def test_registry_counts_are_the_keras_models(name):
    """The registry's figures are the Keras model's: trainable weights with the head and
    without (less the "predictions" layer), BatchNorm moving statistics; ours count the same."""
    model = _keras_model(name)
    info = nets.model_info(name)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    head = sum(int(np.prod(w.shape)) for w in model.get_layer("predictions").weights)
    stats = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert (model.count_params(), trainable, trainable - head, stats) == (
        KERAS_TOTALS[name], info.reference_params, info.reference_params_no_head,
        info.reference_bn_stat_elems)
    params, state = nets.introspect.shapes(name, 1000)
    assert (count(params), count(state)) == (trainable, stats)


def test_keras_densenet_weights_point_from_the_torchvision_variant_to_the_twin():
    with pytest.raises(ValueError, match="reproduces torchvision:densenet121.*"
                                         "keras_densenet121"):
        nets.convert.from_keras("densenet121", _keras_model("keras_densenet121"))


def test_xception_rejects_images_its_unpadded_stem_cannot_take():
    f = nets.transformed("xception")
    with pytest.raises(ValueError, match="at least 7 x 7 pixels"):
        jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=False),
                       np.zeros((1, 6, 6, 3), np.float32))


@pytest.mark.parametrize("options, message", [
    (dict(block="basic", layers=(1, 1, 1, 1), stride_in_1x1=True), "needs the bottleneck"),
    (dict(conv_bias=True, radix=2, avd=True), "conv_bias apply to plain 3x3 convs"),
    (dict(stride_in_1x1=True, avd=True), "stride_in_1x1 apply to plain"),
    (dict(channel_order="rbg"), "channel_order must be one of"),
])
def test_keras_resnet_options_reject_what_they_cannot_combine(options, message):
    f = nets.transformed("resnet50", **options)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=False),
                       np.zeros((1, 64, 64, 3), np.float32))
